"""BraTS lesion-wise scores through panoptica (mstkd.lesion) and ``mstkd score --lesion``.

panoptica is an optional extra: every test that runs it skips when it is not installed
(scripts/env.sh installs it, so CI runs them).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from scipy import ndimage

from mstkd.cli import main
from mstkd.data.labels import REGIONS, get_convention
from mstkd.lesion import LESION_HD95_PENALTY, LESION_METRICS, evaluate_lesions, lesion_scores, penalised_mean
from mstkd.metrics import region_scores, score_labels
from tests.helpers import write_nifti

SHAPE = (32, 30, 24)


@pytest.fixture
def panoptica():
    return pytest.importorskip("panoptica")


def blob(rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Random lumpy mask (several components): smoothed noise above its (1 - fraction) quantile."""
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.5)
    return noise > np.quantile(noise, 1 - fraction)


def random_labels(rng: np.random.Generator, enhancing: int, cavity: bool = False) -> np.ndarray:
    """Edema, enhancing and necrosis blobs in that order of precedence (and a resection cavity, label 4)."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[blob(rng, 0.15)] = 2
    seg[blob(rng, 0.06)] = enhancing
    seg[blob(rng, 0.03)] = 1
    if cavity:
        seg[blob(rng, 0.02)] = 4
    return seg


def cube(seg: np.ndarray, corner: tuple[int, int, int], size: int, label: int) -> None:
    seg[tuple(slice(c, c + size) for c in corner)] = label


# --- agreement with mstkd.metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("convention,enhancing", [("fets", 4), ("brats2023", 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_global_dice_agrees_with_our_metrics(panoptica, convention, enhancing, seed):
    rng = np.random.default_rng(seed)
    pred, ref = random_labels(rng, enhancing), random_labels(rng, enhancing)
    conv = get_convention(convention)
    spacing = (1.0, 1.2, 2.0)
    ours = score_labels(pred, ref, conv, spacing)
    theirs = evaluate_lesions(pred, ref, conv, spacing)
    for region in REGIONS:
        assert theirs[region].tp > 0 and theirs[region].fp + theirs[region].fn > 0  # a real lesion-wise case
        assert float(theirs[region].global_bin_dsc) == pytest.approx(ours[region]["dice"], abs=1e-12)


def test_label_conventions_give_the_same_lesions_and_the_cavity_is_background(panoptica):
    rng = np.random.default_rng(2)
    pred, ref = random_labels(rng, 4), random_labels(rng, 4)
    fets = lesion_scores(pred, ref, get_convention("fets"))
    as_2023 = [np.where(seg == 4, 3, seg).astype(np.uint8) for seg in (pred, ref)]
    cavity = blob(rng, 0.02) & (as_2023[0] == 0)
    as_2023[0][cavity] = 4  # resection cavity: part of no region
    assert cavity.any()
    assert lesion_scores(*as_2023, get_convention("brats2023")) == fets


# --- a case whose lesions are counted by hand --------------------------------------------------------------


@pytest.mark.parametrize("convention,enhancing", [("fets", 4), ("brats2023", 3)])
def test_one_matched_one_missed_one_spurious_lesion(panoptica, convention, enhancing):
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    cube(ref, (3, 3, 3), 6, enhancing)  # lesion A
    cube(pred, (4, 3, 3), 6, enhancing)  # A shifted by one voxel: 5·6·6 of 6·6·6 voxels overlap, Dice 5/6
    cube(ref, (20, 3, 3), 4, enhancing)  # lesion B: missed
    cube(pred, (3, 20, 14), 4, enhancing)  # lesion C: spurious
    spacing = (2.0, 1.2, 1.0)  # the shift is along the first axis: the matched HD95 is in mm, not voxels
    scores = lesion_scores(pred, ref, get_convention(convention), spacing)

    # The matched pair's HD95 by our own implementation, with panoptica's (pooled) definition.
    a_pred, a_ref = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    cube(a_pred, (4, 3, 3), 6, 1)
    cube(a_ref, (3, 3, 3), 6, 1)
    matched_hd95 = region_scores(a_pred, a_ref, spacing, hd95="pooled")["hd95"]
    assert matched_hd95 > 0 and matched_hd95 != region_scores(a_pred, a_ref, hd95="pooled")["hd95"]
    for region in REGIONS:  # every lesion is enhancing tumour, so ET = TC = WT
        s = scores[region]
        assert set(s) == set(LESION_METRICS)
        assert (s["lesion_tp"], s["lesion_fp"], s["lesion_fn"]) == (1, 1, 1)
        assert s["lesion_sq_dice"] == pytest.approx(5 / 6)
        assert s["lesion_dice"] == pytest.approx((5 / 6) / 3)  # Σ matched Dice / (TP + FP + FN)
        assert s["lesion_sq_hd95"] == pytest.approx(matched_hd95)
        assert s["lesion_hd95"] == pytest.approx((matched_hd95 + 2 * LESION_HD95_PENALTY) / 3)
        assert 0 < s["lesion_nsd"] == pytest.approx(s["lesion_sq_nsd"] / 3)


def test_empty_cases_follow_the_brats_rules(panoptica):
    conv = get_convention("brats2023")
    empty = np.zeros(SHAPE, dtype=np.uint8)
    lesion = empty.copy()
    cube(lesion, (5, 5, 5), 4, 2)  # edema only: WT has a lesion, ET and TC have none

    both_empty = lesion_scores(empty, empty, conv)["ET"]
    assert (both_empty["lesion_dice"], both_empty["lesion_hd95"], both_empty["lesion_nsd"]) == (1.0, 0.0, 1.0)
    assert math.isnan(both_empty["lesion_sq_dice"])  # panoptica: no lesion on either side

    spurious = lesion_scores(lesion, empty, conv)
    assert spurious["ET"]["lesion_dice"] == 1.0  # no ET anywhere
    wt = spurious["WT"]
    assert (wt["lesion_tp"], wt["lesion_fp"], wt["lesion_fn"]) == (0, 1, 0)
    assert (wt["lesion_dice"], wt["lesion_hd95"]) == (0.0, LESION_HD95_PENALTY)
    assert wt["lesion_sq_dice"] == 0.0 and wt["lesion_sq_hd95"] == math.inf  # the official edge cases

    missed = lesion_scores(empty, lesion, conv)["WT"]
    assert (missed["lesion_tp"], missed["lesion_fp"], missed["lesion_fn"]) == (0, 0, 1)
    assert (missed["lesion_dice"], missed["lesion_hd95"]) == (0.0, LESION_HD95_PENALTY)


def test_penalised_mean_formula():
    assert penalised_mean(0.9, 2, 1, 1, penalty=0.0, empty=1.0) == pytest.approx(1.8 / 4)
    assert penalised_mean(3.0, 2, 1, 0, penalty=374.0, empty=0.0) == pytest.approx((6 + 374) / 3)
    assert penalised_mean(float("inf"), 0, 2, 1, penalty=374.0, empty=0.0) == 374.0  # mean unread when TP = 0
    assert penalised_mean(float("nan"), 0, 0, 0, penalty=374.0, empty=0.0) == 0.0


# --- mstkd score --lesion ----------------------------------------------------------------------------------


def _folders(tmp_path):
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    rng = np.random.default_rng(3)
    for i in range(2):
        write_nifti(preds / f"FeTS2022_0000{i}.nii.gz", random_labels(rng, 4))
        write_nifti(refs / f"FeTS2022_0000{i}.nii.gz", random_labels(rng, 4))
    return preds, refs


def test_cli_score_lesion_adds_columns_and_a_summary(panoptica, tmp_path, capsys):
    import pandas as pd

    preds, refs = _folders(tmp_path)
    csv = tmp_path / "scores.csv"
    args = ["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--csv", str(csv), "--quiet"]
    assert main([*args, "--lesion"]) == 0
    out = capsys.readouterr().out
    assert "| Region | TP | FP | FN |" in out and "HD95 374 mm" in out
    table = pd.read_csv(csv).set_index("case")
    for region in REGIONS:
        for metric in LESION_METRICS:
            assert f"{region}_{metric}" in table.columns
    cases = table.loc[["FeTS2022_00000", "FeTS2022_00001"]]
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("statistic")
    assert summary.loc["mean", "WT_lesion_dice"] == pytest.approx(cases["WT_lesion_dice"].mean())
    assert summary.loc["sd", "ET_lesion_hd95"] == pytest.approx(cases["ET_lesion_hd95"].std())
    assert (cases["TC_dice"] >= 0).all()  # the usual columns stay

    assert main([*args[:-3], "--json"]) == 0  # without --lesion: no lesion columns
    assert "WT_lesion_dice" not in json.loads(capsys.readouterr().out)["cases"][0]


def test_cli_score_lesion_one_pair_json(panoptica, tmp_path, capsys):
    preds, refs = _folders(tmp_path)
    pair = ["--pred", str(preds / "FeTS2022_00000.nii.gz"), "--ref", str(refs / "FeTS2022_00000.nii.gz")]
    assert main(["score", *pair, "--lesion", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert set(scores) == set(REGIONS)
    assert all(set(LESION_METRICS) <= set(v) and "dice" in v for v in scores.values())


def test_cli_score_json_is_strict_where_a_region_has_no_lesion(panoptica, tmp_path, capsys):
    seg = np.zeros(SHAPE, dtype=np.uint8)
    cube(seg, (5, 5, 5), 4, 2)  # edema only: no ET lesion on either side, panoptica's ET means are NaN
    write_nifti(tmp_path / "pred.nii.gz", seg)
    write_nifti(tmp_path / "ref.nii.gz", seg)
    pair = ["--pred", str(tmp_path / "pred.nii.gz"), "--ref", str(tmp_path / "ref.nii.gz")]
    assert main(["score", *pair, "--lesion", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert scores["ET"]["lesion_sq_dice"] is None and scores["ET"]["lesion_dice"] == 1.0


def test_cli_score_lesion_without_panoptica_says_how_to_install(tmp_path, capsys, monkeypatch):
    preds, refs = _folders(tmp_path)
    monkeypatch.setitem(sys.modules, "panoptica", None)  # `import panoptica` now raises ImportError
    assert main(["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--lesion", "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install --no-deps panoptica==" in lines[0]
    assert captured.out == "" and "Traceback" not in captured.err
