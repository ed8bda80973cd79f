"""MONAI transform chains from a cache entry to training and evaluation samples.

A sample is a dict with ``image`` (``4 x h x w x d`` float32, canonical modality order),
``label`` (``3 x h x w x d`` float32 ET, TC, WT) and ``case_id``. Training adds a crop
biased towards the tumour, flips along each axis and per-channel intensity jitter;
evaluation returns the whole (brain-cropped) volume. Modality dropout is not a transform:
the trainer draws the student's subset per step, since teacher and student see the same
crop with different channels (see :func:`mstkd.modalities.zero_fill`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    ToTensord,
)
from omegaconf import DictConfig

from mstkd.data.cache import CachedCase
from mstkd.errors import InputError


def load_cached(entry: CachedCase) -> dict:
    """Cache entry -> sample dict of float32 arrays (the label is all zeros when the case has none).

    Raises:
        InputError: a cached image that is not finite (the cache never writes one; a file put in its place did).
    """
    image = np.asarray(entry.image(), dtype=np.float32)
    if not np.isfinite(image).all():
        raise InputError(f"{entry.folder}: the cached image is not finite; delete that folder to rebuild it")
    regions = entry.regions()
    label = np.zeros((3, *image.shape[1:]), dtype=np.float32) if regions is None else regions.astype(np.float32)
    return {"image": image, "label": label, "case_id": entry.case_id}


def train_transforms(cfg: DictConfig, patch: Sequence[int]) -> Compose:
    """Pad to ``patch``, crop one patch (``foreground_ratio`` of them centred on tumour), flip, jitter."""
    patch = tuple(int(p) for p in patch)
    ratio = float(cfg.foreground_ratio)
    aug = cfg.augment
    keys = ("image", "label")
    return Compose(
        [
            SpatialPadd(keys, spatial_size=patch),
            # pos/neg are relative weights; the label's WT channel marks the foreground.
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=patch, pos=ratio, neg=1 - ratio, num_samples=1
            ),
            *[RandFlipd(keys, prob=float(aug.flip_prob), spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd(
                "image", factors=float(aug.intensity_scale), prob=float(aug.intensity_prob), channel_wise=True
            ),
            RandShiftIntensityd(
                "image", offsets=float(aug.intensity_shift), prob=float(aug.intensity_prob), channel_wise=True
            ),
            ToTensord(keys, track_meta=False),
        ]
    )


def eval_transforms() -> Compose:
    """Whole volume, as tensors."""
    return Compose([ToTensord(("image", "label"), track_meta=False)])
