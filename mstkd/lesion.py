"""BraTS lesion-wise scores per tumour region: two modes, and the panoptica one (an optional extra).

``mstkd score --lesion MODE`` picks one of :data:`LESION_MODES` (:func:`mode_scores`): ``brats2023``
(:mod:`mstkd.lesion_brats2023`, the BraTS 2023 ranking's dilation and size rules, scipy only) or
``panoptica``, the panoptica-based evaluation (the ``brats-evaluation`` package), which the rest of this
module computes:

Each region (ET, TC, WT) of a label map is split into lesions, its 26-connected components,
and the predicted lesions are matched one-to-one to the reference lesions as the official
BraTS 2023+ evaluation (the ``brats-evaluation`` package, built on panoptica) configures it:
semantic input, connected components (cc3d), maximum bipartite matching on Dice with
threshold 1e-6 (any overlap can match), then Dice, NSD and HD95 of every matched pair.
Nothing here matches lesions itself: :func:`evaluate_lesions` hands the label maps to
``panoptica.Panoptica_Evaluator`` and the rest reads its results.

With TP matched lesions, FP predicted lesions without a match and FN reference lesions
without a match, per region:

- **lesion_tp, lesion_fp, lesion_fn**: those counts.
- **lesion_dice** = Σ_matched Dice / (TP + FP + FN), **lesion_nsd** likewise, and
  **lesion_hd95** = (Σ_matched HD95 + 374 · (FP + FN)) / (TP + FP + FN): the BraTS 2023
  lesion-wise score, in which every missed or spurious lesion counts as Dice 0 (NSD 0) and
  HD95 374 mm. No lesion on either side: Dice 1, NSD 1, HD95 0.
- **lesion_sq_dice, lesion_sq_hd95, lesion_sq_nsd**: panoptica's segmentation quality, the
  mean over the matched lesions only (what ``brats-parse-metrics seg`` reports as
  ``lesionwise_*_mean``); with no match panoptica's edge cases apply as the official config
  sets them: Dice and NSD 0 and HD95 inf when some lesion exists, NaN when none does.

Per lesion, HD95 is the pooled 95th percentile of both directed surface distance sets in mm
(:mod:`mstkd.metrics` with ``hd95="pooled"``), and NSD the normalised surface Dice with the
smallest voxel spacing as its tolerance. The whole-region scores stay with :mod:`mstkd.metrics`:
panoptica 2.1.7 computes its global HD95 and NSD without the voxel spacing (in voxels, NSD
tolerance 0.5 voxel), so of those only its global Dice is requested, as a cross-check
(``result.global_bin_dsc``). Unlike the BraTS 2023 lesion-wise script, reference lesions are
not merged by dilation and small ones are not dropped: this is the panoptica-based evaluation.

panoptica pins rich<14, which Flower's rich 14 rules out, so it is installed without its
pins on top of the ``lesion`` extra: ``pip install '.[lesion]'`` then
``pip install --no-deps panoptica==2.1.7`` (``scripts/env.sh`` does both).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from mstkd.data.cases import bounding_box
from mstkd.data.labels import CONVENTIONS, REGIONS, LabelConvention, labels_from_regions
from mstkd.errors import InputError

PANOPTICA_VERSION = "2.1.7"
"""The panoptica release this module is written and tested against."""

INSTALL_HINT = f"pip install '.[lesion]' && pip install --no-deps panoptica=={PANOPTICA_VERSION}"

LESION_HD95_PENALTY = 374.0
"""HD95 (mm) of a missed or spurious lesion in the BraTS 2023 lesion-wise score."""

MATCHING_THRESHOLD = 1e-6
"""Least Dice of a matched pair of lesions (the official BraTS config): any overlap can match."""

LESION_METRICS: tuple[str, ...] = (
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
    "lesion_dice",
    "lesion_hd95",
    "lesion_nsd",
    "lesion_sq_dice",
    "lesion_sq_hd95",
    "lesion_sq_nsd",
)
"""Keys of every per-region lesion-wise score dict, in report order."""

# Label maps are handed to panoptica in one convention, BraTS 2023's (1 NETC, 2 ED, 3 ET, as the
# official glioma config groups them), so one evaluator serves FeTS and BraTS 2023+ labels.
_CANONICAL = CONVENTIONS["brats2023"]
_CROP_MARGIN = 2  # background voxels kept around the tumour, so surfaces at the crop edge stay surfaces


def require_panoptica() -> None:
    """Refuse, in one line saying how to install it, when panoptica cannot be imported.

    Raises:
        InputError: panoptica is not installed.
    """
    try:
        import panoptica  # noqa: F401
    except ImportError:
        raise InputError(f"lesion-wise scores need panoptica, which is not installed: {INSTALL_HINT}") from None


@cache
def _evaluator() -> Any:
    """The panoptica evaluator of the official BraTS glioma config, restricted to ET, TC and WT."""
    require_panoptica()
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, MaxBipartiteMatching, Metric
    from panoptica import Panoptica_Evaluator as Evaluator
    from panoptica.utils.citation_reminder import disable_citation_reminder
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling
    from panoptica.utils.label_group import LabelMergeGroup
    from panoptica.utils.segmentation_class import SegmentationClassGroups

    # The reminder prints to stdout, which `mstkd score --json` keeps for JSON; the docs cite panoptica instead.
    disable_citation_reminder()
    with contextlib.redirect_stdout(io.StringIO()):  # TC and WT share labels on purpose; panoptica prints a note
        groups = SegmentationClassGroups(
            {r.lower(): LabelMergeGroup(list(v)) for r, v in _CANONICAL.region_labels.items()}
        )

    def zero_tp(missing: EdgeCaseResult) -> Any:
        return MetricZeroTPEdgeCaseHandling(
            empty_prediction_result=missing,
            empty_reference_result=missing,
            no_instances_result=EdgeCaseResult.NAN,
            normal=missing,
        )

    return Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=MATCHING_THRESHOLD),
        edge_case_handler=EdgeCaseHandler(
            listmetric_zeroTP_handling={
                Metric.DSC: zero_tp(EdgeCaseResult.ZERO),
                Metric.NSD: zero_tp(EdgeCaseResult.ZERO),
                Metric.HD95: zero_tp(EdgeCaseResult.INF),
            },
            empty_list_std=EdgeCaseResult.NAN,
        ),
        instance_metrics=[Metric.DSC, Metric.NSD, Metric.HD95],
        global_metrics=[Metric.DSC],
        segmentation_class_groups=groups,
    )


def evaluate_lesions(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    convention: LabelConvention,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, Any]:
    """panoptica's result for each region of two ``H x W x D`` integer label maps: ``{"ET": PanopticaResult, ...}``.

    Labels outside every region of ``convention`` (background, the BraTS 2024 resection cavity)
    count as background. Both maps are cropped to the tumour of either plus a margin first, which
    changes the speed only: every lesion and surface lies inside the crop.

    Raises:
        InputError: panoptica is not installed.
        ValueError: the maps differ in shape or are not 3-D.
    """
    evaluator = _evaluator()
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.ndim != 3 or pred_labels.shape != ref_labels.shape:
        raise ValueError(
            f"expected two H x W x D label maps of the same shape, got {pred_labels.shape} and {ref_labels.shape}"
        )
    wt = convention.region_labels["WT"]
    box = bounding_box(np.isin(pred_labels, wt) | np.isin(ref_labels, wt), margin=_CROP_MARGIN)
    crop = tuple(slice(a, b) for a, b in box)
    results = evaluator.evaluate(
        _canonical(pred_labels[crop], convention),
        _canonical(ref_labels[crop], convention),
        voxelspacing=tuple(float(s) for s in spacing),
    )
    return {region: results[region.lower()] for region in REGIONS}


def lesion_scores(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    convention: LabelConvention,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    hd95_penalty: float = LESION_HD95_PENALTY,
) -> dict[str, dict[str, float]]:
    """Lesion-wise scores of two label maps, ``{"ET": {...}, "TC": {...}, "WT": {...}}`` with :data:`LESION_METRICS`.

    See the module docstring for each score; ``hd95_penalty`` is the HD95 of an unmatched lesion.
    """
    return {
        region: region_lesion_scores(result, hd95_penalty=hd95_penalty)
        for region, result in evaluate_lesions(pred_labels, ref_labels, convention, spacing).items()
    }


def region_lesion_scores(result: Any, *, hd95_penalty: float = LESION_HD95_PENALTY) -> dict[str, float]:
    """The :data:`LESION_METRICS` of one region from its panoptica result (a ``PanopticaResult``)."""
    tp, fp, fn = int(result.tp), int(result.fp), int(result.fn)
    sq = {m: float(getattr(result, f"sq_{m}")) for m in ("dsc", "hd95", "nsd")}
    return {
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_dice": penalised_mean(sq["dsc"], tp, fp, fn, penalty=0.0, empty=1.0),
        "lesion_hd95": penalised_mean(sq["hd95"], tp, fp, fn, penalty=hd95_penalty, empty=0.0),
        "lesion_nsd": penalised_mean(sq["nsd"], tp, fp, fn, penalty=0.0, empty=1.0),
        "lesion_sq_dice": sq["dsc"],
        "lesion_sq_hd95": sq["hd95"],
        "lesion_sq_nsd": sq["nsd"],
    }


def penalised_mean(matched_mean: float, tp: int, fp: int, fn: int, *, penalty: float, empty: float) -> float:
    """(TP · ``matched_mean`` + ``penalty`` · (FP + FN)) / (TP + FP + FN); ``empty`` when there is no lesion at all.

    ``matched_mean`` is the mean score of the TP matched lesions and is not read when TP = 0.
    """
    n = tp + fp + fn
    if n == 0:
        return empty
    matched = tp * matched_mean if tp else 0.0
    return float((matched + penalty * (fp + fn)) / n)


def format_lesion_scores(scores: dict[str, dict[str, float]], mode: str = "panoptica") -> str:
    """A plain-text table: one row per region, the lesion counts and the penalised lesion-wise scores of ``mode``
    (with ``mode``'s rule below it)."""
    counts, scored = mode_columns(mode)
    lines = [f"{'region':<8}" + "".join(f"{k:>13}" for k in counts) + "".join(f"{'lesion ' + m:>13}" for m in scored)]
    for region, s in scores.items():
        cells = [f"{int(s[f'lesion_{k}']):>13}" for k in counts]
        cells += [f"{s[f'lesion_{m}']:>13.{2 if m == 'hd95' else 4}f}" for m in scored]
        lines.append(f"{region:<8}" + "".join(cells))
    lines.append(mode_rule(mode))
    return "\n".join(lines)


def lesion_rule(hd95_penalty: float = LESION_HD95_PENALTY) -> str:
    """One line stating how the lesion-wise scores were computed, for every report that shows them."""
    return (
        f"Lesions (panoptica {PANOPTICA_VERSION}, BraTS config): 26-connected components matched one-to-one on any "
        f"overlap; a missed or spurious lesion counts as Dice 0, HD95 {hd95_penalty:g} mm; no lesion on either side: "
        "Dice 1, HD95 0; HD95 of a matched pair: pooled P95"
    )


def _canonical(labels: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """``labels`` as uint8 1 NETC, 2 ED, 3 ET, 0 elsewhere (any label of no region, e.g. resection cavity)."""
    out = np.zeros(labels.shape, dtype=np.uint8)
    for name in ("necrosis", "edema", "enhancing"):
        out[labels == getattr(convention, name)] = getattr(_CANONICAL, name)
    return out


# --- modes -------------------------------------------------------------------------------------------------

LESION_MODES = ("panoptica", "brats2023")
"""``panoptica``: this module (one-to-one matching, no dilation, no size rule, NSD too); ``brats2023``: the BraTS
2023 ranking's rules (:mod:`mstkd.lesion_brats2023`: lesions merged and matched by a 3-voxel dilation, lesions of
at most 50 mm³ left out)."""


def check_mode(mode: str) -> None:
    """Refuse an unknown mode, or the panoptica mode without panoptica, in one line, before any work.

    Raises:
        InputError: as said.
    """
    if mode not in LESION_MODES:
        raise InputError(f"lesion mode {mode!r}: choose one of {', '.join(LESION_MODES)}")
    if mode == "panoptica":
        require_panoptica()


def mode_metrics(mode: str) -> tuple[str, ...]:
    """The per-region keys that ``mode`` scores."""
    from mstkd import lesion_brats2023

    return {"panoptica": LESION_METRICS, "brats2023": lesion_brats2023.METRICS}[_known(mode)]


def mode_columns(mode: str) -> tuple[list[str], list[str]]:
    """The lesion counts (``tp``, ``fp``, ``fn``, ``small``) and scores (``dice``, ``hd95``, ``nsd``) that ``mode``
    gives, each in report order: what every table of lesion-wise scores shows."""
    keys = mode_metrics(mode)
    counts = [k for k in ("tp", "fp", "fn", "small") if f"lesion_{k}" in keys]
    return counts, [k for k in ("dice", "hd95", "nsd") if f"lesion_{k}" in keys]


def mode_scores(
    mode: str,
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    convention: LabelConvention,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, dict[str, float]]:
    """``{"ET": {...}, "TC": {...}, "WT": {...}}``: the lesion-wise scores of ``mode`` (its :func:`mode_metrics`)."""
    from mstkd import lesion_brats2023

    if _known(mode) == "panoptica":
        return lesion_scores(pred_labels, ref_labels, convention, spacing)
    return lesion_brats2023.lesion_scores(pred_labels, ref_labels, convention, spacing)


def stack_scores(
    mode: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, dict[str, float]]:
    """:func:`mode_scores` of two ``3 x H x W x D`` nested region stacks (ET, TC, WT), as evaluation holds them."""
    from mstkd import lesion_brats2023

    if _known(mode) == "brats2023":
        return {r: lesion_brats2023.region_lesions(pred[i], ref[i], spacing) for i, r in enumerate(REGIONS)}
    return lesion_scores(
        labels_from_regions(pred, _CANONICAL), labels_from_regions(ref, _CANONICAL), _CANONICAL, spacing
    )


def mode_rule(mode: str) -> str:
    """The one line that says how ``mode`` scores lesions."""
    from mstkd import lesion_brats2023

    return lesion_rule() if _known(mode) == "panoptica" else lesion_brats2023.rule()


def _known(mode: str) -> str:
    if mode not in LESION_MODES:
        raise ValueError(f"lesion mode {mode!r}: expected one of {', '.join(LESION_MODES)}")
    return mode
