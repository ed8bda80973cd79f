"""``mstkd score --lesion brats2023``: the BraTS 2023 ranking's lesion rules (mstkd.lesion_brats2023).

Every expected number is worked out by hand in the test from cubes of known size and distance. Where the
3-voxel dilation or the 50 mm³ rule changes the result, the panoptica mode (one-to-one matching, no dilation,
no size rule) is scored on the same masks and must give the other number.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstkd.cli import main
from mstkd.data.labels import get_convention, regions_from_labels
from mstkd.errors import InputError
from mstkd.lesion import check_mode, mode_metrics, mode_scores, stack_scores
from mstkd.lesion_brats2023 import HD95_PENALTY, METRICS, lesion_scores, region_lesions
from tests.helpers import write_nifti

SHAPE = (24, 20, 20)


def cubes(*boxes: tuple[tuple[int, int, int], int]) -> np.ndarray:
    """A mask holding one cube of side ``n`` at ``corner`` for every ``(corner, n)``."""
    mask = np.zeros(SHAPE, dtype=bool)
    for corner, n in boxes:
        mask[tuple(slice(c, c + n) for c in corner)] = True
    return mask


def panoptica_region(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict:
    """The panoptica mode on one region: the masks as whole-tumour labels (label 2, edema, is WT only)."""
    pytest.importorskip("panoptica")
    scores = mode_scores(
        "panoptica", pred.astype(np.uint8) * 2, ref.astype(np.uint8) * 2, get_convention("fets"), spacing
    )
    return scores["WT"]


def test_reference_lesions_whose_dilations_touch_are_one_lesion():
    # Two 4-voxel cubes 2 voxels apart along x (x 2-5 and 8-11): their 3-voxel dilations overlap, so the
    # reference holds one lesion of 128 voxels. The prediction is the first cube: one match, no miss.
    ref, pred = cubes(((2, 5, 5), 4), ((8, 5, 5), 4)), cubes(((2, 5, 5), 4))
    s = region_lesions(pred, ref)
    assert (s["lesion_tp"], s["lesion_fp"], s["lesion_fn"], s["lesion_small"]) == (1, 0, 0, 0)
    assert s["lesion_dice"] == pytest.approx(2 * 64 / (64 + 128))  # 2/3
    # HD95: every predicted surface voxel lies on the reference's surface (0). Of the reference's 112 surface
    # voxels (56 per cube), the first cube's are at 0 and the second's at 3 (16 voxels of its x = 8 face),
    # 4 (12), 5 (12) and 6 (16, the x = 11 face) from the nearest predicted voxel at x = 5. The 95th percentile
    # of the 112 sorted distances falls among the last 16: 6 mm.
    assert s["lesion_hd95"] == pytest.approx(6.0)
    # panoptica: two lesions, one matched exactly (Dice 1, HD95 0) and one missed (Dice 0, HD95 374).
    p = panoptica_region(pred, ref)
    assert (p["lesion_tp"], p["lesion_fp"], p["lesion_fn"]) == (1, 0, 1)
    assert p["lesion_dice"] == pytest.approx(0.5) and p["lesion_hd95"] == pytest.approx(374 / 2)


def test_reference_lesions_of_at_most_50_mm3_are_left_out():
    # A 5-voxel cube (125 voxels) predicted exactly, and a 3-voxel cube (27 voxels, far away) missed.
    ref, pred = cubes(((2, 2, 2), 5), ((15, 12, 12), 3)), cubes(((2, 2, 2), 5))
    s = region_lesions(pred, ref)
    assert (s["lesion_tp"], s["lesion_fp"], s["lesion_fn"], s["lesion_small"]) == (1, 0, 0, 1)
    assert (s["lesion_dice"], s["lesion_hd95"]) == (1.0, 0.0)  # the 27 mm³ miss costs nothing
    # At 2 mm voxels the small cube is 27 x 8 = 216 mm³, so it counts, and it is missed: (1 + 0) / 2, (0 + 374) / 2.
    s2 = region_lesions(pred, ref, (2.0, 2.0, 2.0))
    assert (s2["lesion_tp"], s2["lesion_fn"], s2["lesion_small"]) == (1, 1, 0)
    assert s2["lesion_dice"] == pytest.approx(0.5) and s2["lesion_hd95"] == pytest.approx(187.0)
    p = panoptica_region(pred, ref)  # no size rule: the 27-voxel miss halves the score at 1 mm too
    assert p["lesion_fn"] == 1 and p["lesion_dice"] == pytest.approx(0.5)


def test_a_lesion_predicted_in_pieces_or_just_beside_it_is_matched_not_spurious():
    # A 6-voxel cube (216 voxels) predicted without its x = 5 plane: two pieces of 108 and 72 voxels. Both lie in
    # the lesion's dilation, so the lesion matches their union: Dice 2 x 180 / (180 + 216) = 10/11, no FP.
    ref = cubes(((2, 2, 2), 6))
    pred = ref.copy()
    pred[5] = False
    s = region_lesions(pred, ref)
    assert (s["lesion_tp"], s["lesion_fp"], s["lesion_fn"]) == (1, 0, 0)
    assert s["lesion_dice"] == pytest.approx(10 / 11)
    # HD95: the reference's x = 5 ring (20 of its 152 surface voxels, 13 %) is 1 mm from the pieces, the rest 0;
    # of the pieces' 164 surface voxels, the 4 centres of the x = 4 face are 2 mm from the reference's surface
    # (under 5 %) and 28 more are 1 mm: both 95th percentiles are 1 mm.
    assert s["lesion_hd95"] == pytest.approx(1.0)
    p = panoptica_region(pred, ref)  # one-to-one: the larger piece matches, the other is a false positive
    assert (p["lesion_tp"], p["lesion_fp"]) == (1, 1)

    # A 4-voxel cube predicted 2 voxels beside the lesion (x 8-11 against 2-5): within its dilation, so it is
    # matched (TP, Dice 0, not a false positive); each cube's faces lie 3, 4, 5 and 6 mm from the other's, 6 mm
    # at the 95th percentile. A further voxel far away is a false positive: (0 + 0) / 2 and (6 + 374) / 2.
    ref, pred = cubes(((2, 5, 5), 4)), cubes(((8, 5, 5), 4))
    s = region_lesions(pred, ref)
    assert (s["lesion_tp"], s["lesion_fp"], s["lesion_fn"]) == (1, 0, 0)
    assert (s["lesion_dice"], s["lesion_hd95"]) == (0.0, pytest.approx(6.0))
    pred[20, 18, 18] = True
    s = region_lesions(pred, ref)
    assert (s["lesion_tp"], s["lesion_fp"]) == (1, 1)
    assert s["lesion_hd95"] == pytest.approx((6.0 + HD95_PENALTY) / 2)
    p = panoptica_region(pred, ref)  # no overlap: one miss and two false positives
    assert (p["lesion_tp"], p["lesion_fp"], p["lesion_fn"]) == (0, 2, 1)


def test_empty_sides_follow_the_scripts_edge_cases():
    empty = np.zeros(SHAPE, dtype=bool)
    assert region_lesions(empty, empty) == dict(zip(METRICS, (0, 0, 0, 0, 1.0, 0.0), strict=True))
    spurious = region_lesions(cubes(((2, 2, 2), 2), ((10, 10, 10), 2)), empty)
    assert (spurious["lesion_fp"], spurious["lesion_dice"], spurious["lesion_hd95"]) == (2, 0.0, HD95_PENALTY)
    # A small lesion matched and nothing else: no lesion is scored and nothing is spurious (0 / 0 -> Dice 1).
    small = cubes(((2, 2, 2), 3))
    assert region_lesions(small, small) == dict(zip(METRICS, (0, 0, 0, 1, 1.0, 0.0), strict=True))


def test_regions_come_from_the_label_convention_and_the_cavity_is_background():
    # BraTS 2024 labels: 1 NETC, 2 ED, 3 ET, 4 resection cavity. A 4-cube of ET inside a 6-cube of edema.
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[cubes(((2, 2, 2), 6))] = 2
    ref[cubes(((3, 3, 3), 4))] = 3
    pred = ref.copy()
    pred[cubes(((14, 12, 12), 5))] = 4  # a cavity is in no region: not a false positive
    scores = lesion_scores(pred, ref, get_convention("brats2023"))
    assert all(scores[r]["lesion_dice"] == 1.0 and scores[r]["lesion_fp"] == 0 for r in ("ET", "TC", "WT"))
    pred[cubes(((14, 12, 12), 5))] = 2  # as edema it is a WT lesion of its own, far away: WT (1 + 0) / 2
    scores = lesion_scores(pred, ref, get_convention("brats2023"))
    assert scores["WT"]["lesion_fp"] == 1 and scores["WT"]["lesion_dice"] == pytest.approx(0.5)
    assert scores["ET"]["lesion_dice"] == 1.0 and scores["TC"]["lesion_dice"] == 1.0


def test_modes_are_checked_and_brats2023_needs_no_panoptica():
    check_mode("brats2023")  # scipy only: passes whether panoptica is installed or not
    with pytest.raises(InputError, match="choose one of panoptica, brats2023"):
        check_mode("brats2022")
    assert mode_metrics("brats2023") == METRICS and "lesion_nsd" in mode_metrics("panoptica")


def test_score_lesion_brats2023_on_a_folder_and_a_pair(tmp_path, capsys):
    conv = get_convention("fets")
    preds, refs = tmp_path / "preds", tmp_path / "refs"
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[cubes(((2, 5, 5), 4), ((8, 5, 5), 4))] = conv.edema  # the two cubes of the merging test, as WT
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[cubes(((2, 5, 5), 4))] = conv.edema
    write_nifti(refs / "Case_001.nii.gz", ref)
    write_nifti(preds / "Case_001.nii.gz", pred)
    csv = tmp_path / "scores.csv"
    args = ["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--labels", "fets", "--quiet"]
    assert main([*args, "--lesion", "brats2023", "--csv", str(csv)]) == 0
    table = capsys.readouterr().out
    assert "| WT | 1 | 0 | 0 | 0 | 0.6667 ± 0.0000 | 6.00 ± 0.00 |" in table and "BraTS 2023 rules" in table
    header = csv.read_text().splitlines()[0].split(",")
    assert "WT_lesion_small" in header and "WT_lesion_nsd" not in header
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lesion_mode"] == "brats2023" and summary["mean"]["WT_lesion_dice"] == pytest.approx(2 / 3)

    pair = ["--pred", str(preds / "Case_001.nii.gz"), "--ref", str(refs / "Case_001.nii.gz"), "--labels", "fets"]
    assert main(["score", *pair, "--lesion", "brats2023", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["WT"]["lesion_dice"] == pytest.approx(2 / 3) and scores["WT"]["lesion_hd95"] == pytest.approx(6.0)
    assert scores["ET"]["lesion_dice"] == 1.0  # no ET on either side


@pytest.mark.parametrize("mode", ["brats2023", "panoptica"])
def test_evaluation_scores_region_stacks_as_scoring_scores_label_maps(mode):
    """mstkd evaluate holds nested ET, TC, WT stacks, not label maps: each mode scores them the same either way."""
    if mode == "panoptica":
        pytest.importorskip("panoptica")
    conv = get_convention("brats2023")
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[cubes(((2, 2, 2), 8))] = conv.edema
    ref[cubes(((3, 3, 3), 5))] = conv.enhancing
    ref[cubes(((4, 4, 4), 2))] = conv.necrosis
    pred = ref.copy()
    pred[cubes(((14, 12, 12), 4))] = conv.enhancing  # a spurious lesion in every region
    pred[cubes(((2, 2, 2), 8)) & (ref == conv.edema)] = 0  # and the edema missed (WT still overlaps)
    stacks = [regions_from_labels(x, conv) for x in (pred, ref)]
    assert stack_scores(mode, *stacks) == mode_scores(mode, pred, ref, conv)
