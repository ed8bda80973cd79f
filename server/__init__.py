"""Flower ServerApp: strategy, global evaluation, checkpoints and the run log (see ``server/app.py``)."""
