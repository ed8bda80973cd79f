"""The small-ET post-processing (the RFNet protocol's rule, in mm³): what it drops, how evaluation reports it beside
the raw ET, and what ``mstkd predict --et-min-mm3`` writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import mstkd.evaluate as evaluate_module
from mstkd.checkpoint import save_checkpoint
from mstkd.cli import main
from mstkd.config import load_config
from mstkd.data.dataset import prepare_federation
from mstkd.data.labels import get_convention, labels_from_regions
from mstkd.errors import InputError
from mstkd.evaluate import evaluate_cases, parse_subsets
from mstkd.infer import Predictor
from mstkd.model import build_networks
from mstkd.phantoms import write_federation
from mstkd.postprocess import postprocessed_et_scores, suppress_small_et
from tests.helpers import AFFINE, write_case


def blob(side: int, shape=(12, 12, 12)) -> np.ndarray:
    """ET, TC and WT of a cube of ``side`` voxels of ET inside a TC and a WT one voxel wider each way."""
    regions = np.zeros((3, *shape), dtype=bool)
    regions[0, 4 : 4 + side, 4 : 4 + side, 4 : 4 + side] = True
    regions[1:, 3 : 5 + side, 3 : 5 + side, 3 : 5 + side] = True
    return regions


def test_the_threshold_is_a_volume_so_it_means_the_same_at_any_voxel_size():
    regions = blob(3)  # 27 voxels
    dropped, was = suppress_small_et(regions, (1.0, 1.0, 1.0), 500.0)  # 27 mm³
    assert was and not dropped[0].any()
    assert (dropped[1:] == regions[1:]).all()  # TC and WT keep the voxels
    labels = labels_from_regions(dropped, get_convention("fets"))
    assert set(np.unique(labels[regions[0]]).tolist()) == {1}  # ET became necrosis
    kept, was = suppress_small_et(regions, (3.0, 3.0, 3.0), 500.0)  # 729 mm³: the same cube at 3 mm is kept
    assert not was and kept is regions
    assert not suppress_small_et(regions, (1.0, 1.0, 1.0), 0.0)[1]  # 0: off
    assert not suppress_small_et(blob(0), (1.0, 1.0, 1.0), 500.0)[1]  # no ET: nothing to drop


def test_a_dropped_et_scores_as_an_empty_prediction():
    raw = {"dice": 0.25, "hd95": 7.0}
    small, empty_ref, ref = blob(2), np.zeros((12, 12, 12), bool), blob(4)[0]
    assert postprocessed_et_scores(small, empty_ref, raw, (1, 1, 1), 500.0, 99.0) == {
        "ET_pp_dice": 1.0,
        "ET_pp_hd95": 0.0,
        "ET_pp_dropped": 1.0,
    }
    assert postprocessed_et_scores(small, ref, raw, (1, 1, 1), 500.0, 99.0) == {
        "ET_pp_dice": 0.0,
        "ET_pp_hd95": 99.0,
        "ET_pp_dropped": 1.0,
    }
    kept = postprocessed_et_scores(small, ref, raw, (1, 1, 1), 5.0, 99.0)  # 8 mm³ is above 5
    assert kept == {"ET_pp_dice": 0.25, "ET_pp_hd95": 7.0, "ET_pp_dropped": 0.0}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_federation(root, cases=4, sites=1, shape=(40, 40, 32), seed=5, progress=False)
    return root


def test_evaluation_reports_et_with_and_without_the_rule(phantoms, monkeypatch):
    """A prediction that is the reference with its ET shrunk to one voxel: the raw ET scores that voxel, the
    post-processed ET drops it (at the default 500 mm³) and scores an empty prediction; TC and WT are untouched."""

    cfg = load_config(["model=tiny", "train.amp=false"])
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    cases = fed.site_cases("1", "train")[:2]

    def one_et_voxel():  # each case's prediction in turn: one subset, cases in order
        refs = iter([c.regions() for c in cases])

        def segment(net, image, subset, cfg, device):
            pred = next(refs)
            where = np.argwhere(pred[0])[0]
            pred[0] = False
            pred[(0, *where)] = True
            return pred

        return segment

    monkeypatch.setattr(evaluate_module, "segment", one_et_voxel())
    net = build_networks(cfg.model)[1]
    full = parse_subsets("full")

    result = evaluate_cases(net, cases, cfg, subsets=full, progress=False)
    for row, case in zip(result.rows, cases, strict=True):
        n_et = int(case.regions()[0].sum())
        assert row["ET_dice"] == pytest.approx(2 / (1 + n_et))  # the raw ET: one voxel of the reference's
        assert row["ET_pp_dice"] == 0.0 and row["ET_pp_dropped"] == 1.0
        assert row["ET_pp_hd95"] > row["ET_hd95"]  # the volume's diagonal
        assert row["TC_dice"] == 1.0 and row["WT_dice"] == 1.0
    md = result.markdown()
    assert "| Subset | Dice ET | Dice ET, post-processed |" in md and "under 500 mm³ becomes necrosis" in md
    assert result.summary()["ET_pp_dropped"] == 1.0

    monkeypatch.setattr(evaluate_module, "segment", one_et_voxel())
    off_cfg = load_config(["model=tiny", "train.amp=false", "eval.et_min_mm3=0"])  # the rows hold the raw scores only
    off = evaluate_cases(net, cases, off_cfg, subsets=full, progress=False)
    assert "ET_pp_dice" not in off.rows[0] and "post-processed" not in off.markdown()
    assert [r["ET_dice"] for r in off.rows] == [r["ET_dice"] for r in result.rows]


def et_everywhere_checkpoint(folder):
    """A tiny student whose head makes every voxel it sees enhancing tumour, trained at 1 mm."""
    cfg = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[1,1,1]"])
    net = build_networks(cfg.model)[1]
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-10.0, -10.0, 10.0, -10.0]))
    return save_checkpoint(folder / "student.pt", net, cfg)


def test_predict_makes_a_small_et_necrosis_counted_in_mm3_of_the_case_grid(tmp_path, capsys):
    ckpt = et_everywhere_checkpoint(tmp_path)
    shape = (20, 18, 14)
    write_case(tmp_path / "cases", "FeTS2022_00001", shape=shape, seg=False)  # 1 mm voxels
    coarse = AFFINE.copy()
    coarse[:3, :3] *= 2.0  # 8 mm³ voxels
    write_case(tmp_path / "cases", "FeTS2022_00002", shape=shape, seg=False, affine=coarse)
    box_mm3 = np.prod(shape)  # ET fills at most the brain's box: under this volume at 1 mm, under 8 times it at 2 mm
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(tmp_path / "cases"), "--output-dir", str(out)]
    assert main([*argv, "--quiet", "--et-min-mm3", str(box_mm3 + 1)]) == 0
    fine = np.asarray(nib.load(out / "FeTS2022_00001.nii.gz").dataobj)
    thick = np.asarray(nib.load(out / "FeTS2022_00002.nii.gz").dataobj)
    assert 1 in fine and 4 not in fine  # dropped: necrosis where ET was
    assert 4 in thick  # the same voxel count is 8 times the volume at 2 mm: kept
    record = json.loads((out / "predict.json").read_text())
    assert record["et_min_mm3"] == box_mm3 + 1 and record["cases"]["et_dropped"] == ["FeTS2022_00001"]
    assert "ET under the threshold made necrosis in 1" in capsys.readouterr().err

    # the label map's header names the rule, so --continue without it predicts the case again
    assert main([*argv, "--quiet", "--continue"]) == 0
    assert 4 in np.asarray(nib.load(out / "FeTS2022_00001.nii.gz").dataobj)
    assert "finished earlier" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 2e6])
def test_a_threshold_that_cannot_be_a_volume_is_refused_in_one_line(tmp_path, bad):
    with pytest.raises(InputError, match="--et-min-mm3 .*: give a volume between 0 and"):
        Predictor(et_everywhere_checkpoint(tmp_path), "cpu", et_min_mm3=bad)
