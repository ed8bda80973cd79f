"""Anatomy of a phantom case: the MNI152 tissue maps on a phantom grid, their per-case deformation and mass effect.

The ICBM 2009a brain mask and grey- and white-matter maps bundled with nilearn are resampled
once per grid shape (cached), then every case scales and shifts them (:func:`_deform_anatomy`)
and the tumour pushes them outwards (:func:`_mass_effect_coords`). The resampling and smooth
noise helpers live here because the anatomy is their first user; the tumour stage reuses
:func:`_smooth_noise`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mstkd.phantoms.recipe import FOV_MM, _spacing

# --------------------------------------------------------------------------- resampling and noise


def _resample_axis(arr: np.ndarray, axis: int, coords: np.ndarray, halfwidth: float = 1.0) -> np.ndarray:
    """Sample ``arr`` along ``axis`` at fractional indices ``coords`` with a triangle kernel.

    ``halfwidth`` (in source voxels, at least 1) widens the kernel for anti-aliased
    downsampling; 1 is linear interpolation. Source positions outside the array count as 0.
    Separable element-wise sums keep the result bit-identical across BLAS thread counts.
    """
    n = arr.shape[axis]
    hw = max(1.0, float(halfwidth))
    reach = math.ceil(hw)
    base = np.floor(coords).astype(np.int64)
    taps = [base + j for j in range(1 - reach, reach + 1)]
    weights = [np.clip(1.0 - np.abs(coords - t) / hw, 0.0, None) for t in taps]
    total = np.sum(weights, axis=0)
    shape = [1] * arr.ndim
    shape[axis] = len(coords)
    out_shape = list(arr.shape)
    out_shape[axis] = len(coords)
    out = np.zeros(out_shape, dtype=arr.dtype)
    for t, w in zip(taps, weights, strict=True):
        w = np.where((t >= 0) & (t < n), w / total, 0.0)
        if not w.any():
            continue
        out += np.take(arr, np.clip(t, 0, n - 1), axis=axis) * w.astype(arr.dtype).reshape(shape)
    return out


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Unit-SD Gaussian-smoothed white noise (sigma in mm) on a grid, float32.

    The noise is drawn and filtered on a grid of about sigma/2 spacing (never finer than
    the target) and linearly upsampled, which is indistinguishable for such smooth fields
    and far cheaper than filtering a full-resolution volume.
    """
    shape = np.asarray(shape)
    step = np.maximum(spacing, sigma_mm / 2.0)
    pad = np.ceil(2.0 * sigma_mm / step).astype(int) + 1
    coarse = np.ceil((shape - 1) * spacing / step).astype(int) + 2 + 2 * pad
    field_ = ndimage.gaussian_filter(rng.standard_normal(tuple(coarse)), sigma_mm / step, mode="reflect")
    inner = field_[tuple(slice(p, c - p) for p, c in zip(pad, coarse, strict=True))]
    field_ = ((field_ - inner.mean()) / max(float(inner.std()), 1e-12)).astype(np.float32)
    for axis in range(3):
        coords = np.arange(shape[axis]) * spacing[axis] / step[axis] + pad[axis]
        field_ = _resample_axis(field_, axis, coords)
    return field_


# --------------------------------------------------------------------------- anatomy


@functools.lru_cache(maxsize=1)
def _mni_maps() -> tuple[np.ndarray, np.ndarray]:
    """Brain, GM, WM on the 1 mm ICBM grid in BraTS voxel order, and their offset.

    Returns ``(maps, offset)``: ``maps`` is float32 ``3 x 197 x 233 x 189`` with the first
    two axes flipped (RAS -> LPS voxel order); MNI index ``i`` lands at index
    ``i + offset`` of the 1 mm 240 x 240 x 155 grid.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        images = (
            datasets.load_mni152_brain_mask(resolution=1),
            datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1),
        )
    maps = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in images])[:, ::-1, ::-1, :]
    maps = np.ascontiguousarray(maps)
    maps[1:] *= maps[0]
    idx = np.nonzero(maps[0] > 0.5)
    lo = np.array([a.min() for a in idx])
    hi = np.array([a.max() for a in idx])
    # Centre the brain box in x and y; in z it spans the whole 155 mm, as in BraTS.
    offset = np.floor((np.asarray(FOV_MM) - 1) / 2 - (lo + hi) / 2 + 0.5)
    return maps, offset


@dataclass(frozen=True)
class _Anatomy:
    maps: np.ndarray  # 3 x H x W x D float32: brain, GM, WM fractions
    spacing: np.ndarray  # mm
    lo: np.ndarray  # brain bounding box (voxels, inclusive)
    hi: np.ndarray


@functools.lru_cache(maxsize=4)
def _anatomy(shape: tuple[int, int, int]) -> _Anatomy:
    """The template tissue maps resampled onto a phantom grid (cached: every case starts here)."""
    maps, offset = _mni_maps()
    spacing = _spacing(shape)
    out = maps
    for axis in range(3):
        # Centre of target voxel k on the 1 mm grid, then in MNI index units.
        coords = (np.arange(shape[axis]) + 0.5) * spacing[axis] - 0.5 - offset[axis]
        out = _resample_axis(out, axis + 1, coords, halfwidth=spacing[axis])
    np.clip(out, 0.0, 1.0, out=out)
    idx = np.nonzero(out[0] > 0.5)
    lo = np.array([a.min() for a in idx])
    hi = np.array([a.max() for a in idx])
    out.setflags(write=False)
    return _Anatomy(maps=out, spacing=spacing, lo=lo, hi=hi)


def _deform_anatomy(rng: np.random.Generator, anat: _Anatomy, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple]:
    """Per-case global variation: anisotropic scaling about the brain centre plus a shift.

    Returns the deformed maps on a crop that contains the whole brain, and the crop's slices.
    """
    scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3)
    shift_mm = rng.uniform(-3.0, 3.0, size=3) * np.array([1.0, 1.0, 0.5])
    centre = (anat.lo + anat.hi) / 2.0
    half = (anat.hi - anat.lo) / 2.0
    margin = np.ceil(half * (scale.max() - 1).clip(0) + 3.0 / anat.spacing + 2).astype(int)
    lo = np.maximum(anat.lo - margin, 0)
    hi = np.minimum(anat.hi + margin, np.asarray(shape) - 1)
    out = anat.maps
    for axis in range(3):
        k = np.arange(lo[axis], hi[axis] + 1)
        coords = centre[axis] + (k - centre[axis]) / scale[axis] - shift_mm[axis] / anat.spacing[axis]
        out = _resample_axis(out, axis + 1, coords)
    np.clip(out, 0.0, 1.0, out=out)
    crop = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))
    return out, crop


def _mass_effect_coords(
    grids: list[np.ndarray], spacing: np.ndarray, radius_mm: float, amplitude_mm: float
) -> list[np.ndarray]:
    """Backward-mapped sampling coordinates that push tissue radially away from the origin.

    ``grids`` are open (broadcastable) voxel offsets from the tumour centre. The push is
    ``amplitude * r / R`` inside R (a uniform expansion of the core), ``amplitude * (R/r)^2``
    beyond it, faded to zero between 2R and 3R. For amplitudes up to 0.45 R (as drawn) its
    radial derivative stays below 1, so the mapping never folds.
    """
    mm = [g * s for g, s in zip(grids, spacing, strict=True)]
    r = np.sqrt(mm[0] ** 2 + mm[1] ** 2 + mm[2] ** 2)
    rr = np.maximum(r, 1e-6)
    push = np.where(r < radius_mm, amplitude_mm * r / radius_mm, amplitude_mm * (radius_mm / rr) ** 2)
    fade = np.clip((r - 2 * radius_mm) / radius_mm, 0.0, 1.0)
    push = push * 0.5 * (1 + np.cos(np.pi * fade))
    return [g - push * m / rr / s for g, m, s in zip(grids, mm, spacing, strict=True)]
