"""The local trainer, evaluation tables, checkpoints, predict, and the train/evaluate/predict verbs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mstkd.checkpoint import load_checkpoint, save_checkpoint
from mstkd.cli import main
from mstkd.config import load_config
from mstkd.data.dataset import make_loader, prepare_federation
from mstkd.evaluate import evaluate_cases, parse_subsets
from mstkd.modalities import SUBSETS, Subset
from mstkd.model import build_networks
from mstkd.phantoms import write_federation
from mstkd.train import Networks, make_optimizers, poly_lr, seed_everything, train_local
from tests.conftest import write_case

TINY = ["model=tiny", "train.amp=false"]
TINY_STEPS = 8  # per epoch in the no-collapse test


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_federation(root, cases=6, sites=2, shape=(48, 48, 32), seed=3, progress=False)
    return root


def test_poly_lr_schedule():
    cfg = load_config().train
    assert poly_lr(cfg, 0) == cfg.lr
    assert poly_lr(cfg, 99) > 0  # the last epoch still learns
    assert poly_lr(cfg, 50) == pytest.approx(cfg.lr * 0.5**0.9)


def test_loss_goes_down_on_tiny_phantoms(phantoms):
    cfg = load_config([*TINY, "train.lr=2e-3", "data.foreground_ratio=1.0"])
    seed_everything(0)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    loader = make_loader(
        fed.site_cases("1", "train") + fed.site_cases("2", "train"), cfg.data, train=True, patch=cfg.model.input_size
    )
    nets = Networks(*build_networks(cfg.model))
    opt = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(0)
    chunks = [train_local(nets, opt, loader, cfg, steps=12, epoch=i, rng=rng, progress=False) for i in range(3)]
    seg = [c["seg_teacher"] + c["seg_student"] for c in chunks]
    assert seg[-1] < seg[0] * 0.9, seg
    assert chunks[0]["steps"] == 12 and chunks[0]["subsets_drawn"] > 1
    assert {"attention", "kl", "gram", "disc_loss"} <= set(chunks[0])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_training_does_not_collapse(phantoms, seed):
    """A short tiny-preset MST-KDNet training learns the tumour without predicting any region over the brain."""
    cfg = load_config([*TINY, "train.lr=3e-3", "train.epochs=10"])
    seed_everything(seed)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    train = fed.site_cases("1", "train") + fed.site_cases("2", "train")
    loader = make_loader(train, cfg.data, train=True, patch=cfg.model.input_size)
    nets = Networks(*build_networks(cfg.model))
    opt = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(seed)
    for epoch in range(10):
        m = train_local(nets, opt, loader, cfg, steps=TINY_STEPS, epoch=epoch, rng=rng, progress=False)
    assert m["fg_BG"] > 0.5  # most of a crop is still background to the student
    val = fed.site_cases("1", "val") + fed.site_cases("2", "val")
    result = evaluate_cases(nets.student, val, cfg, subsets=parse_subsets("full"), progress=False)
    assert result.collapse() == []
    summary = result.summary()
    assert max(summary[f"{r}_share_max"] for r in ("ET", "TC", "WT")) < 0.5
    assert summary["WT_dice"] > 0.3, summary  # and it did learn the tumour


def test_training_is_deterministic(phantoms):
    cfg = load_config(TINY)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    losses = []
    for _ in range(2):
        seed_everything(1)
        loader = make_loader(fed.site_cases("1", "train"), cfg.data, train=True, patch=cfg.model.input_size)
        nets = Networks(*build_networks(cfg.model))
        m = train_local(
            nets, make_optimizers(nets, cfg.train), loader, cfg, steps=3, progress=False, rng=np.random.default_rng(1)
        )
        losses.append(m["loss"])
    assert losses[0] == losses[1]


def test_site_subsets_restrict_what_the_student_sees(phantoms):
    cfg = load_config(TINY)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    loader = make_loader(fed.site_cases("1", "train"), cfg.data, train=True, patch=cfg.model.input_size)
    nets = Networks(*build_networks(cfg.model))
    seen = []
    original = nets.student.forward
    nets.student.forward = lambda x: seen.append(x.abs().sum(dim=(0, 2, 3, 4)) > 0) or original(x)
    only = [Subset.parse("flair"), Subset.parse("flair+t2")]
    train_local(nets, make_optimizers(nets, cfg.train), loader, cfg, steps=6, subsets=only, progress=False)
    assert all(not s[1] and not s[2] for s in seen)  # never T1 or T1ce


def test_evaluation_table_has_15_rows_and_average(phantoms, tmp_path):
    cfg = load_config(TINY)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    net = build_networks(cfg.model)[1]
    result = evaluate_cases(net, fed.site_cases("1", "val"), cfg, progress=False)
    table = result.table()
    assert [r["subset"] for r in table] == [s.name for s in SUBSETS] + ["average"]
    assert all(0 <= r["ET_dice"] <= 1 and r["WT_hd95"] >= 0 for r in table)
    paths = result.write(tmp_path)
    md = paths["md"].read_text()
    assert md.count("\n|") == 17  # separator + 15 subsets + average
    assert json.loads(paths["json"].read_text())["table"][-1]["subset"] == "average"
    assert parse_subsets("full") == (Subset.parse("flair+t1+t1ce+t2"),)


def test_a_collapsed_model_is_flagged(phantoms, tmp_path):
    """A student that predicts enhancing tumour everywhere is named as a collapse, not passed off as a low Dice."""
    cfg = load_config(TINY)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    net = build_networks(cfg.model)[1]
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-10.0, -10.0, 10.0, -10.0]))  # ET wins every voxel
    result = evaluate_cases(net, fed.site_cases("1", "val"), cfg, subsets=parse_subsets("full"), progress=False)
    hits = result.collapse()
    assert [h["region"] for h in hits] == ["ET", "TC", "WT"]
    assert all(h["share"] == pytest.approx(1.0) and h["ratio"] > 10 for h in hits)
    summary = result.summary()
    assert summary["collapsed"] == 3 and summary["WT_share_max"] == pytest.approx(1.0)
    assert "**Collapse:** ET predicted in 100% of the brain" in result.markdown()
    # an untrained-looking but sane model (background everywhere) is not flagged
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([-10.0, -10.0, -10.0, 10.0]))
    quiet = evaluate_cases(net, fed.site_cases("1", "val"), cfg, subsets=parse_subsets("full"), progress=False)
    assert quiet.collapse() == [] and quiet.summary()["WT_share_max"] == 0


def _checkpoint(tmp_path: Path) -> Path:
    cfg = load_config(TINY)
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "student.pt", build_networks(cfg.model)[1], cfg)


@pytest.mark.parametrize(
    "layout,case_id,allowed",
    [("fets", "FeTS2022_00001", {0, 1, 2, 4}), ("brats2023", "BraTS-GLI-00001-000", {0, 1, 2, 3})],
)
def test_predict_keeps_geometry_and_convention(tmp_path, layout, case_id, allowed):
    ckpt = _checkpoint(tmp_path)
    folder = write_case(tmp_path / "cases", case_id, layout, seg=False)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--case", str(folder), "--out", str(out)]) == 0
    ref = nib.load(next(folder.glob("*1*.nii.gz")))
    pred = nib.load(out)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= allowed


def test_predict_with_missing_modalities_and_bad_input(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    folder = write_case(tmp_path / "cases", "FeTS2022_00002", modalities=("flair", "t2"), seg=False)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--case", str(folder), "--out", str(out)]) == 0
    assert "flair+t2" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--case",
                str(folder),
                "--out",
                str(out),
                "--modalities",
                "flair,t1ce",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t1ce" in err[0]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "bad.pt"),
                "--case",
                str(folder),
                "--out",
                str(tmp_path / "x.nii.gz"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.nii.gz").exists()


def test_checkpoint_with_the_old_region_head_is_refused_in_one_line(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    payload = torch.load(ckpt, weights_only=True)
    payload["format"] = "mstkd-checkpoint/1"  # what the region-head versions wrote
    payload.pop("head")
    payload["student"]["head.weight"] = payload["student"]["head.weight"][:3]
    payload["student"]["head.bias"] = payload["student"]["head.bias"][:3]
    torch.save(payload, tmp_path / "old.pt")
    folder = write_case(tmp_path / "cases", "FeTS2022_00003", seg=False)
    out = tmp_path / "old.nii.gz"
    assert main(["predict", "--checkpoint", str(tmp_path / "old.pt"), "--case", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older version" in err[0] and "NETC, ED, ET, BG" in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_train_evaluate_predict_verbs(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(phantoms),
                "--out",
                str(run),
                "--quiet",
                *TINY,
                "train.epochs=2",
                "train.eval_every=1",
                "train.eval_subsets=full",
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "val" in log[-1]
    assert (run / "config.yaml").exists() and (run / "best.pt").exists()
    net, cfg, payload = load_checkpoint(run / "best.pt")
    assert cfg.model.preset == "tiny" and payload["convention"] == "fets"
    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run / "best.pt"),
                "--data",
                str(phantoms),
                "--split",
                "val",
                "--subsets",
                "flair",
                "--out",
                str(report),
                "--quiet",
            ]
        )
        == 0
    )
    assert (report / "eval.md").exists() and "FLAIR" in capsys.readouterr().out
    case = next(p for p in phantoms.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert (
        main(
            ["predict", "--checkpoint", str(run / "last.pt"), "--case", str(case), "--out", str(tmp_path / "p.nii.gz")]
        )
        == 0
    )


def test_configured_subset_weights_drive_modality_dropout(phantoms):
    weights = [0.0] * 15
    weights[3] = 1.0  # paper order: T2, T1Gd, T1, FLAIR, ...
    cfg = load_config([*TINY, f"train.subset_weights={weights}"])
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    loader = make_loader(fed.site_cases("1", "train"), cfg.data, train=True, patch=cfg.model.input_size)
    nets = Networks(*build_networks(cfg.model))
    seen = []
    original = nets.student.forward
    nets.student.forward = lambda x: seen.append((x.abs().sum(dim=(0, 2, 3, 4)) > 0).tolist()) or original(x)
    metrics = train_local(nets, make_optimizers(nets, cfg.train), loader, cfg, steps=4, progress=False)
    assert seen == [[True, False, False, False]] * 4 and metrics["subsets_drawn"] == 1
