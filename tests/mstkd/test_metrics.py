"""Metrics: Dice, HD95, sensitivity, specificity against MONAI, hand counts, files and the ``score`` verb."""

from __future__ import annotations

import gzip
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_dice, compute_hausdorff_distance
from scipy import ndimage
from scipy.spatial.distance import cdist

from mstkd import metrics
from mstkd.cli import main
from mstkd.data.labels import REGIONS, get_convention, regions_from_labels
from mstkd.data.nifti import read_volume
from mstkd.errors import InputError
from mstkd.metrics import (
    format_scores,
    region_scores,
    resolve_labels,
    score_files,
    score_labels,
    score_regions,
    volume_diagonal,
)
from mstkd.scoring import score_folders

KEYS = set(metrics.METRICS)
FETS = get_convention("fets")
BRATS2023 = get_convention("brats2023")


def blob(rng: np.random.Generator, shape, fraction: float = 0.15, sigma: float = 2.0) -> np.ndarray:
    """Random lumpy mask: smoothed noise above its (1 - fraction) quantile."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise > np.quantile(noise, 1 - fraction)


def touches_border(mask: np.ndarray) -> bool:
    return bool(mask[[0, -1]].any() or mask[:, [0, -1]].any() or mask[:, :, [0, -1]].any())


def monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None],
            torch.from_numpy(ref)[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],  # MONAI refuses a sequence that mixes int and float
        )
    return float(hd.item())


def monai_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(ref)[None, None].float()
    return float(compute_dice(y_pred, y, include_background=True, ignore_empty=False).item())


def brute_force_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances by scipy erosion (border counts as background) and all-pairs distances."""
    scale = np.asarray(spacing, dtype=float)
    surf_p = np.argwhere(pred & ~ndimage.binary_erosion(pred, border_value=0)) * scale
    surf_r = np.argwhere(ref & ~ndimage.binary_erosion(ref, border_value=0)) * scale
    pairwise = cdist(surf_p, surf_r)
    return pairwise.min(axis=1), pairwise.min(axis=0)


def write_nifti(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0), affine: np.ndarray | None = None) -> Path:
    if affine is None:
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def tumour_labels(shape=(24, 22, 16), enhancing: int = 4, shift=(0, 0, 0)) -> np.ndarray:
    """A box tumour: edema (2) around an enhancing layer around a necrotic centre (1)."""
    seg = np.zeros(shape, dtype=np.uint8)
    c = [n // 2 + s for n, s in zip(shape, shift, strict=True)]
    seg[c[0] - 7 : c[0] + 7, c[1] - 6 : c[1] + 6, c[2] - 5 : c[2] + 5] = 2
    seg[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] - 3 : c[2] + 3] = enhancing
    seg[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 1 : c[2] + 1] = 1
    return seg


# --- agreement with MONAI ------------------------------------------------------------------------------------

MONAI_CASES = [
    # (seed, shape, spacing, fraction): small and large blobs, isotropic and anisotropic grids;
    # fraction 0.5 makes masks that cover much of every face of the volume.
    (0, (32, 30, 20), (1.0, 1.0, 1.0), 0.10),
    (1, (32, 30, 20), (1.0, 1.0, 2.5), 0.15),
    (2, (28, 36, 18), (0.8, 1.2, 3.0), 0.05),
    (3, (24, 24, 24), (1.0, 1.0, 1.0), 0.50),
    (4, (30, 26, 16), (1.0, 1.0, 2.5), 0.50),
    (5, (40, 40, 10), (0.5, 0.5, 4.0), 0.20),
]


@pytest.mark.parametrize("seed,shape,spacing,fraction", MONAI_CASES)
def test_dice_and_hd95_match_monai(seed, shape, spacing, fraction):
    rng = np.random.default_rng(seed)
    pred = blob(rng, shape, fraction)
    # A reference that overlaps the prediction partly, plus independent lumps of its own.
    ref = (pred & blob(rng, shape, 0.6, sigma=1.5)) | blob(rng, shape, fraction / 2)
    if fraction >= 0.5:
        assert touches_border(pred) and touches_border(ref)
    got = region_scores(pred, ref, spacing)
    assert set(got) == KEYS and all(type(v) is float for v in got.values())
    assert got["dice"] == pytest.approx(monai_dice(pred, ref), abs=1e-6)
    # MONAI computes in float32; our distances are exact float64, hence agreement far inside 0.5 mm.
    assert got["hd95"] == pytest.approx(monai_hd95(pred, ref, spacing), abs=1e-3)
    assert got["hd95"] > 0


@pytest.mark.parametrize("ratio", [0.0, math.inf], ids=["kdtree", "edt"])
@pytest.mark.parametrize("seed,shape,spacing,fraction", MONAI_CASES[:3])
def test_both_distance_methods_match_monai(monkeypatch, ratio, seed, shape, spacing, fraction):
    monkeypatch.setattr(metrics, "EDT_MAX_VOXELS_PER_SURFACE_VOXEL", ratio)
    rng = np.random.default_rng(seed)
    pred = blob(rng, shape, fraction)
    ref = np.roll(pred, (2, -1, 1), axis=(0, 1, 2)) | blob(rng, shape, 0.02)
    for mode in ("max", "pooled"):
        d_pr, d_rp = brute_force_distances(pred, ref, spacing)
        expected = (
            max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
            if mode == "max"
            else np.percentile(np.concatenate([d_pr, d_rp]), 95)
        )
        assert region_scores(pred, ref, spacing, hd95=mode)["hd95"] == pytest.approx(expected, abs=1e-9)
    assert region_scores(pred, ref, spacing)["hd95"] == pytest.approx(monai_hd95(pred, ref, spacing), abs=1e-3)


def test_dice_metric_class_agrees_on_a_region_stack():
    rng = np.random.default_rng(7)
    shape = (20, 22, 14)
    pred = np.stack([blob(rng, shape, f) for f in (0.05, 0.1, 0.2)])
    ref = np.stack([blob(rng, shape, f) | p for f, p in zip((0.03, 0.08, 0.15), pred, strict=True)])
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    metric(y_pred=torch.from_numpy(pred)[None].float(), y=torch.from_numpy(ref)[None].float())
    expected = metric.aggregate()[0].tolist()
    got = score_regions(pred, ref, (1.0, 1.0, 2.0))
    assert list(got) == list(REGIONS)
    assert [got[r]["dice"] for r in REGIONS] == pytest.approx(expected, abs=1e-6)
    for i, region in enumerate(REGIONS):
        assert got[region] == region_scores(pred[i], ref[i], (1.0, 1.0, 2.0))


def test_volume_border_voxels_are_surface_voxels_as_in_monai():
    # A mask filling the whole volume has the volume's outer layer as its surface (outside counts
    # as background), so a prediction missing the first slice is 1 mm off on both sides' P95:
    # the reference's 80 voxels of slice 0 are 16.7% of its 480 surface voxels.
    shape = (12, 10, 8)
    ref = np.ones(shape, dtype=bool)
    pred = ref.copy()
    pred[0] = False
    got = region_scores(pred, ref)
    assert got["hd95"] == pytest.approx(1.0)
    assert got["hd95"] == pytest.approx(monai_hd95(pred, ref, (1.0, 1.0, 1.0)), abs=1e-3)
    assert got["specificity"] == 1.0  # no negatives in the reference at all
    assert region_scores(ref, ref) == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}


# --- empty masks ---------------------------------------------------------------------------------------------


def test_volume_diagonal():
    assert volume_diagonal((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.005)
    assert volume_diagonal((182, 218, 182), (1, 1, 1)) == pytest.approx(337.30, abs=0.005)
    assert volume_diagonal((10, 20, 4), (2.0, 1.0, 2.5)) == pytest.approx(math.sqrt(400 + 400 + 100))


def test_both_empty():
    empty = np.zeros((8, 9, 10), dtype=bool)
    assert region_scores(empty, empty) == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}


def test_prediction_empty_is_a_miss_at_the_volume_diagonal():
    shape = (8, 9, 10)
    ref = np.zeros(shape, dtype=bool)
    ref[2:4, 2:4, 2:4] = True
    got = region_scores(np.zeros(shape, dtype=bool), ref, (1.0, 2.0, 3.0))
    assert got == {
        "dice": 0.0,
        "hd95": pytest.approx(volume_diagonal(shape, (1.0, 2.0, 3.0))),
        "sensitivity": 0.0,
        "specificity": 1.0,
    }


def test_reference_empty_is_a_false_positive_at_the_volume_diagonal():
    shape = (240, 240, 155)
    pred = np.zeros(shape, dtype=bool)
    pred[100:102, 100:103, 50:52] = True  # 12 false positives
    got = region_scores(pred, np.zeros(shape, dtype=bool))
    n = 240 * 240 * 155
    assert got["dice"] == 0.0
    assert got["hd95"] == pytest.approx(373.13, abs=0.005)
    assert got["sensitivity"] == 1.0
    assert got["specificity"] == pytest.approx((n - 12) / n)


def test_custom_empty_hd95():
    shape = (8, 9, 10)
    mask = np.zeros(shape, dtype=bool)
    mask[3, 3, 3] = True
    empty = np.zeros(shape, dtype=bool)
    assert region_scores(mask, empty, empty_hd95=374.0)["hd95"] == 374.0
    assert region_scores(empty, mask, empty_hd95=200.0)["hd95"] == 200.0
    assert region_scores(empty, empty, empty_hd95=374.0)["hd95"] == 0.0
    assert region_scores(mask, mask, empty_hd95=374.0)["hd95"] == 0.0


# --- max versus pooled HD95 ----------------------------------------------------------------------------------


def test_pooled_differs_from_max_on_a_missed_satellite():
    shape = (40, 30, 30)
    pred = np.zeros(shape, dtype=bool)
    pred[4:16, 9:21, 9:21] = True  # 12^3 cube: 728 surface voxels
    ref = pred.copy()
    ref[30:34, 13:17, 13:17] = True  # missed 4^3 satellite, 14 voxels beyond the cube: 56 of 784 surface voxels
    maximum = region_scores(pred, ref, hd95="max")["hd95"]
    pooled = region_scores(pred, ref, hd95="pooled")["hd95"]
    # 7.1% of the reference surface is the satellite, so its directed P95 lands on the satellite;
    # pooled with the prediction's 728 zero distances it is 3.7% of all, below the 5% tail.
    assert maximum >= 14.0
    assert pooled == 0.0
    assert maximum == pytest.approx(monai_hd95(pred, ref, (1, 1, 1)), abs=1e-3)


def test_pooled_equals_max_on_a_pure_shift():
    shape = (30, 30, 30)
    ref = np.zeros(shape, dtype=bool)
    ref[8:20, 8:20, 8:20] = True
    pred = np.roll(ref, (2, 0, 1), axis=(0, 1, 2))
    maximum = region_scores(pred, ref, hd95="max")["hd95"]
    pooled = region_scores(pred, ref, hd95="pooled")["hd95"]
    assert maximum == pytest.approx(pooled, abs=1e-12)
    assert maximum == pytest.approx(monai_hd95(pred, ref, (1.0, 1.0, 1.0)), abs=1e-3)
    assert maximum == pytest.approx(2.0)  # the x faces, 2 voxels apart, are over 5% of each surface


# --- sensitivity and specificity -----------------------------------------------------------------------------


def test_counts_on_a_hand_made_case():
    pred = np.zeros((4, 4, 4), dtype=bool)
    ref = np.zeros((4, 4, 4), dtype=bool)
    ref[0, 0, 0:4] = True  # 4 reference voxels
    ref[1, 0, 0] = True  # 5th
    pred[0, 0, 1:4] = True  # 3 true positives
    pred[3, 3, 3] = True  # 1 false positive
    # TP 3, FN 2, FP 1, TN 64 - 6 = 58
    got = region_scores(pred, ref)
    assert got["dice"] == pytest.approx(2 * 3 / (4 + 5))
    assert got["sensitivity"] == pytest.approx(3 / 5)
    assert got["specificity"] == pytest.approx(58 / 59)


def test_specificity_counts_the_whole_volume_not_the_crop():
    small = region_scores(*_counts_case((4, 4, 4)))
    large = region_scores(*_counts_case((40, 40, 40)))
    assert small["dice"] == large["dice"] and small["hd95"] == large["hd95"]
    assert large["specificity"] == pytest.approx((40**3 - 3) / (40**3 - 2))
    assert small["specificity"] == pytest.approx((64 - 3) / (64 - 2))


def _counts_case(shape):
    pred = np.zeros(shape, dtype=bool)
    ref = np.zeros(shape, dtype=bool)
    ref[1, 1, 1:3] = True
    pred[1, 1, 2:4] = True  # TP 1, FP 1, FN 1
    return pred, ref


# --- argument checks -----------------------------------------------------------------------------------------


def test_bad_arguments_raise_value_error():
    mask = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="same shape"):
        region_scores(mask, np.zeros((4, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="hd95"):
        region_scores(mask, mask, hd95="mean")
    with pytest.raises(ValueError, match="spacing"):
        region_scores(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="region stacks"):
        score_regions(np.zeros((2, 4, 4, 4), dtype=bool), np.zeros((2, 4, 4, 4), dtype=bool))


# --- label maps ----------------------------------------------------------------------------------------------


def test_score_labels_fets():
    ref = tumour_labels(enhancing=4)
    pred = tumour_labels(enhancing=4, shift=(1, 0, 0))
    got = score_labels(pred, ref, FETS, (1.0, 1.0, 2.0))
    assert list(got) == ["ET", "TC", "WT"]
    expected = score_regions(regions_from_labels(pred, FETS), regions_from_labels(ref, FETS), (1.0, 1.0, 2.0))
    assert got == expected
    for region in REGIONS:
        assert 0.5 < got[region]["dice"] < 1.0
        assert got[region]["hd95"] == pytest.approx(1.0)  # a one-voxel shift along the 1 mm axis


def test_score_labels_brats2023_excludes_the_resection_cavity():
    ref = tumour_labels(enhancing=3)
    pred = ref.copy()
    pred[0:3, 0:3, 0:3] = 4  # resection cavity far from the tumour: belongs to no region
    got = score_labels(pred, ref, BRATS2023)
    for region in REGIONS:
        assert got[region]["dice"] == 1.0 and got[region]["hd95"] == 0.0
        assert got[region]["specificity"] == 1.0
    # Read with the fets convention the same label 4 is enhancing tumour, and label 3 is nothing.
    fets = score_labels(pred, ref, FETS)
    assert fets["ET"]["dice"] == 0.0 and fets["ET"]["sensitivity"] == 1.0


def test_score_labels_without_any_tumour():
    empty = np.zeros((10, 10, 10), dtype=np.uint8)
    got = score_labels(empty, empty, FETS)
    assert all(got[r] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0} for r in REGIONS)


# --- files ---------------------------------------------------------------------------------------------------


def test_score_files_uses_the_reference_spacing(tmp_path):
    spacing = (1.0, 1.0, 2.5)
    ref = tumour_labels()
    pred = tumour_labels(shift=(0, 0, 1))
    pred[pred == 1] = 4  # necrosis predicted as enhancing: ET differs, WT is a pure one-slice shift
    pred_path = write_nifti(tmp_path / "pred.nii.gz", pred, spacing)
    ref_path = write_nifti(tmp_path / "ref.nii.gz", ref, spacing)
    got = score_files(pred_path, ref_path)
    assert got == score_labels(pred, ref, FETS, spacing)
    assert got["WT"]["hd95"] == pytest.approx(2.5)  # one slice along the 2.5 mm axis
    assert got["ET"]["dice"] < got["TC"]["dice"]
    pooled = score_files(str(pred_path), str(ref_path), hd95="pooled", empty_hd95=99.0)
    assert pooled == score_labels(pred, ref, FETS, spacing, hd95="pooled")

    empty_path = write_nifti(tmp_path / "empty.nii.gz", np.zeros_like(ref), spacing)
    missed = score_files(empty_path, ref_path)
    assert missed["ET"]["hd95"] == pytest.approx(volume_diagonal(ref.shape, spacing))
    assert score_files(empty_path, ref_path, empty_hd95=374.0)["ET"]["hd95"] == 374.0


def test_score_files_brats2023(tmp_path):
    ref = tumour_labels(enhancing=3)
    pred = ref.copy()
    pred[0:2, 0:2, 0:2] = 4
    pred_path = write_nifti(tmp_path / "pred.nii", pred.astype(np.int16))
    ref_path = write_nifti(tmp_path / "ref.nii", ref)
    assert all(v["dice"] == 1.0 for v in score_files(pred_path, ref_path, labels="brats2023").values())
    with pytest.raises(InputError, match=r"pred\.nii: label values 3 are not allowed in the fets"):
        score_files(pred_path, ref_path, labels="fets")


def test_label_convention_is_detected_when_the_values_tell(tmp_path):
    fets = write_nifti(tmp_path / "fets.nii.gz", tumour_labels())
    brats = write_nifti(tmp_path / "brats.nii.gz", tumour_labels(enhancing=3))
    fets_vol, brats_vol = (read_volume(p) for p in (fets, brats))
    assert resolve_labels("auto", fets_vol) == "fets"  # 1/2/4: FeTS unless told otherwise
    assert resolve_labels("auto", brats_vol) == "brats2023"  # a 3 exists only in BraTS 2023+
    assert resolve_labels("auto", fets_vol, hint="brats2023") == "brats2023"  # the case folder's naming first
    assert resolve_labels("fets", brats_vol) == "fets"  # a named convention always wins
    assert score_files(brats, brats) == score_files(brats, brats, labels="brats2023")
    assert all(v["dice"] == 1.0 for v in score_files(brats, brats).values())
    with pytest.raises(InputError, match="label values 3 are not allowed in the fets"):
        score_files(brats, fets)  # a prediction in the other convention is refused, never reinterpreted


def _bad_shape(tmp_path, data):
    return write_nifti(tmp_path / "bad.nii.gz", data[:-1])


def _bad_affine(tmp_path, data):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = (0.0, 5.0, 0.0)
    return write_nifti(tmp_path / "bad.nii.gz", data, affine=affine)


def _nan_voxels(tmp_path, data):
    floats = data.astype(np.float32)
    floats[3, 3, 3] = np.nan
    return write_nifti(tmp_path / "bad.nii.gz", floats)


def _label_outside_convention(tmp_path, data):
    labels = data.copy()
    labels[0, 0, 0] = 3
    return write_nifti(tmp_path / "bad.nii.gz", labels)


def _negative_label(tmp_path, data):
    labels = data.astype(np.int16)
    labels[0, 0, 0] = -1
    return write_nifti(tmp_path / "bad.nii.gz", labels)


def _non_integer_labels(tmp_path, data):
    floats = data.astype(np.float32)
    floats[floats == 2] = 2.5
    return write_nifti(tmp_path / "bad.nii.gz", floats)


def _truncated(tmp_path, data):
    good = write_nifti(tmp_path / "whole.nii.gz", data)
    raw = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


def _not_nifti(tmp_path, data):
    bad = tmp_path / "bad.nii.gz"
    with gzip.open(bad, "wt") as f:
        f.write("case,label\n1,2\n")
    return bad


def _missing(tmp_path, data):
    return tmp_path / "bad.nii.gz"


BAD_FILES = {
    "shape": (_bad_shape, "shape"),
    "affine": (_bad_affine, "affine differs"),
    "nan": (_nan_voxels, "NaN"),
    "label-3-in-fets": (_label_outside_convention, "label values 3 are not allowed"),
    "negative-label": (_negative_label, "label values -1 are not allowed"),
    "non-integer": (_non_integer_labels, "non-integer"),
    "truncated": (_truncated, "not a readable NIfTI"),
    "not-nifti": (_not_nifti, "not a readable NIfTI"),
    "missing": (_missing, "not found"),
}


@pytest.mark.parametrize("side", ["pred", "ref"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_score_files_refuses_bad_input_naming_the_file(tmp_path, side, kind):
    make_bad, reason = BAD_FILES[kind]
    data = tumour_labels()
    good = write_nifti(tmp_path / "good.nii.gz", data)
    bad = make_bad(tmp_path, data)
    pred, ref = (bad, good) if side == "pred" else (good, bad)
    with pytest.raises(InputError) as info:
        score_files(pred, ref, labels="fets")  # named: with "auto", a label 3 would mean BraTS 2023+
    message = str(info.value)
    assert "\n" not in message
    assert reason in message
    # A grid mismatch is the prediction's fault whichever file is odd: the reference defines the grid.
    blamed = pred if kind in ("shape", "affine") else bad
    assert blamed.name in message and str(blamed) in message


# --- report and command line ---------------------------------------------------------------------------------


def test_format_scores_table():
    scores = score_labels(tumour_labels(shift=(1, 0, 0)), tumour_labels(), FETS)
    table = format_scores(scores)
    lines = table.splitlines()
    assert lines[0].split() == ["region", "dice", "hd95", "mm", "sensitivity", "specificity"]
    assert [line.split()[0] for line in lines[1:]] == ["ET", "TC", "WT"]
    assert lines[3].split()[1] == f"{scores['WT']['dice']:.4f}"
    footer = format_scores(scores, hd95="pooled", empty_hd95=374.0).splitlines()[-1]
    assert "pooled" in footer and "374 mm" in footer


def test_cli_score_json(tmp_path, capsys):
    pred = write_nifti(tmp_path / "pred.nii.gz", tumour_labels(shift=(1, 0, 0)))
    ref = write_nifti(tmp_path / "ref.nii.gz", tumour_labels())
    assert main(["score", "--pred", str(pred), "--ref", str(ref), "--json"]) == 0
    out = capsys.readouterr().out
    scores = json.loads(out)  # the whole of stdout is one JSON object
    assert set(scores) == set(REGIONS)
    assert all(set(v) == KEYS for v in scores.values())
    assert scores == json.loads(json.dumps(score_files(pred, ref)))


def test_cli_score_table_and_pooled(tmp_path, capsys):
    pred = write_nifti(tmp_path / "pred.nii.gz", tumour_labels(shift=(1, 0, 0)))
    ref = write_nifti(tmp_path / "ref.nii.gz", tumour_labels())
    assert main(["score", "--pred", str(pred), "--ref", str(ref), "--hd95", "pooled"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["ET", "TC", "WT"]


def test_cli_score_bad_input(tmp_path, capsys):
    ref = write_nifti(tmp_path / "ref.nii.gz", tumour_labels())
    bad = write_nifti(tmp_path / "pred.nii.gz", tumour_labels(enhancing=3))
    assert main(["score", "--pred", str(bad), "--ref", str(ref), "--json"]) == 2  # a 3 against a FeTS reference
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pred.nii.gz" in lines[0]
    assert "Traceback" not in captured.err


# --- folders ------------------------------------------------------------------------------------------------


def _score_folders_fixture(tmp_path):
    """Predictions of 4 cases: two flat FeTS references, two BraTS 2023 case folders (one missing)."""
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    preds.mkdir()
    refs.mkdir()
    for i, shift in enumerate([(0, 0, 0), (1, 0, 0)]):
        write_nifti(preds / f"FeTS2022_0000{i}.nii.gz", tumour_labels(shift=shift))
        write_nifti(refs / f"FeTS2022_0000{i}.nii.gz", tumour_labels())
    write_nifti(refs / "FeTS2022_00009.nii.gz", tumour_labels())  # a reference nobody predicted
    for i, shift in enumerate([(0, 2, 0), (0, 0, 1)]):
        case_id = f"BraTS-GLI-0000{i}-000"
        write_nifti(preds / f"{case_id}.nii.gz", tumour_labels(enhancing=3, shift=shift))
        if i == 0:
            (refs / case_id).mkdir()
            write_nifti(refs / case_id / f"{case_id}-seg.nii.gz", tumour_labels(enhancing=3))
            write_nifti(refs / case_id / f"{case_id}-t2f.nii.gz", np.ones((24, 22, 16), np.float32))
    return preds, refs


def test_a_broken_reference_folder_costs_its_case_only(tmp_path, capsys):
    preds, refs = _score_folders_fixture(tmp_path)
    broken = refs / "BraTS-GLI-00001-000"  # file names of two layouts in one folder: not a case
    broken.mkdir()
    write_nifti(broken / "BraTS-GLI-00001-000-seg.nii.gz", tumour_labels(enhancing=3))
    write_nifti(broken / "BraTS-GLI-00001-000_flair.nii.gz", np.ones((24, 22, 16), np.float32))
    csv = tmp_path / "scores.csv"
    assert main(["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--csv", str(csv), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "warning: no reference for BraTS-GLI-00001-000: " in err and "Traceback" not in err
    assert sorted(pd_cases(csv)) == ["BraTS-GLI-00000-000", "FeTS2022_00000", "FeTS2022_00001"]


def test_a_case_named_like_a_spreadsheet_formula_is_written_as_text(tmp_path):
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    for folder in (preds, refs):
        folder.mkdir()
        write_nifti(folder / '=HYPERLINK("x","open").nii.gz', tumour_labels())
    csv = tmp_path / "scores.csv"
    assert main(["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--csv", str(csv), "--quiet"]) == 0
    assert pd_cases(csv) == ['\'=HYPERLINK("x","open")']  # a leading ' : shown, never run


def pd_cases(csv: Path) -> list[str]:
    import pandas as pd

    return list(pd.read_csv(csv)["case"])


def test_score_folders_writes_a_per_case_table_with_its_summary(tmp_path, capsys):
    import pandas as pd

    preds, refs = _score_folders_fixture(tmp_path)
    csv = tmp_path / "scores.csv"
    assert main(["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--csv", str(csv), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "skipped BraTS-GLI-00001-000: no reference" in captured.err  # and so the exit status is 1
    assert "1 references have no prediction" in captured.err  # said, but not a failure
    table = pd.read_csv(csv).set_index("case")
    assert list(table.index) == ["BraTS-GLI-00000-000", "FeTS2022_00000", "FeTS2022_00001"]  # cases only
    assert table.loc["FeTS2022_00000", "labels"] == "fets" and table.loc["BraTS-GLI-00000-000", "labels"] == "brats2023"
    assert table.loc["FeTS2022_00000", "WT_dice"] == 1.0
    shifted = score_labels(tumour_labels(shift=(1, 0, 0)), tumour_labels(), FETS)
    assert table.loc["FeTS2022_00001", "ET_hd95"] == pytest.approx(shifted["ET"]["hd95"])
    cases = table["TC_dice"]
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("statistic")  # the summary in its own file
    assert list(summary.index) == ["mean", "sd", "median"]
    assert summary.loc["mean", "TC_dice"] == pytest.approx(table.mean(numeric_only=True)["TC_dice"])
    assert summary.loc["sd", "TC_dice"] == pytest.approx(cases.std())  # sample sd, as pandas
    assert summary.loc["median", "TC_dice"] == pytest.approx(cases.median())
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["cases"] == 3 and list(record["not_scored"]) == ["BraTS-GLI-00001-000"]
    assert record["unpredicted"] == ["FeTS2022_00009"]
    assert record["median"]["TC_dice"] == summary.loc["median", "TC_dice"]
    assert "| WT |" in captured.out and "3 cases (1 not scored)" in captured.out
    assert f"summary: {tmp_path / 'summary.csv'}, {tmp_path / 'summary.json'}" in captured.err


def test_score_folders_with_several_processes_gives_the_same_rows_to_the_last_bit(tmp_path):
    preds, refs = _score_folders_fixture(tmp_path)
    one = score_folders(preds, refs, progress=False)
    two = score_folders(preds, refs, progress=False, jobs=2)
    assert [c["case"] for c in two.rows] == [c["case"] for c in one.rows]  # in case order
    assert json.dumps(two.rows) == json.dumps(one.rows)  # every float's repr, NaN and infinities included
    assert two.failed == one.failed and two.unpredicted == one.unpredicted


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--pred-dir", "{tmp}/nowhere", "--ref-dir", "{ref}"], "folder not found"),
        (["--pred-dir", "{ref}/x", "--ref-dir", "{ref}"], "folder not found"),
        (["--pred-dir", "{pred}"], "go together"),
        (["--pred-dir", "{pred}", "--ref-dir", "{ref}", "--pred", "{pred}/a.nii.gz"], "either --pred"),
        (["--pred-dir", "{pred}", "--ref-dir", "{ref}", "--csv", "{file}/scores.csv"], "is a file"),
        (["--pred-dir", "{pred}", "--ref-dir", "{ref}", "--csv", "{tmp}/summary.csv"], "summary is written beside"),
        (["--pred-dir", "{pred}", "--ref-dir", "{ref}", "--jobs", "0"], "--jobs 0: give at least 1"),
        (
            ["--pred", "{pred}/FeTS2022_00000.nii.gz", "--ref", "{ref}/FeTS2022_00000.nii.gz", "--csv", "{tmp}/s.csv"],
            "--csv",
        ),
        (["--pred-dir", "{empty}", "--ref-dir", "{ref}"], "no label maps"),
    ],
)
def test_score_folders_refuses_bad_flags_in_one_line(tmp_path, capsys, flags, named):
    preds, refs = _score_folders_fixture(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("a file")
    places = {"pred": preds, "ref": refs, "tmp": tmp_path, "file": tmp_path / "file", "empty": tmp_path / "empty"}
    assert main(["score", *(f.format(**places) for f in flags)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not list(tmp_path.glob("*.csv"))


def test_a_case_that_cannot_be_read_or_scored_costs_only_itself(tmp_path, capsys, monkeypatch):
    """A label map with a zero-length axis (shape 0 x 16 x 16) stopped a whole ``--pred-dir`` run with numpy's
    ValueError, and one pair that ran out of memory would have too; with ``--pred --ref`` it was a traceback."""
    from mstkd import folder, scoring

    preds, refs = tmp_path / "pred", tmp_path / "ref"
    for where in (preds, refs):
        where.mkdir()
        for case_id in ("a", "c", "d"):
            write_nifti(where / f"{case_id}.nii.gz", tumour_labels())
        write_nifti(where / "b.nii.gz", np.zeros((0, 16, 16), np.uint8))
    folders = ["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--quiet", "--json"]
    assert main(folders) == 1
    captured = capsys.readouterr()
    assert "skipped b: " in captured.err and "empty axis" in captured.err and "Traceback" not in captured.err
    assert [row["case"] for row in json.loads(captured.out)["cases"]] == ["a", "c", "d"]
    pair = ["score", "--pred", str(preds / "b.nii.gz"), "--ref", str(refs / "b.nii.gz")]
    assert main(pair) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1 and err[0] == f"error: {preds / 'b.nii.gz'}: its header claims an empty axis (shape (0, 16, 16))"
    )

    # errors no check foresees (a pair too large for the memory left, numpy's ValueError) cost their case too
    assert set(folder.CASE_ERRORS) <= set(scoring.CASE_ERRORS)  # as one case of ``mstkd predict --input-dir``
    failures = {"c": MemoryError("Unable to allocate 488. MiB"), "d": ValueError("zero-size array\nto reduction")}
    score_pair = scoring.score_pair

    def failing(pred, ref, **options):
        if error := failures.get(pred.name.split(".")[0]):
            raise error
        return score_pair(pred, ref, **options)

    monkeypatch.setattr(scoring, "score_pair", failing)
    result = score_folders(preds, refs, progress=False)
    assert [row["case"] for row in result.rows] == ["a"]
    assert result.failed["c"] == "MemoryError: Unable to allocate 488. MiB"
    assert result.failed["d"] == "ValueError: zero-size array"  # its first line
    capsys.readouterr()
    monkeypatch.setattr(scoring, "score_files", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert main(["score", "--pred", str(preds / "a.nii.gz"), "--ref", str(refs / "a.nii.gz")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {preds / 'a.nii.gz'} against {refs / 'a.nii.gz'}: not scored (MemoryError)"]


def test_hidden_files_in_a_prediction_or_reference_folder_are_not_cases(tmp_path, capsys):
    """macOS's ``._a.nii.gz`` beside ``a.nii.gz``, or a write's temporary file left by a killed run, were scored as
    cases: one was skipped as unreadable and made the run fail, another was scored against nothing."""
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    for where in (preds, refs):
        where.mkdir()
        for case_id in ("a", "c"):
            write_nifti(where / f"{case_id}.nii.gz", tumour_labels())
        (where / "._a.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_nifti(preds / ".a.nii.gz.4242-0123456789abcdef.tmp.nii.gz", tumour_labels(shift=(3, 0, 0)))
    write_nifti(refs / ".c.nii.gz.4242-0123456789abcdef.tmp.nii.gz", tumour_labels())
    csv = tmp_path / "scores.csv"
    assert main(["score", "--pred-dir", str(preds), "--ref-dir", str(refs), "--csv", str(csv), "--quiet"]) == 0
    assert "skipped" not in capsys.readouterr().err
    assert pd_cases(csv) == ["a", "c"]
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["not_scored"] == {} and record["unpredicted"] == []
