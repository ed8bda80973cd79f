"""The phantom recipe's knobs, site styles and grid geometry.

Every number the generator draws from or mixes with lives here (DATA.md §8.2), together with
the per-site appearance (:class:`SiteStyle`, :func:`site_style`) and the geometry of a phantom
grid (:func:`phantom_affine`; see the :mod:`mstkd.phantoms` docstring). The other stages read
these names and never redefine them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

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
    """Voxel-to-world affine of a phantom grid of ``shape`` (see the :mod:`mstkd.phantoms` docstring)."""
    sx, sy, sz = _spacing(_check_shape(shape))
    affine = np.diag([-sx, -sy, sz, 1.0])
    # Voxel centres of a coarser grid sit in the middle of their footprint on the 1 mm grid.
    affine[:3, 3] = [(1 - sx) / 2, 239.0 - (sy - 1) / 2, (sz - 1) / 2]
    return affine
