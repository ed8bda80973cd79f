"""Flower ClientApp: one node per institution (see ``client/app.py``)."""
