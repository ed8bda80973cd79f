"""One whole phantom case: anatomy, tumour and mass effect combined into four contrasts and labels.

:func:`make_case` draws, in this order, the anatomy's deformation, the tumour, its boundary
noise and heterogeneity, then per contrast the bias field and the Gaussian noise, all from the
one generator it is given, so the same generator state gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mstkd.modalities import MODALITIES
from mstkd.phantoms.anatomy import _anatomy, _deform_anatomy, _mass_effect_coords, _smooth_noise
from mstkd.phantoms.recipe import (
    BIAS_SIGMA_MM,
    INTENSITY_SCALE,
    TISSUE_INTENSITY,
    TUMOUR_INTENSITY,
    SiteStyle,
    _check_shape,
    phantom_affine,
)
from mstkd.phantoms.tumour import _draw_tumour, _tumour_box, _tumour_layers


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
