"""MST-KDNet for federated brain-tumour segmentation with missing MRI modalities.

The package holds the method and everything around one model (data, metrics,
phantoms, training, evaluation). It never imports Flower: the federated layer
lives in ``client/`` and ``server/`` and calls into this package.
"""

__version__ = "0.1.0"
