"""Synthetic BraTS-like phantom cases and federations, built offline from the MNI152 template.

Anatomy comes from the ICBM 2009a templates bundled with nilearn (brain mask, grey- and
white-matter probability maps; CSF = clip(brain - GM - WM, 0, 1)), so nothing is downloaded.
Cite Fonov et al. 2009/2011 and Collins et al. 1999 when publishing images made from them.

Geometry. Every phantom lives in the BraTS field of view of 240 x 240 x 155 mm. A grid of
shape ``(H, W, D)`` has voxels of ``(240/H, 240/W, 155/D)`` mm, stored in the BraTS voxel
order (first axis towards the subject's left, second towards posterior, third superior),
with the affine ``diag(-sx, -sy, sz)``; each voxel centre is the centre of its footprint on
the 1 mm BraTS grid, whose voxel (0, 0, 0) lies at world (0, 239, 0) mm (DATA.md §3), so
on the 240 x 240 x 155 grid the affine is exactly the BraTS header. The brain is centred in x
and y and fills the 155 mm in z, as in the BraTS data.

Recipe (DATA.md §8.2; lengths in mm, i.e. in voxels of the 240 x 240 x 155 grid, so that a
coarser grid gets proportionally sized tumours):

* per case, the anatomy is scaled by 0.93-1.07 (and 0.97-1.03 more per axis) about the
  brain centre and shifted by up to 3 mm, then a mass effect pushes the tissue around the
  tumour outwards by 20-45 % of the tumour-core radius;
* the tumour grows from a white-matter voxel (P(WM) > 0.8) in the supratentorial brain: an
  anisotropic distance field (axis scales 0.7-1.3) perturbed by smooth noise (sigma 4 mm,
  amplitude 2.5 mm) is cut by nested thresholds into a necrotic core (radius 5-10 mm), an
  enhancing rim (a further 3-6 mm) and edema (a further 8-20 mm), all multiplied by a
  per-case size factor from :attr:`SiteStyle.tumour_size`; edema stays where P(WM) > 0.3
  or close to the rim; nothing leaves the brain;
* each contrast mixes the tissue intensities of :data:`TISSUE_INTENSITY` and overwrites the
  tumour with :data:`TUMOUR_INTENSITY`, then applies the site's gamma, a smooth
  multiplicative bias field exp(b * n) (n: unit-SD noise smoothed with sigma 30 mm),
  Gaussian noise, skull-stripping and the site's intensity scale times 1000.

Label maps use the abstract values 1 = necrosis, 2 = edema, 3 = enhancing; files get the
convention of their layout (``fets``: 1/2/4, ``brats2023``: 1/2/3).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mstkd.data.labels import get_convention
from mstkd.data.nifti import read_volume, write_volume
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES

FOV_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
"""Field of view of every phantom grid in mm (the BraTS 240 x 240 x 155 grid at 1 mm)."""

NECROSIS, EDEMA, ENHANCING = 1, 2, 3
"""Abstract label values of :attr:`PhantomCase.labels`."""

TISSUE_INTENSITY: dict[str, tuple[float, float, float]] = {
    "flair": (0.15, 0.60, 0.45),
    "t1": (0.25, 0.55, 0.80),
    "t1ce": (0.25, 0.58, 0.80),
    "t2": (1.00, 0.60, 0.40),
}
"""Contrast -> intensity of pure (CSF, GM, WM) before gamma, bias, noise and scaling."""

TUMOUR_INTENSITY: dict[str, tuple[float, float, float]] = {
    "flair": (0.45, 0.80, 1.00),
    "t1": (0.30, 0.55, 0.50),
    "t1ce": (0.25, 1.30, 0.52),
    "t2": (0.95, 0.70, 0.85),
}
"""Contrast -> intensity of (necrosis, enhancing rim, edema) on the same scale."""

CORE_RADIUS_MM = (5.0, 10.0)
RIM_THICKNESS_MM = (3.0, 6.0)
EDEMA_THICKNESS_MM = (8.0, 20.0)
AXIS_SCALE = (0.7, 1.3)
BOUNDARY_NOISE_SIGMA_MM = 4.0
BOUNDARY_NOISE_AMPLITUDE_MM = 2.5
BIAS_SIGMA_MM = 30.0
EDEMA_WM_THRESHOLD = 0.3
EDEMA_FREE_FRACTION = 0.4
"""Edema is kept regardless of tissue within the rim plus this fraction of its thickness."""
SEED_WM_THRESHOLD = 0.8
SEED_Z_BAND = (0.40, 0.85)
"""Tumour seeds lie in this fraction of the brain's height (above the cerebellum, below the vertex)."""
INTENSITY_SCALE = 1000.0

_FILE_SUFFIXES: dict[str, dict[str, str]] = {
    "fets": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "brats2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"},
}
_ID_FORMAT = {"fets": "FeTS2022_9{:04d}", "brats2023": "BraTS-GLI-9{:04d}-000"}
MAX_CASES = 9999
"""Case IDs run 90001-99999, a range the real FeTS/BraTS data never use."""


@dataclass(frozen=True)
class SiteStyle:
    """Acquisition and population differences of one simulated institution.

    The defaults reproduce the plain recipe of DATA.md §8.2. :func:`site_style` draws
    each field uniformly from the range given in its comment.
    """

    scale: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODALITIES, 1.0))
    """Per contrast: multiplies the final intensities (drawn from 0.75-1.25)."""
    gamma: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODALITIES, 1.0))
    """Per contrast: exponent applied to the noise-free intensities, changing tissue contrast (0.8-1.25)."""
    noise_sd: float = 0.03
    """SD of the additive Gaussian noise on the [0, ~1.3] intensity scale (0.01-0.05)."""
    bias_strength: float = 0.15
    """b in the bias field exp(b * n), n unit-SD smooth noise (0.04-0.20)."""
    tumour_size: tuple[float, float] = (1.0, 1.0)
    """Range of the per-case factor on all tumour radii (a centre in 0.7-1.3, +-0.15)."""


@dataclass
class PhantomCase:
    """One synthetic case on an ``H x W x D`` grid.

    Attributes:
        images: contrast key (flair, t1, t1ce, t2) -> float32 ``H x W x D``, 0 outside the
            brain and at least 1 inside it; brain medians ~300-900 depending on the site,
            the brightest voxels (enhancing rim, bias peaks) up to ~2500.
        labels: uint8 ``H x W x D``, 0 background, 1 necrosis, 2 edema, 3 enhancing.
        affine: 4 x 4 voxel-to-world (RAS, mm) matrix ``diag(-sx, -sy, sz)`` plus origin.
        brain: bool ``H x W x D`` brain mask (the non-zero support of every image).
        tissue: csf, gm, wm -> float32 ``H x W x D`` tissue fractions of this case's anatomy
            (after its deformation, before the tumour replaced any tissue); 0 outside the brain.
        info: the drawn case parameters (JSON-serialisable).
    """

    images: dict[str, np.ndarray]
    labels: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    tissue: dict[str, np.ndarray]
    info: dict


# --------------------------------------------------------------------------- geometry


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"phantom shape must be three integers, got {shape!r}") from None
    if len(dims) != 3 or min(dims) < 16 or max(dims) > 512:
        raise InputError(f"phantom shape must be three integers between 16 and 512, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


def _spacing(shape: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(FOV_MM) / np.asarray(shape, dtype=float)


def phantom_affine(shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-world affine of a phantom grid of ``shape`` (see the module docstring)."""
    sx, sy, sz = _spacing(_check_shape(shape))
    affine = np.diag([-sx, -sy, sz, 1.0])
    # Voxel centres of a coarser grid sit in the middle of their footprint on the 1 mm grid.
    affine[:3, 3] = [(1 - sx) / 2, 239.0 - (sy - 1) / 2, (sz - 1) / 2]
    return affine


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


# --------------------------------------------------------------------------- styles and cases


def site_style(site: int, seed: int) -> SiteStyle:
    """The :class:`SiteStyle` of site ``site`` (a partition id, >= 0) in a federation seeded ``seed`` (>= 0).

    Deterministic in ``(site, seed)`` and independent of how many sites or cases exist.
    """
    if site < 0 or seed < 0:
        raise InputError(f"site and seed must be non-negative, got site {site}, seed {seed}")
    rng = np.random.default_rng([int(seed), int(site), 0x5173])
    scale = {m: round(float(rng.uniform(0.75, 1.25)), 4) for m in MODALITIES}
    gamma = {m: round(float(rng.uniform(0.8, 1.25)), 4) for m in MODALITIES}
    noise_sd = round(float(rng.uniform(0.01, 0.05)), 4)
    bias = round(float(rng.uniform(0.04, 0.2)), 4)
    size = float(rng.uniform(0.7, 1.3))
    return SiteStyle(
        scale=scale,
        gamma=gamma,
        noise_sd=noise_sd,
        bias_strength=bias,
        tumour_size=(round(size - 0.15, 4), round(size + 0.15, 4)),
    )


def _pick_seed(rng: np.random.Generator, brain: np.ndarray, wm: np.ndarray) -> np.ndarray:
    zs = np.nonzero((brain > 0.5).any(axis=(0, 1)))[0]
    z_lo = int(zs[0] + SEED_Z_BAND[0] * (zs[-1] - zs[0]))
    z_hi = int(zs[0] + SEED_Z_BAND[1] * (zs[-1] - zs[0]))
    band = np.zeros(brain.shape[2], dtype=bool)
    band[z_lo : z_hi + 1] = True
    for threshold in (SEED_WM_THRESHOLD, 0.5):
        candidates = np.argwhere((wm > threshold) & band)
        if len(candidates):
            return candidates[rng.integers(len(candidates))].astype(float)
    return np.asarray(np.unravel_index(int(np.argmax(wm)), wm.shape), dtype=float)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class _Tumour:
    """Tumour geometry (lengths in mm, positions in voxels of the anatomy crop)."""

    centre: np.ndarray
    axes: np.ndarray
    size: float
    r_core: float
    t_rim: float
    t_edema: float
    push: float

    @property
    def r_rim(self) -> float:
        return self.r_core + self.t_rim

    @property
    def r_edema(self) -> float:
        return self.r_rim + self.t_edema


def _draw_tumour(rng: np.random.Generator, maps: np.ndarray, spacing: np.ndarray, style: SiteStyle) -> _Tumour:
    centre = _pick_seed(rng, maps[0], maps[2]) + rng.uniform(-0.4, 0.4, size=3)
    size = float(rng.uniform(*style.tumour_size))
    axes = rng.uniform(*AXIS_SCALE, size=3)
    # At least one voxel per layer along every axis, so every label exists on coarse grids.
    coarse = float(spacing.max()) / float(axes.min())
    r_core = max(float(rng.uniform(*CORE_RADIUS_MM)) * size, coarse)
    t_rim = max(float(rng.uniform(*RIM_THICKNESS_MM)) * size, coarse)
    t_edema = max(float(rng.uniform(*EDEMA_THICKNESS_MM)) * size, 1.5 * coarse)
    push = float(rng.uniform(0.2, 0.45)) * (r_core + t_rim)
    return _Tumour(centre, axes, size, r_core, t_rim, t_edema, push)


def _tumour_box(tumour: _Tumour, spacing: np.ndarray, crop_shape: tuple[int, ...]) -> tuple[tuple, list[np.ndarray]]:
    """The region the tumour and its mass effect can touch, and open float32 voxel offsets from its centre."""
    reach_mm = max(tumour.r_edema * tumour.axes.max() + 3 * BOUNDARY_NOISE_AMPLITUDE_MM, 3 * tumour.r_rim)
    reach = np.ceil((reach_mm + 2 * spacing.max()) / spacing).astype(int)
    c_vox = np.round(tumour.centre).astype(int)
    lo = np.maximum(c_vox - reach, 0)
    hi = np.minimum(c_vox + reach + 1, crop_shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = [
        (np.arange(a, b) - c).astype(np.float32).reshape([-1 if i == axis else 1 for i in range(3)])
        for axis, (a, b, c) in enumerate(zip(lo, hi, tumour.centre, strict=True))
    ]
    return box, grids


def _tumour_layers(
    rng: np.random.Generator,
    tumour: _Tumour,
    grids: list[np.ndarray],
    spacing: np.ndarray,
    brain_p: np.ndarray,
    wm: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Soft volume fractions of necrosis, enhancing rim and edema on the tumour box, and its labels.

    The fractions are float32 in [0, 1] and sum to at most 1; the edema fraction already
    includes its fade towards the outer border. ``brain_p`` and ``wm`` are the box's
    brain and white-matter fractions.
    """
    dist = np.sqrt(sum((g * np.float32(s / a)) ** 2 for g, s, a in zip(grids, spacing, tumour.axes, strict=True)))
    wobble = _smooth_noise(rng, dist.shape, spacing, BOUNDARY_NOISE_SIGMA_MM)
    # The perturbation fades towards the centre so the core never vanishes.
    dist += wobble * np.float32(BOUNDARY_NOISE_AMPLITUDE_MM) * np.clip(dist / np.float32(tumour.r_core), 0, 1)
    inv_width = np.float32(1.0 / (0.2 * float(spacing.mean())))  # partial-volume width of the boundaries
    s_core = _sigmoid((np.float32(tumour.r_core) - dist) * inv_width)
    s_rim = _sigmoid((np.float32(tumour.r_rim) - dist) * inv_width)
    s_edema = _sigmoid((np.float32(tumour.r_edema) - dist) * inv_width)
    r_free = tumour.r_rim + EDEMA_FREE_FRACTION * tumour.t_edema
    allowed = np.maximum(
        np.clip((wm - np.float32(EDEMA_WM_THRESHOLD)) * np.float32(5.0) + np.float32(0.5), 0, 1),
        _sigmoid((np.float32(r_free) - dist) * inv_width),
    )
    in_brain = np.clip(brain_p, 0, 1)
    f_core = s_core * in_brain
    f_rim = (s_rim - s_core) * in_brain
    # Oedematous signal weakens towards the edema's outer border.
    fade = 1 - np.float32(0.3) * np.clip((dist - np.float32(tumour.r_rim)) / np.float32(tumour.t_edema), 0, 1)
    f_edema = (s_edema - s_rim) * allowed * in_brain * fade

    inside = brain_p > 0.5
    labels = np.zeros(dist.shape, dtype=np.uint8)
    labels[inside & (s_edema >= 0.5) & (allowed >= 0.5)] = EDEMA
    labels[inside & (s_rim >= 0.5)] = ENHANCING
    labels[inside & (s_core >= 0.5)] = NECROSIS
    return f_core, f_rim, f_edema, labels


def make_case(rng: np.random.Generator, shape: tuple[int, int, int], style: SiteStyle | None = None) -> PhantomCase:
    """One synthetic BraTS-like case on a grid of ``shape`` voxels covering 240 x 240 x 155 mm.

    Args:
        rng: the only source of randomness; the same generator state gives the same bytes.
        shape: ``(H, W, D)``, each 16-512.
        style: the site's appearance and tumour sizes; ``None`` is the plain recipe.

    Returns:
        A :class:`PhantomCase`; all four contrasts, the labels and the masks are ``H x W x D``.
    """
    shape = _check_shape(shape)
    style = style or SiteStyle()
    anat = _anatomy(shape)
    spacing = anat.spacing
    maps, crop = _deform_anatomy(rng, anat, shape)
    tumour = _draw_tumour(rng, maps, spacing, style)
    box, grids = _tumour_box(tumour, spacing, maps.shape[1:])

    # Mass effect: resample the tissue maps around the tumour from positions nearer its centre.
    sample = _mass_effect_coords(grids, spacing, tumour.r_rim, tumour.push)
    coords = np.stack(np.broadcast_arrays(*[g + c for g, c in zip(sample, tumour.centre, strict=True)]))
    for k in range(3):
        maps[k][box] = ndimage.map_coordinates(maps[k], coords, order=1, mode="constant", cval=0.0)
    del coords
    np.clip(maps, 0.0, 1.0, out=maps)
    brain_p, gm, wm = maps
    brain = brain_p > 0.5

    f_core, f_rim, f_edema, box_labels = _tumour_layers(rng, tumour, grids, spacing, brain_p[box], wm[box])
    labels = np.zeros(brain.shape, dtype=np.uint8)
    labels[box] = box_labels
    f_tissue = 1 - f_core - f_rim - f_edema
    heterogeneity = 1 + np.float32(0.05) * _smooth_noise(rng, f_core.shape, spacing, 3.0)

    # Tissue fractions inside the brain, renormalised so partial-volume edge voxels keep full brightness.
    norm = np.where(brain, 1 / np.maximum(brain_p, np.float32(0.5)), np.float32(0))
    gm = gm * norm
    wm = wm * norm
    csf = np.clip(brain - gm - wm, 0, 1, dtype=np.float32)
    n_brain = int(brain.sum())

    images = {}
    for m in MODALITIES:
        i_csf, i_gm, i_wm = (np.float32(v) for v in TISSUE_INTENSITY[m])
        i_nec, i_enh, i_ed = (np.float32(v) for v in TUMOUR_INTENSITY[m])
        img = csf * i_csf + gm * i_gm + wm * i_wm
        img[box] = img[box] * f_tissue + (f_core * i_nec + f_rim * i_enh + f_edema * i_ed) * heterogeneity
        np.maximum(img, 0, out=img)
        if style.gamma[m] != 1.0:
            np.power(img, np.float32(style.gamma[m]), out=img)
        img *= np.exp(np.float32(style.bias_strength) * _smooth_noise(rng, img.shape, spacing, BIAS_SIGMA_MM))
        img[brain] += rng.standard_normal(n_brain, dtype=np.float32) * np.float32(style.noise_sd)
        img *= np.float32(INTENSITY_SCALE * style.scale[m])
        # Brain voxels stay strictly positive so the non-zero support of every image is the brain mask.
        np.maximum(img, 1, out=img)
        img[~brain] = 0
        images[m] = _uncrop(img, crop, shape)

    info = {
        "tumour_centre_voxel": [round(float(c + s.start), 2) for c, s in zip(tumour.centre, crop, strict=True)],
        "necrosis_radius_mm": round(tumour.r_core, 3),
        "rim_thickness_mm": round(tumour.t_rim, 3),
        "edema_thickness_mm": round(tumour.t_edema, 3),
        "axis_scales": [round(float(a), 4) for a in tumour.axes],
        "size_factor": round(tumour.size, 4),
        "mass_effect_mm": round(tumour.push, 3),
    }
    return PhantomCase(
        images=images,
        labels=_uncrop(labels, crop, shape),
        affine=phantom_affine(shape),
        brain=_uncrop(brain, crop, shape),
        tissue={"csf": _uncrop(csf, crop, shape), "gm": _uncrop(gm, crop, shape), "wm": _uncrop(wm, crop, shape)},
        info=info,
    )


def _uncrop(arr: np.ndarray, crop: tuple, shape: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=arr.dtype)
    out[crop] = arr
    return out


# --------------------------------------------------------------------------- federations


def _site_counts(cases: int, weights: Sequence[float]) -> list[int]:
    """Split ``cases`` over sites in proportion to ``weights``, at least one case each (largest remainder)."""
    w = np.asarray(weights, dtype=float)
    quota = cases * w / w.sum()
    counts = np.maximum(np.floor(quota).astype(int), 1)
    while counts.sum() < cases:
        counts[int(np.argmax(quota - counts))] += 1
    while counts.sum() > cases:
        spare = np.where(counts > 1, quota - counts, np.inf)
        counts[int(np.argmin(spare))] -= 1
    return [int(c) for c in counts]


def _case_header(affine: np.ndarray) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


def write_federation(
    out: Path,
    *,
    cases: int,
    sites: int,
    shape: Sequence[int] = (96, 96, 64),
    layout: str = "fets",
    seed: int = 0,
    site_sizes: Sequence[float] | None = None,
    progress: bool = True,
) -> Path:
    """Write a federation of phantom cases, a partition CSV and the generator parameters.

    Layout ``fets``: ``out/FeTS2022_9XXXX/FeTS2022_9XXXX_{flair,t1,t1ce,t2,seg}.nii.gz``,
    labels 0/1/2/4. Layout ``brats2023``: ``out/BraTS-GLI-9XXXX-000/BraTS-GLI-9XXXX-000-
    {t2f,t1n,t1c,t2w,seg}.nii.gz``, labels 0/1/2/3. IDs count up from 90001, site by site.
    Images are float32, labels uint8. ``out/partitioning.csv`` has the FeTS header
    ``Partition_ID,Subject_ID`` (partitions 1..sites, CRLF line ends as in the FeTS CSVs);
    ``out/phantoms.json`` records the seed, layout, shape, site styles and per-case draws.

    Args:
        out: the federation folder; must not exist or be empty. The federation is built in
            a temporary sibling folder and renamed into place only when complete.
        cases: number of cases in all (``sites`` to 9999).
        sites: number of sites; site ``p`` draws its cases from ``site_style(p, seed)``.
        shape: grid ``(H, W, D)`` of every volume.
        layout: ``fets`` or ``brats2023``.
        seed: non-negative; the same seed writes the same voxel data.
        site_sizes: relative site sizes (one positive number per site); default equal.
        progress: show a progress bar over cases on stderr.

    Returns:
        The path of ``partitioning.csv``.
    """
    from tqdm import tqdm

    out = Path(out)
    shape = _check_shape(shape)
    if layout not in _FILE_SUFFIXES:
        raise InputError(f"unknown phantom layout {layout!r}; expected one of {', '.join(_FILE_SUFFIXES)}")
    if sites < 1:
        raise InputError(f"need at least one site, got {sites}")
    if cases < sites:
        raise InputError(f"need at least one case per site: {cases} cases for {sites} sites")
    if cases > MAX_CASES:
        raise InputError(f"at most {MAX_CASES} phantom cases (IDs 90001-99999), got {cases}")
    if seed < 0:
        raise InputError(f"seed must be non-negative, got {seed}")
    weights = [1.0] * sites if site_sizes is None else [float(s) for s in site_sizes]
    if len(weights) != sites or not all(math.isfinite(s) and s > 0 for s in weights):
        raise InputError(f"site_sizes needs {sites} positive numbers, got {list(site_sizes or [])}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists and is not an empty folder")

    counts = _site_counts(cases, weights)
    styles = {p: site_style(p, seed) for p in range(1, sites + 1)}
    convention = get_convention(layout)
    to_file_label = np.zeros(4, dtype=np.uint8)
    to_file_label[[NECROSIS, EDEMA, ENHANCING]] = [convention.necrosis, convention.edema, convention.enhancing]
    suffixes = _FILE_SUFFIXES[layout]
    header = _case_header(phantom_affine(shape))

    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp) so the finished folder gets the usual umask permissions.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        rows: list[tuple[int, str]] = []
        records = []
        bar = tqdm(total=cases, desc="phantoms", unit="case", file=sys.stderr, disable=not progress)
        with bar:
            number = 0
            for partition, count in enumerate(counts, start=1):
                for _ in range(count):
                    number += 1
                    case_id = _ID_FORMAT[layout].format(number)
                    case = make_case(np.random.default_rng([seed, number]), shape, styles[partition])
                    volumes = {**case.images, "seg": to_file_label[case.labels]}
                    for key, data in volumes.items():
                        write_volume(tmp / case_id / f"{case_id}{suffixes[key]}.nii.gz", data, case.affine, header)
                    rows.append((partition, case_id))
                    records.append({"subject_id": case_id, "partition": partition, **case.info})
                    bar.update()
        with open(tmp / "partitioning.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\r\n")
            writer.writerow(["Partition_ID", "Subject_ID"])
            writer.writerows(rows)
        meta = {
            "generator": "mstkd.phantoms",
            "anatomy": "ICBM 2009a MNI152 brain mask, GM and WM maps bundled with nilearn "
            "(Fonov et al. 2009/2011; Collins et al. 1999)",
            "seed": seed,
            "layout": layout,
            "labels": {"necrosis": convention.necrosis, "edema": convention.edema, "enhancing": convention.enhancing},
            "shape": list(shape),
            "spacing_mm": [round(float(s), 6) for s in _spacing(shape)],
            "affine": phantom_affine(shape).tolist(),
            "cases": cases,
            "sites": sites,
            "site_sizes": counts,
            "recipe": {
                "tissue_intensity_csf_gm_wm": TISSUE_INTENSITY,
                "tumour_intensity_necrosis_enhancing_edema": TUMOUR_INTENSITY,
                "core_radius_mm": CORE_RADIUS_MM,
                "rim_thickness_mm": RIM_THICKNESS_MM,
                "edema_thickness_mm": EDEMA_THICKNESS_MM,
                "axis_scale": AXIS_SCALE,
                "boundary_noise_sigma_mm": BOUNDARY_NOISE_SIGMA_MM,
                "boundary_noise_amplitude_mm": BOUNDARY_NOISE_AMPLITUDE_MM,
                "bias_sigma_mm": BIAS_SIGMA_MM,
                "intensity_scale": INTENSITY_SCALE,
            },
            "site_styles": {str(p): asdict(s) for p, s in styles.items()},
            "case_parameters": records,
        }
        (tmp / "phantoms.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "partitioning.csv"


# --------------------------------------------------------------------------- preview


def _case_files(case_dir: Path) -> tuple[dict[str, Path], str]:
    for layout, suffixes in _FILE_SUFFIXES.items():
        found = {}
        for key, suffix in suffixes.items():
            hits = sorted(case_dir.glob(f"*{suffix}.nii.gz")) or sorted(case_dir.glob(f"*{suffix}.nii"))
            if hits:
                found[key] = hits[0]
        if len(found) == len(suffixes):
            return found, layout
    raise InputError(f"{case_dir}: no complete phantom case (four contrasts and seg in FeTS or BraTS 2023 naming)")


def preview(case_dir: Path, out_png: Path) -> Path:
    """Save one axial slice through the tumour centre: T1, T1ce, T2, FLAIR and the labels over FLAIR.

    Colours: red necrosis, green edema, yellow enhancing. The slice is shown as on the
    BraTS grid (anterior up, patient's left on the right). Returns ``out_png``.
    """
    from matplotlib.figure import Figure

    case_dir, out_png = Path(case_dir), Path(out_png)
    files, layout = _case_files(case_dir)
    convention = get_convention(layout)
    seg = read_volume(files["seg"], dtype=np.uint8).data
    core = np.argwhere(np.isin(seg, [convention.necrosis, convention.enhancing]))
    tumour = core if len(core) else np.argwhere(seg > 0)
    z = int(round(tumour[:, 2].mean())) if len(tumour) else seg.shape[2] // 2

    fig = Figure(figsize=(15, 3.3), facecolor="black")
    panels = [("T1", "t1"), ("T1ce", "t1ce"), ("T2", "t2"), ("FLAIR", "flair"), ("labels", None)]
    flair_slice = None
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_axis_off()
        ax.set_title(title, color="white")
        if key is not None:
            vol = read_volume(files[key]).data
            inside = vol[vol > 0]
            top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
            sl = vol[:, :, z].T
            ax.imshow(sl, cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            if key == "flair":
                flair_slice = sl / top
        else:
            base = np.clip(flair_slice if flair_slice is not None else np.zeros(seg.shape[:2]).T, 0, 1)
            rgb = np.repeat(base[..., None] * 0.6, 3, axis=2)
            sl = seg[:, :, z].T
            colours = {convention.necrosis: (1, 0, 0), convention.edema: (0, 0.8, 0), convention.enhancing: (1, 1, 0)}
            for value, colour in colours.items():
                rgb[sl == value] = colour
            ax.imshow(rgb, interpolation="nearest")
    fig.suptitle(f"{case_dir.name}  axial slice {z}", color="white")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85, wspace=0.02)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, facecolor="black")
    return out_png
