"""BraTS 2023 lesion-wise scores, as the challenge's ranking computed them (``mstkd score --lesion brats2023``).

The rules of the BraTS 2023 lesion-wise evaluation script (the GLI ranking), per region (ET, TC, WT):

1. **Lesions.** The reference's 26-connected components, merged where their 3-iteration dilations
   (18-connected structuring element) touch: each component of the dilated reference, cut back to
   the reference's own voxels, is one lesion. The prediction's lesions are its 26-connected
   components, never merged.
2. **Matching.** A predicted component matches a reference lesion when any of its voxels lies
   inside that lesion's own 3-iteration dilation. A lesion may match several components and a
   component several lesions; a component that matches any lesion is never a false positive.
3. **Per lesion**, Dice and HD95 compare the (undilated) lesion with the union of the components
   it matched. A lesion with no match is a false negative: Dice 0, HD95 374.
4. **Small lesions.** A reference lesion of at most 50 mm³ (voxels x voxel volume) is left out of
   the score, numerator and denominator, matched or not. Its matched components still do not
   count as false positives. Predicted components are never dropped for their size.
5. **Score.** Over the L lesions kept and the FP unmatched predicted components,
   Dice = Σ Dice / (L + FP) and HD95 = (Σ HD95 + 374 · FP) / (L + FP). With nothing on either
   side (0 / 0), Dice is 1 and HD95 0.

One difference from the script: its per-lesion HD95 weights each surface element by its area
(the DeepMind ``surface-distance`` method); here it is :mod:`mstkd.metrics`'s HD95 of the pair,
the larger of the two directed 95th percentiles over surface voxels (``hd95="max"``), which can
differ from the area-weighted one by a fraction of a voxel. Dice, the counts and the lesion
structure are the script's. Needs scipy only, no panoptica.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mstkd.data.labels import REGIONS, LabelConvention
from mstkd.metrics import region_scores

DILATION_ITERATIONS = 3
"""Iterations of the 18-connected dilation that merges reference lesions and defines a lesion's matching zone."""
MIN_LESION_VOLUME = 50.0
"""Reference lesions of at most this volume (mm³) are left out of the score."""
HD95_PENALTY = 374.0
"""HD95 (mm) of a missed reference lesion and of an unmatched predicted component."""

METRICS: tuple[str, ...] = ("lesion_tp", "lesion_fp", "lesion_fn", "lesion_small", "lesion_dice", "lesion_hd95")
"""Keys of each region's dict: the kept lesions matched (TP) and missed (FN), the unmatched predicted components
(FP), the reference lesions left out as too small, and the lesion-wise Dice and HD95."""

_DILATE = ndimage.generate_binary_structure(3, 2)
_CONNECT = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def region_lesions(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    dilation: int = DILATION_ITERATIONS,
    min_volume: float = MIN_LESION_VOLUME,
    hd95_penalty: float = HD95_PENALTY,
) -> dict[str, float]:
    """The :data:`METRICS` of one region: two ``H x W x D`` masks, ``spacing`` in mm."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.ndim != 3 or pred.shape != ref.shape:
        raise ValueError(f"expected two H x W x D masks of the same shape, got {pred.shape} and {ref.shape}")
    voxel_volume = float(np.prod(spacing))
    components, _ = ndimage.label(pred, structure=_CONNECT)
    component_boxes = ndimage.find_objects(components)
    lesions, n_lesions = ndimage.label(_dilate(ref, dilation), structure=_CONNECT)
    lesions[~ref] = 0  # each dilated component cut back to the reference: reference lesions merged by dilation
    matched_any: set[int] = set()
    dice, hd95, tp, fn, small = [], [], 0, 0, 0
    for index, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:
            continue
        box = _grow(box, dilation, ref.shape)
        lesion = lesions[box] == index
        zone = _dilate(lesion, dilation)
        matched = [int(c) for c in np.unique(components[box][zone]) if c]
        matched_any.update(matched)
        if np.count_nonzero(lesion) * voxel_volume <= min_volume:
            small += 1
            continue
        if not matched:
            fn += 1
            dice.append(0.0)
            hd95.append(hd95_penalty)
            continue
        tp += 1
        union = _union([box, *(component_boxes[c - 1] for c in matched)])
        reference = np.zeros([s.stop - s.start for s in union], dtype=bool)
        reference[tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union, strict=True))] = lesion
        scores = region_scores(np.isin(components[union], matched), reference, spacing, hd95="max")
        dice.append(scores["dice"])
        hd95.append(scores["hd95"])
    fp = int(components.max()) - len(matched_any)
    n = len(dice) + fp
    return {
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_small": small,
        "lesion_dice": float(sum(dice) / n) if n else 1.0,
        "lesion_hd95": float((sum(hd95) + hd95_penalty * fp) / n) if n else 0.0,
    }


def lesion_scores(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    convention: LabelConvention,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, dict[str, float]]:
    """``{"ET": {...}, "TC": {...}, "WT": {...}}`` of two integer label maps in ``convention`` (labels of no
    region, such as the BraTS 2024 resection cavity, count as background)."""
    return {
        region: region_lesions(
            np.isin(pred_labels, convention.region_labels[region]),
            np.isin(ref_labels, convention.region_labels[region]),
            spacing,
        )
        for region in REGIONS
    }


def rule() -> str:
    """One line stating how these scores were computed, for every report that shows them."""
    return (
        f"Lesions (BraTS 2023 rules): reference components merged when their {DILATION_ITERATIONS}-voxel dilations "
        f"touch; a predicted component matches a lesion it comes within {DILATION_ITERATIONS} voxels of; lesions of "
        f"at most {MIN_LESION_VOLUME:g} mm³ left out; a missed lesion or an unmatched component counts as Dice 0, "
        f"HD95 {HD95_PENALTY:g} mm; nothing on either side: Dice 1, HD95 0"
    )


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=_DILATE, iterations=iterations) if iterations else mask


def _grow(box: tuple[slice, ...], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` widened by ``margin`` voxels on every side, within the volume (a dilation stays inside it)."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape, strict=True))


def _union(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The smallest box holding every box of ``boxes``."""
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(3))
