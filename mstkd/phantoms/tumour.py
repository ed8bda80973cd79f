"""The tumour of a phantom case: its seed, drawn geometry, bounding box and soft layers.

A tumour grows from a white-matter voxel in the supratentorial brain; an anisotropic distance
field perturbed by smooth noise is cut by nested thresholds into necrotic core, enhancing rim
and edema (DATA.md §8.2; see the :mod:`mstkd.phantoms` docstring for the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mstkd.phantoms.anatomy import _smooth_noise
from mstkd.phantoms.recipe import (
    AXIS_SCALE,
    BOUNDARY_NOISE_AMPLITUDE_MM,
    BOUNDARY_NOISE_SIGMA_MM,
    CORE_RADIUS_MM,
    EDEMA,
    EDEMA_FREE_FRACTION,
    EDEMA_THICKNESS_MM,
    EDEMA_WM_THRESHOLD,
    ENHANCING,
    NECROSIS,
    RIM_THICKNESS_MM,
    SEED_WM_THRESHOLD,
    SEED_Z_BAND,
    SiteStyle,
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
