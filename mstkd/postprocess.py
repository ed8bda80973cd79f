"""Post-processing of a prediction: the small-enhancing-tumour rule of the RFNet protocol, in millimetres.

RFNet, mmFormer, M2FTrans, DeMoSeg and many BraTS entries drop a case's predicted enhancing tumour (ET) when it
covers fewer than 500 voxels. Without T1ce a model tends to mark a few scattered voxels enhancing, and in a case
without ET a single one scores that case's ET Dice 0 and its HD95 the volume's diagonal. The rule counts voxels of
BraTS's 1 mm grid; here it is a volume, 500 mm³ there, so that it means the same at any voxel size (a model trained
at 2.5 mm sees 32 of its voxels in 500 mm³).

A dropped ET becomes necrosis (NETC): TC and WT keep its voxels and only ET changes, as in the RFNet protocol,
where only the ET score moves. ``mstkd evaluate`` reports ET with and without the rule (``eval.et_min_mm3``); it is
chosen on validation cases, and ``mstkd predict --et-min-mm3`` applies it to the label maps it writes. Both decide on
the grid the model works at (its training voxel size), so that they drop the same cases. ``mstkd ensemble``, whose
models may work at different voxel sizes, decides on the case's own grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mstkd.errors import InputError

ET_MIN_MM3 = 500.0
"""The RFNet protocol's threshold: 500 voxels of 1 mm³."""

MAX_ET_MIN_MM3 = 1.0e6
"""The largest threshold accepted: a litre, far above any enhancing tumour; a larger one would drop every ET."""


def describe(min_mm3: float) -> str:
    """The rule at ``min_mm3`` in words, naming the RFNet protocol where it is its threshold."""
    protocol = " (the RFNet protocol's 500 voxels of 1 mm)" if min_mm3 == ET_MIN_MM3 else ""
    return f"a case's predicted ET under {min_mm3:g} mm³ becomes necrosis{protocol}; TC and WT do not change"


def stamp(min_mm3: float, dropped: bool) -> str:
    """What a label map's header says of the rule: `` et<500.0`` (its threshold's shortest exact decimal), followed
    by ``!`` where it dropped the case's ET; nothing when the rule is off."""
    return f" et<{min_mm3!r}{'!' if dropped else ''}" if min_mm3 else ""


def check_threshold(min_mm3: float, what: str = "--et-min-mm3") -> float:
    """``min_mm3`` as a float when it lies in 0 .. :data:`MAX_ET_MIN_MM3`.

    Raises:
        InputError: a negative, too large or NaN threshold, in one line beginning with ``what``.
    """
    if not 0 <= min_mm3 <= MAX_ET_MIN_MM3:  # NaN fails too
        raise InputError(f"{what} {min_mm3:g}: give a volume between 0 and {MAX_ET_MIN_MM3:g} mm³")
    return float(min_mm3)


def voxel_mm3(spacing: Sequence[float]) -> float:
    """The volume of one voxel in mm³."""
    return float(math.prod(float(s) for s in spacing))


def et_volume_mm3(regions: np.ndarray, spacing: Sequence[float]) -> float:
    """The predicted ET's volume in mm³ (``regions``: ``3 x H x W x D`` boolean ET, TC, WT)."""
    return float(np.count_nonzero(regions[0])) * voxel_mm3(spacing)


def drops_et(regions: np.ndarray, spacing: Sequence[float], min_mm3: float) -> bool:
    """Whether the rule at ``min_mm3`` drops this prediction's ET: there is some, and less than ``min_mm3``."""
    volume = et_volume_mm3(regions, spacing)
    return 0 < volume < min_mm3


def without_et(regions: np.ndarray) -> np.ndarray:
    """A copy of ``regions`` with ET emptied and TC and WT unchanged (a label map then shows necrosis there)."""
    out = regions.copy()
    out[0] = False
    return out


def suppress_small_et(regions: np.ndarray, spacing: Sequence[float], min_mm3: float) -> tuple[np.ndarray, bool]:
    """``regions`` :func:`without_et` when :func:`drops_et`, else as they are, and whether ET was dropped.
    ``min_mm3`` 0 changes nothing."""
    if not drops_et(regions, spacing, min_mm3):
        return regions, False
    return without_et(regions), True


def postprocessed_et_scores(
    regions: np.ndarray, ref_et: np.ndarray, raw: dict, spacing: Sequence[float], min_mm3: float, empty_hd95: float
) -> dict[str, float]:
    """The ET scores after the rule, beside a prediction's raw ``raw`` ET scores (``dice``, ``hd95``):
    ``ET_pp_dice``, ``ET_pp_hd95`` and ``ET_pp_dropped`` (1 where the rule dropped ET). A dropped ET scores as an
    empty prediction: Dice 1 and HD95 0 against a reference without ET, else Dice 0 and ``empty_hd95``."""
    if not drops_et(regions, spacing, min_mm3):
        return {"ET_pp_dice": raw["dice"], "ET_pp_hd95": raw["hd95"], "ET_pp_dropped": 0.0}
    has_et = bool(np.any(ref_et))
    return {
        "ET_pp_dice": 0.0 if has_et else 1.0,
        "ET_pp_hd95": float(empty_hd95) if has_et else 0.0,
        "ET_pp_dropped": 1.0,
    }
