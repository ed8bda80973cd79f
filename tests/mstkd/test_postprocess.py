"""The small-ET post-processing (the RFNet protocol's rule, in mm³): what it drops, how evaluation reports it beside
the raw ET, and what ``mstkd predict --et-min-mm3`` writes."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mstkd.evaluate as evaluate_module
from mstkd.checkpoint import save_checkpoint, stored_config
from mstkd.cli import main
from mstkd.config import load_config
from mstkd.data.dataset import prepare_federation
from mstkd.data.geometry import from_target
from mstkd.data.labels import get_convention, labels_from_regions
from mstkd.data.layouts import detect_case
from mstkd.errors import InputError
from mstkd.evaluate import evaluate_cases, parse_subsets
from mstkd.infer import Predictor, Prepared
from mstkd.modalities import Subset
from mstkd.model import build_networks
from mstkd.phantoms import write_federation
from mstkd.postprocess import EtCase, et_volume_mm3, suppress_small_et, sweep, sweep_markdown, voxel_mm3
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
    small = EtCase(volume_mm3=8.0, has_et=False, dice=0.0, hd95=7.0, empty_hd95=99.0)
    assert small.scores(500.0) == (1.0, 0.0, True)  # no ET in the reference: the dropped voxels were all wrong
    missed = EtCase(volume_mm3=8.0, has_et=True, dice=0.25, hd95=7.0, empty_hd95=99.0)
    assert missed.scores(500.0) == (0.0, 99.0, True)
    assert missed.scores(5.0) == (0.25, 7.0, False)  # 8 mm³ is above 5
    assert missed.scores(8.0) == (0.25, 7.0, False)  # only under the threshold
    assert missed.scores(0.0) == (0.25, 7.0, False)  # 0: off
    none = EtCase(volume_mm3=0.0, has_et=True, dice=0.0, hd95=99.0, empty_hd95=99.0)
    assert none.scores(500.0) == (0.0, 99.0, False)  # nothing predicted: nothing to drop


def test_a_sweep_scores_every_threshold_from_the_same_cases_and_names_the_best():
    """Per subset: one case whose model hallucinates 30 mm³ of ET where there is none, one whose true ET of
    800 mm³ it finds. 100 and 500 mm³ both drop the hallucination only (the smaller is named); 1000 also drops the
    true ET; 0 and 10 change nothing."""
    hallucinated = EtCase(30.0, False, 0.0, 40.0, 150.0)
    found = EtCase(800.0, True, 0.8, 3.0, 150.0)
    cases = {"flair": [hallucinated, found], "t1ce": [hallucinated, found, found, found]}
    rows = {r["et_min_mm3"]: r for r in sweep(cases, [1000.0, 100.0, 10.0, 500.0, 100.0])}
    assert list(rows) == [0.0, 10.0, 100.0, 500.0, 1000.0]  # sorted, once each, and 0 (no rule) always
    assert rows[0.0]["ET_dice"] == pytest.approx((0.4 + 0.6) / 2)  # mean over subsets of their case means
    assert rows[10.0]["ET_dice"] == rows[0.0]["ET_dice"] and rows[0.0]["dropped"] == 0.0
    assert rows[100.0]["ET_dice"] == pytest.approx((0.9 + 0.85) / 2)
    assert rows[100.0]["ET_hd95"] == pytest.approx((1.5 + 2.25) / 2)
    assert rows[100.0]["dropped"] == pytest.approx((0.5 + 0.25) / 2)
    assert rows[1000.0]["ET_dice"] == pytest.approx(0.5 / 2 + 0.25 / 2) and rows[1000.0]["dropped"] == 1.0
    assert [t for t, r in rows.items() if r["best"]] == [100.0]
    assert [r["best"] for r in sweep({"flair": [found]}, [0.0, 10.0])] == [1.0, 0.0]  # a tie: the smaller, no rule
    # thresholds that only drop true ETs are never named, even when 0 is not among those given
    assert [(r["et_min_mm3"], r["best"]) for r in sweep({"flair": [found]}, [1000.0])] == [(0.0, 1.0), (1000.0, 0.0)]
    md = "\n".join(sweep_markdown(list(rows.values()), cases=4))
    assert "| **100** | 87.5 |" in md and "`mstkd predict --et-min-mm3 100`" in md
    assert [r["best"] for r in sweep({}, [0.0, 500.0])] == [0.0, 0.0]  # nothing scored: nothing named


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_federation(root, cases=4, sites=1, shape=(40, 40, 32), seed=5, progress=False)
    return root


def test_evaluation_reports_et_with_and_without_the_rule(phantoms, monkeypatch):
    """Predictions that are the reference with its ET shrunk to a few voxels: one case's just under 500 mm³, the
    other's just over. The raw ET scores those voxels; the post-processed ET drops the first (which then scores as
    an empty prediction) and keeps the second, by volume and not by voxel count; TC and WT are untouched."""
    cfg = load_config(["model=tiny", "train.amp=false"])
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    cases = fed.site_cases("1", "train")[:2]
    voxel = voxel_mm3(cases[0].meta["spacing"])
    assert voxel > 1 and all(voxel_mm3(c.meta["spacing"]) == voxel for c in cases)
    over = math.ceil(500 / voxel)  # the fewest voxels that make 500 mm³
    sizes = [over - 1, over]
    assert sizes[0] >= 1 and sizes[1] < 500  # voxels, not mm³, would drop both

    def shrunk_et():  # each case's prediction in turn: one subset, cases in order
        refs = iter([c.regions() for c in cases])
        counts = iter(sizes)

        def segment(net, image, subset, cfg, device):
            pred = next(refs)
            keep = tuple(np.argwhere(pred[0])[: next(counts)].T)
            pred[0] = False
            pred[0][keep] = True
            return pred

        return segment

    monkeypatch.setattr(evaluate_module, "segment", shrunk_et())
    net = build_networks(cfg.model)[1]
    full = parse_subsets("full")
    result = evaluate_cases(net, cases, cfg, subsets=full, progress=False, et_sweep=(0.0, 500.0, 1e6))
    dropped, kept = result.rows
    for row, case, n in zip(result.rows, cases, sizes, strict=True):
        assert row["ET_dice"] == pytest.approx(2 * n / (n + int(case.regions()[0].sum())))  # the raw ET
        assert row["TC_dice"] == 1.0 and row["WT_dice"] == 1.0
    assert dropped["ET_pp_dice"] == 0.0 and dropped["ET_pp_dropped"] == 1.0
    assert dropped["ET_pp_hd95"] > dropped["ET_hd95"]  # the volume's diagonal
    assert kept["ET_pp_dice"] == kept["ET_dice"] and kept["ET_pp_dropped"] == 0.0
    md = result.markdown()
    assert "| Subset | Dice ET | Dice ET, post-processed |" in md and "under 500 mm³ becomes necrosis" in md
    assert result.summary()["ET_pp_dropped"] == 0.5
    # the sweep, from the same predictions: at 0 the raw ET, at 500 the rows' post-processed ET, at 1e6 both dropped
    raw, at_500, at_1e6 = result.sweep()
    assert raw["ET_dice"] == pytest.approx(np.mean([r["ET_dice"] for r in result.rows])) and raw["dropped"] == 0
    assert at_500["ET_dice"] == pytest.approx(np.mean([r["ET_pp_dice"] for r in result.rows]))
    assert at_500["ET_hd95"] == pytest.approx(np.mean([r["ET_pp_hd95"] for r in result.rows]))
    assert at_1e6["ET_dice"] == 0.0 and at_1e6["dropped"] == 1.0 and raw["best"] == 1.0
    assert "| ET threshold (mm³) |" in md and "| **0** |" in md

    monkeypatch.setattr(evaluate_module, "segment", shrunk_et())
    off_cfg = load_config(["model=tiny", "train.amp=false", "eval.et_min_mm3=0"])  # the rows hold the raw scores only
    off = evaluate_cases(net, cases, off_cfg, subsets=full, progress=False)
    assert "ET_pp_dice" not in off.rows[0] and "post-processed" not in off.markdown()
    assert off.sweep() == [] and "ET threshold" not in off.markdown()  # no sweep unless asked
    assert [r["ET_dice"] for r in off.rows] == [r["ET_dice"] for r in result.rows]


def test_a_stored_threshold_that_cannot_be_a_volume_is_refused(tmp_path):
    cfg = OmegaConf.to_container(load_config(["model=tiny"]))
    for bad in (-1.0, 2e6, float("nan")):
        cfg["eval"]["et_min_mm3"] = bad
        with pytest.raises(InputError, match="eval.et_min_mm3"):
            stored_config(cfg, "ckpt.pt")


def et_everywhere_checkpoint(folder):
    """A tiny student whose head makes every voxel it sees enhancing tumour, trained at 2 mm (8 mm³ voxels)."""
    cfg = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[2,2,2]"])
    net = build_networks(cfg.model)[1]
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-10.0, -10.0, 10.0, -10.0]))
    return save_checkpoint(folder / "student.pt", net, cfg)


def test_predict_drops_a_small_et_by_its_volume_on_the_model_grid_and_continue_keeps_the_record(tmp_path, capsys):
    """ET fills each case's field of view: 5040 mm³ for a case of 20 x 18 x 14 voxels of 1 mm (630 voxels of the
    model's 2 mm), 40320 mm³ at 2 mm (5040 of the model's voxels). At 10080 mm³ the first is dropped and the
    second kept, which a count of voxels (630 and 5040, both under 10080) would not do."""
    ckpt = et_everywhere_checkpoint(tmp_path)
    shape = (20, 18, 14)
    write_case(tmp_path / "cases", "FeTS2022_00001", shape=shape, seg=False)  # 1 mm voxels
    coarse = AFFINE.copy()
    coarse[:3, :3] *= 2.0
    write_case(tmp_path / "cases", "FeTS2022_00002", shape=shape, seg=False, affine=coarse)  # 2 mm voxels
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(tmp_path / "cases"), "--output-dir", str(out)]
    argv += ["--quiet"]

    def labels(case_id):
        return np.asarray(nib.load(out / f"{case_id}.nii.gz").dataobj)

    assert main([*argv, "--et-min-mm3", "10080"]) == 0
    assert 1 in labels("FeTS2022_00001") and 4 not in labels("FeTS2022_00001")  # dropped: necrosis where ET was
    assert 4 in labels("FeTS2022_00002")  # kept
    record = json.loads((out / "predict.json").read_text())
    assert record["et_min_mm3"] == 10080 and record["cases"]["et_dropped"] == ["FeTS2022_00001"]
    assert "ET under the threshold made necrosis in 1" in capsys.readouterr().err

    # continued with the same rule: both kept, and the record still names the case whose ET it dropped
    assert main([*argv, "--et-min-mm3", "10080", "--continue"]) == 0
    record = json.loads((out / "predict.json").read_text())
    assert sorted(record["cases"]["kept"]) == ["FeTS2022_00001", "FeTS2022_00002"]
    assert record["cases"]["et_dropped"] == ["FeTS2022_00001"]
    # another threshold, or none, is another model's output: predicted again
    assert main([*argv, "--et-min-mm3", "10080.5", "--continue"]) == 0
    assert json.loads((out / "predict.json").read_text())["cases"]["kept"] == []
    capsys.readouterr()
    assert main([*argv, "--continue"]) == 0
    assert 4 in labels("FeTS2022_00001")
    assert "finished earlier" not in capsys.readouterr().err


def test_evaluate_sweeps_thresholds_from_one_pass_and_writes_them(phantoms, tmp_path, capsys):
    ckpt = et_everywhere_checkpoint(tmp_path)  # ET over each case's whole field of view: thousands of mm³
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(phantoms), "--subsets", "full,flair", "--quiet"]
    assert main([*argv, "--split", "val", "--out", str(tmp_path / "val"), "--et-sweep"]) == 0
    record = json.loads((tmp_path / "val" / "eval.json").read_text())
    assert [r["et_min_mm3"] for r in record["et_sweep"]] == [0, 100, 250, 500, 1000, 2000]  # the default candidates
    assert all(r["dropped"] == 0 for r in record["et_sweep"])  # every ET is larger than 2000 mm³
    md = (tmp_path / "val" / "eval.md").read_text()
    assert "| **0** |" in md and "Best here: 0 mm³" in md and "`mstkd predict` without the rule" in md
    assert "--et-sweep on the test cases" not in capsys.readouterr().err
    assert main([*argv, "--split", "train", "--out", str(tmp_path / "train"), "--et-sweep", "1e6"]) == 0
    record = json.loads((tmp_path / "train" / "eval.json").read_text())
    none, litre = record["et_sweep"]  # 0 is always scored; ET over the whole brain is above a litre: kept
    assert (none["et_min_mm3"], litre["et_min_mm3"]) == (0, 1e6) and litre["dropped"] == 0.0
    assert litre["ET_dice"] == none["ET_dice"] == pytest.approx(record["table"][-1]["ET_dice"])
    assert none["best"] == 1.0 and litre["best"] == 0.0  # a tie: no rule
    main([*argv, "--split", "test", "--out", str(tmp_path / "test"), "--et-sweep"])  # this federation has no test case
    assert "--et-sweep on the test cases: choose the threshold with --split val" in capsys.readouterr().err
    assert main([*argv, "--split", "val", "--out", str(tmp_path / "bad"), "--et-sweep", "500", "-1"]) == 2
    assert "error: --et-sweep -1: give a volume between 0 and" in capsys.readouterr().err
    assert main([*argv, "--split", "val", "--out", str(tmp_path / "none")]) == 0  # no flag, no sweep
    assert json.loads((tmp_path / "none" / "eval.json").read_text())["et_sweep"] == []


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 2e6])
def test_a_threshold_that_cannot_be_a_volume_is_refused_in_one_line(tmp_path, bad):
    with pytest.raises(InputError, match="--et-min-mm3 .*: give a volume between 0 and"):
        Predictor(et_everywhere_checkpoint(tmp_path), "cpu", et_min_mm3=bad)


def test_predict_decides_on_the_model_grid_as_evaluation_does(tmp_path):
    """An ET blob of 516 mm³ on the model's 2.5 mm grid comes back as 467 mm³ on a 1 mm case grid: evaluation, on
    the model's grid, keeps it at 500 mm³, so predict must keep it too."""
    cfg = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[2.5,2.5,2.5]"])
    ckpt = save_checkpoint(tmp_path / "student.pt", build_networks(cfg.model)[1], cfg)
    predictor = Predictor(ckpt, "cpu", et_min_mm3=500.0)
    own, target = np.diag([-1.0, -1.0, 1.0, 1.0]), np.diag([-2.5, -2.5, 2.5, 1.0])
    z, y, x = np.mgrid[:24, :24, :24].astype(float)
    probs = np.zeros((4, 24, 24, 24), np.float32)
    probs[2] = np.clip(1.6 - np.sqrt((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) / 1.82, 0, 1)
    probs[3] = 0.5  # ET where its probability passes 0.5, whichever way the model decodes
    on_model = evaluate_module.decode_for(cfg, probs)
    on_case = evaluate_module.decode_for(cfg, from_target(probs, target, own, (60, 60, 60)))
    assert et_volume_mm3(on_model, (2.5,) * 3) >= 500 > et_volume_mm3(on_case, (1.0,) * 3)

    case = write_case(tmp_path / "cases", "FeTS2022_00001", shape=(60, 60, 60), seg=False, affine=own)
    files = detect_case(case)
    whole = (slice(None),) * 4
    prepared = Prepared(
        files,
        Subset.of(files.available),
        own,
        nib.load(files.images["t1"]).header,
        (60, 60, 60),
        target,
        (24, 24, 24),
        True,
        whole,
        probs,
        0.0,
    )
    summary = predictor.finish(prepared, probs, tmp_path / "seg.nii.gz")
    assert not summary["et_dropped"] and 4 in np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
