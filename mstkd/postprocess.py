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

Choosing it needs one inference pass, as nnU-Net's ``determine_postprocessing``: a case's ET scores under any
threshold follow from its raw scores, its predicted ET volume and whether its reference has ET, so
``mstkd evaluate --split val --et-sweep`` scores every candidate from the same predictions (:func:`sweep`) and names
the one with the best mean ET Dice, the smallest of those tied (no rule, 0, unless one helps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mstkd.errors import InputError

ET_MIN_MM3 = 500.0
"""The RFNet protocol's threshold: 500 voxels of 1 mm³."""

MAX_ET_MIN_MM3 = 1.0e6
"""The largest threshold accepted: a litre, far above any enhancing tumour; a larger one would drop every ET."""

SWEEP_MM3 = (0.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)
"""The thresholds ``mstkd evaluate --et-sweep`` scores when given none: no rule, and around the RFNet protocol's."""


def describe(min_mm3: float) -> str:
    """The rule at ``min_mm3`` in words, naming the RFNet protocol where it is its threshold."""
    protocol = " (the RFNet protocol's 500 voxels of 1 mm)" if min_mm3 == ET_MIN_MM3 else ""
    return f"a case's predicted ET under {min_mm3:g} mm³ becomes necrosis{protocol}; TC and WT do not change"


def mm3(volume: float) -> str:
    """``volume`` as its shortest exact decimal, without a trailing ``.0``: what ``--et-min-mm3`` reads back."""
    return repr(float(volume)).removesuffix(".0")


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
    return float(min_mm3) + 0.0  # -0 is 0


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


@dataclass(frozen=True)
class EtCase:
    """What the rule's outcome on one prediction (a case under a subset) depends on, for any threshold."""

    volume_mm3: float  # the predicted ET's volume
    has_et: bool  # whether the reference has ET
    dice: float  # the raw ET Dice and HD95
    hd95: float
    empty_hd95: float  # the HD95 an empty prediction scores against a reference with ET

    def scores(self, min_mm3: float) -> tuple[float, float, bool]:
        """ET Dice and HD95 after the rule at ``min_mm3``, and whether it dropped ET. A dropped ET scores as an empty
        prediction: Dice 1 and HD95 0 against a reference without ET, else Dice 0 and ``empty_hd95``."""
        if not 0 < self.volume_mm3 < min_mm3:
            return self.dice, self.hd95, False
        return (0.0, self.empty_hd95, True) if self.has_et else (1.0, 0.0, True)


def sweep(cases: dict[str, list[EtCase]], thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Per threshold, ET Dice and HD95 after the rule and the share of predictions whose ET it dropped, each the mean
    over subsets of the mean over their cases (``cases``: subset name -> its cases' :class:`EtCase`), as the
    evaluation table's average row. Rows ``{"et_min_mm3", "ET_dice", "ET_hd95", "dropped", "best"}``, one per
    threshold and one for 0 (no rule) whether given or not: ``best`` 1 on the threshold with the highest ET Dice, the
    smallest of those tied, so a rule is named only where it scores better than none."""
    rows = []
    for t in sorted({0.0, *thresholds}):
        means = [np.mean([case.scores(t) for case in group], axis=0) for group in cases.values() if group]
        dice, hd95, dropped = np.mean(means, axis=0) if means else (np.nan,) * 3
        rows.append({"et_min_mm3": float(t), "ET_dice": dice, "ET_hd95": hd95, "dropped": dropped, "best": 0.0})
    scored = [row for row in rows if np.isfinite(row["ET_dice"])]
    if scored:
        best = max(row["ET_dice"] for row in scored)
        next(row for row in scored if row["ET_dice"] >= best - 1e-12)["best"] = 1.0
    return [{k: float(v) for k, v in row.items()} for row in rows]


def sweep_markdown(rows: Sequence[dict[str, float]], cases: int) -> list[str]:
    """:func:`sweep`'s rows as a Markdown table, the best in bold, and how to apply it."""
    lines = ["", "| ET threshold (mm³) | Dice ET | HD95 ET | ET dropped |", "|---:|---:|---:|---:|"]
    for row in rows:
        bold = "**" if row["best"] else ""
        lines.append(
            f"| {bold}{mm3(row['et_min_mm3'])}{bold} | {100 * row['ET_dice']:.1f} | {row['ET_hd95']:.2f} "
            f"| {100 * row['dropped']:.0f}% |"
        )
    best = next((row["et_min_mm3"] for row in rows if row["best"]), None)
    if best is None:
        return lines
    use = f"`mstkd predict --et-min-mm3 {mm3(best)}` applies it" if best else "`mstkd predict` without the rule"
    return lines + [
        "",
        f"The small-ET rule at each threshold, scored from the same predictions (mean over {cases} cases). "
        f"Best here: {mm3(best)} mm³ (choose on validation cases, `--split val`); {use}.",
    ]
