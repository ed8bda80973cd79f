"""Optional TensorBoard scalars (``pip install '.[tensorboard]'`` in the repository), for those who follow runs there.

Centralised training writes one point per epoch, a federated server one per round, under
``<run folder>/tensorboard/``; ``tensorboard --logdir <run folder>`` shows them. Nested dicts
become slash-separated tags (``val/WT_dice``, ``site-1/train-loss``); only numbers are written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mstkd.errors import InputError

FOLDER = "tensorboard"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``{"<prefix>a/b": 1, "<prefix>c": 2}`` (lists by their length)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = len(value) if isinstance(value, list | tuple) else value
    return flat


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of :func:`flatten`: ``{"val": {"WT_dice": 0.8}, "note": "x"}`` -> ``{"val/WT_dice": 0.8}``."""
    return {
        k: float(v)
        for k, v in flatten(values, prefix).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """Writes scalars to TensorBoard event files, or does nothing when switched off."""

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        """Raises :class:`InputError` at once (before any work) when enabled without the package."""
        self.folder = Path(run_dir) / FOLDER
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise InputError(
                    "TensorBoard logging needs the tensorboard package: pip install '.[tensorboard]' in the repository"
                ) from None

    def log(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        if self.writer is None:  # the folder appears with the first point, not before
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder))
        for tag, value in scalars(values, prefix).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
