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


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"val": {"WT_dice": 0.8}, "loss": 2.1, "note": "x"}`` -> ``{"val/WT_dice": 0.8, "loss": 2.1}``."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


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
