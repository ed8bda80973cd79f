"""Data: on-disk layouts, validation, normalisation, the preprocessed cache, partitions and splits, transforms."""
