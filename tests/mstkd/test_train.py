"""The local trainer, evaluation tables, checkpoints, predict, and the train/evaluate/predict verbs."""

from __future__ import annotations

import copy
import csv
import functools
import json
import re
import shutil
import time
from itertools import islice
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mstkd.centralised import resume_centralised
from mstkd.checkpoint import checkpoint_geometry, load_checkpoint, save_checkpoint
from mstkd.cli import main
from mstkd.config import load_config
from mstkd.data.dataset import make_loader, prepare_federation
from mstkd.errors import InputError, RefusedMessage
from mstkd.evaluate import evaluate_cases, parse_subsets
from mstkd.modalities import SUBSETS, Subset
from mstkd.model import build_networks
from mstkd.phantoms import write_federation
from mstkd.train import (
    PACE_STEPS,
    Networks,
    check_pace,
    make_optimizers,
    passes,
    poly_lr,
    seed_everything,
    train_local,
)
from tests.helpers import tiny_checkpoint, write_case

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


def test_training_stops_at_its_deadline_or_once_its_pace_cannot_meet_it(phantoms):
    now, clock = time.time(), time.perf_counter()
    with pytest.raises(RefusedMessage, match=r"reached its deadline \(the message's expiry\) after 0 of 10 steps"):
        check_pace(now - 1, 0, 10, None)
    # steps 5 to 10 took 50 s: the 90 left need 900 s
    with pytest.raises(RefusedMessage, match=r"would end past its deadline \(a cap\): 90 left at 10\.0\d s a step"):
        check_pace(now + 100, 10, 100, clock - 50, "a cap")
    check_pace(now + 800, 10, 100, clock - 50)  # 900 s against 800 left: within the margin, so it goes on
    check_pace(now + 100, 2 * PACE_STEPS - 1, 100, clock - 50)  # the pace is judged from 2 x PACE_STEPS on

    cfg = load_config(TINY)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    loader = make_loader(fed.site_cases("1", "train"), cfg.data, train=True, patch=cfg.model.input_size)
    nets = Networks(*build_networks(cfg.model))
    before = [p.detach().clone() for p in nets.student.parameters()]
    with pytest.raises(RefusedMessage, match="after 0 of 3 steps"):
        train_local(nets, make_optimizers(nets, cfg.train), loader, cfg, steps=3, progress=False, deadline=now - 1)
    assert all(torch.equal(a, b) for a, b in zip(before, nets.student.parameters(), strict=True))
    one_shot = (batch for batch in loader)  # a generator cannot be drawn from twice: never fewer steps than asked
    with pytest.raises(ValueError, match=f"the loader gave {len(loader)} of the {2 * len(loader)} batches"):
        train_local(nets, make_optimizers(nets, cfg.train), one_shot, cfg, steps=2 * len(loader), progress=False)


def test_each_pass_over_a_sites_cases_draws_its_own_crops_and_an_empty_loader_ends(phantoms):
    cfg = load_config(TINY)
    fed = prepare_federation(phantoms, cfg.data, progress=False)
    loader = make_loader(fed.site_cases("1", "train"), cfg.data, train=True, patch=cfg.model.input_size, shuffle=False)
    n = len(loader)
    batches = [b["image"] for b in islice(passes(loader), 2 * n)]
    assert not any(torch.equal(a, b) for a, b in zip(batches[:n], batches[n:], strict=True))  # not the first replayed
    assert list(passes([])) == []

    class Counted:  # the loader, counting the passes drawn from it
        drawn = 0

        def __len__(self):
            return n

        def __iter__(self):
            Counted.drawn += 1
            return iter(loader)

    nets = Networks(*build_networks(cfg.model))
    train_local(nets, make_optimizers(nets, cfg.train), Counted(), cfg, steps=2 * n, progress=False)
    assert Counted.drawn == 2, (Counted.drawn, n)


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
    assert md.count("\n|") == 17 + 18  # separator + 15 subsets + average; ET post-processed: header, separator, 16
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


@pytest.mark.parametrize(
    "layout,case_id,allowed",
    [("fets", "FeTS2022_00001", {0, 1, 2, 4}), ("brats2023", "BraTS-GLI-00001-000", {0, 1, 2, 3})],
)
def test_predict_keeps_geometry_and_convention(tmp_path, layout, case_id, allowed):
    ckpt = tiny_checkpoint(tmp_path)
    folder = write_case(tmp_path / "cases", case_id, layout, seg=False)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--case", str(folder), "--out", str(out)]) == 0
    ref = nib.load(next(folder.glob("*1*.nii.gz")))
    pred = nib.load(out)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= allowed


def test_predict_with_missing_modalities_and_bad_input(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
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


def test_predict_a_folder_of_mixed_cases_loads_the_model_once(tmp_path, capsys, monkeypatch):
    import mstkd.infer

    ckpt = tiny_checkpoint(tmp_path)
    cases = tmp_path / "cases"
    expected = {}
    for i in range(6):
        layout = "fets" if i % 2 else "brats2023"
        case_id = f"FeTS2022_{i:05d}" if layout == "fets" else f"BraTS-GLI-{i:05d}-000"
        shape = (20 + 2 * i, 18, 14 + i)
        affine = np.diag([1.0 + 0.1 * i, -1.0, 1.2, 1.0])
        affine[:3, 3] = (i, -3 * i, 7)
        write_case(cases, case_id, layout, shape=shape, seed=i, seg=False, affine=affine)
        expected[case_id] = (shape, affine, {0, 1, 2, 4} if layout == "fets" else {0, 1, 2, 3})
    loads = []
    original = mstkd.infer.load_checkpoint
    monkeypatch.setattr(mstkd.infer, "load_checkpoint", lambda *a, **k: loads.append(a) or original(*a, **k))
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--input-dir", str(cases), "--output-dir", str(out)]) == 0
    assert len(loads) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{c}.nii.gz" for c in expected), "predict.json"])
    for case_id, (shape, affine, allowed) in expected.items():
        pred = nib.load(out / f"{case_id}.nii.gz")
        assert pred.shape == shape
        np.testing.assert_allclose(pred.affine, affine)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= allowed
    assert "wrote 6 label maps" in capsys.readouterr().err


def test_predict_folder_skips_a_broken_case_and_exits_non_zero(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    cases = tmp_path / "cases"
    write_case(cases, "FeTS2022_00001", seg=False)
    broken = write_case(cases, "FeTS2022_00002", seg=False)
    next(broken.glob("*_t1.nii.gz")).write_bytes(b"not a nifti file")
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(cases), "--output-dir", str(out), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("skipped FeTS2022_00002: ")] and len(err) == 2
    # no partial file, no temporary; the record says which case failed
    assert sorted(p.name for p in out.iterdir()) == ["FeTS2022_00001.nii.gz", "predict.json"]
    assert list(json.loads((out / "predict.json").read_text())["cases"]["failed"]) == ["FeTS2022_00002"]


def test_overlapped_folder_prediction_writes_the_same_label_maps_to_the_last_bit(tmp_path):
    from mstkd.folder import predict_folder

    ckpt = tiny_checkpoint(tmp_path)
    cases = tmp_path / "cases"
    coarse = np.diag([-1.5, -1.5, 1.5, 1.0])  # at the 1 mm target after resampling: both paths are exercised
    for i in range(4):
        write_case(cases, f"FeTS2022_{i:05d}", shape=(20 + i, 18, 14), seed=i, seg=False, affine=coarse)
    write_case(cases, "FeTS2022_00001", shape=(21, 18, 14), seed=1, seg=False)  # already at the target
    broken = write_case(cases, "FeTS2022_00002", shape=(22, 18, 14), seed=2, seg=False)
    next(broken.glob("*_t1.nii.gz")).write_bytes(b"not a nifti file")  # a failure between good cases
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"pred-{overlap}"
        result = predict_folder(ckpt, cases, out, progress=False, overlap=overlap, probabilities=True)
        assert [w["case"] for w in result.written] == ["FeTS2022_00000", "FeTS2022_00001", "FeTS2022_00003"]
        assert list(result.failed) == ["FeTS2022_00002"]
        assert [w["resampled"] for w in result.written] == [True, False, True]
        runs[overlap] = out
    for name in ("FeTS2022_00000", "FeTS2022_00001", "FeTS2022_00003"):
        sequential, overlapped = (nib.load(runs[o] / f"{name}.nii.gz") for o in (False, True))
        np.testing.assert_array_equal(np.asarray(overlapped.dataobj), np.asarray(sequential.dataobj))
        np.testing.assert_array_equal(overlapped.affine, sequential.affine)
        with np.load(runs[False] / f"{name}.npz") as a, np.load(runs[True] / f"{name}.npz") as b:
            np.testing.assert_array_equal(a["probabilities"], b["probabilities"])


def test_predict_folder_continues_in_parts_with_probabilities_and_a_record(tmp_path, capsys):
    import hashlib

    from mstkd import __version__
    from mstkd.data.labels import CLASSES

    ckpt = tiny_checkpoint(tmp_path)
    cases, out = tmp_path / "cases", tmp_path / "pred"
    ids = [f"FeTS2022_{i:05d}" for i in range(1, 5)]
    for i, case_id in enumerate(ids):
        write_case(cases, case_id, shape=(20 + i, 18, 14), seed=i, seg=False)
    argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(cases), "--output-dir", str(out), "--quiet"]
    assert main([*argv, "--num-parts", "2", "--part-id", "0", "--save-probabilities"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{ids[0]}.nii.gz", f"{ids[0]}.npz", f"{ids[2]}.nii.gz", f"{ids[2]}.npz", "predict.part-0-of-2.json"]
    )  # every second case of the sorted list, from the first
    record = json.loads((out / "predict.part-0-of-2.json").read_text())
    assert record["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["package"]["version"] == __version__ and "--num-parts 2" in record["command"]
    assert record["device"] == "cpu" and record["tta"] is False and record["config"]["model"]
    assert record["cases"]["written"] == [ids[0], ids[2]] and record["cases"]["part"] == [0, 2]
    with np.load(out / f"{ids[2]}.npz") as saved:
        probs, classes = saved["probabilities"], saved["classes"]
    assert probs.dtype == np.float16 and probs.shape == (len(CLASSES), 22, 18, 14)  # the case's own grid
    assert list(classes) == list(CLASSES)
    np.testing.assert_allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=1e-2)

    (out / f"{ids[0]}.nii.gz").write_bytes(b"half a file")  # an interrupted write is not a finished case
    assert main([*argv, "--continue"]) == 0
    assert "1 of 4 cases finished earlier: kept" in capsys.readouterr().err
    record = json.loads((out / "predict.json").read_text())
    assert record["cases"]["kept"] == [ids[2]] and record["cases"]["written"] == [ids[0], ids[1], ids[3]]
    assert nib.load(out / f"{ids[0]}.nii.gz").shape == (20, 18, 14)


def test_mirrored_test_time_augmentation_averages_eight_passes():
    """``mirror=True`` equals averaging, by hand, the class probabilities of the 8 flipped-and-flipped-back passes."""
    from mstkd.evaluate import MIRROR_AXES, decode, segment
    from mstkd.losses import probabilities
    from mstkd.modalities import FULL

    cfg = load_config([*TINY, "eval.overlap=0"])
    net = build_networks(cfg.model)[1].eval()
    crop = np.random.default_rng(0).normal(size=(4, 32, 32, 32)).astype(np.float32)  # one window: no blending
    passes = []
    for axes in MIRROR_AXES:
        x = torch.from_numpy(crop)[None]
        with torch.no_grad():
            p = probabilities(net.segment(x.flip(axes) if axes else x), "softmax")
        passes.append((p.flip(axes) if axes else p)[0].numpy())
    assert len({float(np.abs(p - passes[0]).sum()) for p in passes}) == 8  # the mirrored passes do differ
    mirrored = segment(net, crop, FULL, cfg, mirror=True)
    np.testing.assert_array_equal(mirrored, decode(np.mean(passes, axis=0), "argmax"))


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--input-dir", "{cases}", "--output-dir", "{pred}", "--device", "gpu7"], "--device"),
        (["--input-dir", "{cases}", "--output-dir", "{pred}", "--device", "cuda:3"], "--device"),
        (["--input-dir", "{cases}", "--output-dir", "{file}/pred"], "is a file"),
        (["--input-dir", "{cases}", "--output-dir", "{pred}", "--case", "{cases}/FeTS2022_00001"], "either --case"),
        (["--input-dir", "{cases}"], "needs --output-dir"),
        (["--input-dir", "{tmp}/nowhere", "--output-dir", "{pred}"], "not found"),
        (["--input-dir", "{cases}", "--output-dir", "{pred}", "--out", "{tmp}/x.nii.gz"], "--out goes with --case"),
        (["--input-dir", "{cases}", "--output-dir", "{pred}", "--modalities", "flair,t9"], "t9"),
        (["--input-dir", "{cases}", "--output-dir", "{pred}", "--num-parts", "2", "--part-id", "2"], "--part-id 2"),
        (["--case", "{cases}/FeTS2022_00001", "--out", "{pred}/x.nii.gz", "--continue"], "--continue goes with"),
    ],
)
def test_predict_folder_refuses_bad_flags_in_one_line_and_writes_nothing(tmp_path, capsys, flags, named):
    ckpt = tiny_checkpoint(tmp_path)
    write_case(tmp_path / "cases", "FeTS2022_00001", seg=False)
    (tmp_path / "file").write_text("a file")
    places = {"cases": tmp_path / "cases", "pred": tmp_path / "pred", "file": tmp_path / "file", "tmp": tmp_path}
    assert main(["predict", "--checkpoint", str(ckpt), *(f.format(**places) for f in flags)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not (tmp_path / "pred").exists()


def test_predict_into_a_path_that_cannot_be_written_is_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    folder = write_case(tmp_path / "cases", "FeTS2022_00001", seg=False)
    (tmp_path / "file").write_text("a file")
    assert (
        main(["predict", "--checkpoint", str(ckpt), "--case", str(folder), "--out", str(tmp_path / "file/x.nii.gz")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]


def test_checkpoint_with_the_old_region_head_is_refused_in_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
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


def _tampered(ckpt: Path, tmp_path: Path, name: str, change) -> Path:
    payload = torch.load(ckpt, weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def test_a_checkpoint_from_elsewhere_is_checked_before_anything_is_built_from_it(tmp_path, monkeypatch):
    """A checkpoint's config is input from outside: no interpolation is resolved (``oc.env`` would read this
    machine's environment), no value outside the schema is taken (``eval.blend`` becomes the mode of an exported
    bundle, where MONAI runs a string that starts with ``$`` as Python), and a network is built only once its
    weights are known to fit it."""
    monkeypatch.setenv("MSTKD_TEST_SECRET", "gaussian")
    ckpt = tiny_checkpoint(tmp_path)
    assert load_checkpoint(ckpt)[1].eval.blend == "gaussian"  # the untouched checkpoint loads
    cases = {
        "plain value at eval.blend": lambda p: p["config"]["eval"].update(blend="${oc.env:MSTKD_TEST_SECRET}"),
        "plain value at data.modalities": lambda p: p["config"]["data"].update(modalities=("${oc.env:HOME}",)),
        "at most 64": lambda p: p["config"]["model"]["vit"].update(layers=10**7),
        "config does not read": lambda p: p["config"]["train"].update(eval_subsets=5),
        "bad config value eval.blend": lambda p: p["config"]["eval"].update(blend="$__import__('os').getcwd()"),
        "unknown config key loss.unknown": lambda p: p["config"]["loss"].update(unknown=1.0),
        "bad config value model.base_channels": lambda p: p["config"]["model"].update(base_channels="many"),
        "does not fit the network": lambda p: p["config"]["model"].update(base_channels=8),
        "bad config value eval.roi": lambda p: p["config"]["eval"].update(roi=[4096] * 3),  # 1 TB per window
        "model.base_channels=4096: at most 64": lambda p: p["config"]["model"].update(base_channels=4096),
        "unknown model preset": lambda p: p["config"]["model"].update(preset="../../x"),
        "label convention": lambda p: p.update(convention=["fets"]),
        "not a set of named tensors": lambda p: p.update(student={"head.weight": "x"}),
        "config is not a mapping": lambda p: p.update(config=[1, 2]),
    }
    for reason, change in cases.items():
        with pytest.raises(InputError, match=reason):
            load_checkpoint(_tampered(ckpt, tmp_path, "bad.pt", change))
    # the target geometry is read by predict, evaluate and export: a tensor there raised on its truth value
    for geometry in (torch.zeros(3), [2.0, 2.0, 2.0], {"spacing": [float("nan")] * 3}, {"spacing": "abc"}):
        payload = torch.load(_tampered(ckpt, tmp_path, "bad.pt", lambda p, g=geometry: p.update(geometry=g)))
        with pytest.raises(InputError, match="^checkpoint: its stored geometry "):
            checkpoint_geometry(payload)


def _poisoned(value: float):
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return change


ODD_WEIGHTS = {
    "nan": (_poisoned(float("nan")), "is not finite"),  # predict wrote all-necrosis label maps, exit status 0
    "inf": (_poisoned(float("inf")), "is not finite"),
    "beyond-float32": (lambda t: _poisoned(1e300)(t.double()), "is not finite"),  # inf once cast to float32
    "complex": (lambda t: t.to(torch.complex64), "is of type torch.complex64, not floating point"),  # was cast
    "integer": (lambda t: (t * 1000).to(torch.int64), "is of type torch.int64, not floating point"),
    "sparse": (lambda t: t.to_sparse(), "is not a dense tensor (torch.sparse_coo)"),  # a traceback
    "meta": (lambda t: torch.empty(t.shape, device="meta"), "is a tensor without values (meta)"),  # a traceback
    "expanded": (lambda t: torch.zeros(1).expand(t.shape), "is a view claiming more values than it stores"),
}


@pytest.mark.parametrize("kind", ODD_WEIGHTS)
def test_a_checkpoint_whose_weights_are_not_dense_real_and_finite_is_refused_naming_the_weight(tmp_path, kind):
    change, reason = ODD_WEIGHTS[kind]
    ckpt = _tampered(
        tiny_checkpoint(tmp_path),
        tmp_path,
        "odd.pt",
        lambda p: p["student"].update({"c1.0.weight": change(p["student"]["c1.0.weight"])}),
    )
    with pytest.raises(InputError, match=f"odd.pt: its student: 'c1.0.weight' {re.escape(reason)}$"):
        load_checkpoint(ckpt)


def test_predict_refuses_a_checkpoint_with_a_nan_weight_and_writes_nothing(tmp_path, capsys):
    ckpt = _tampered(
        tiny_checkpoint(tmp_path),
        tmp_path,
        "nan.pt",
        lambda p: p["student"]["c1.0.weight"].view(-1).__setitem__(0, float("nan")),
    )
    cases = tmp_path / "cases"
    write_case(cases, "FeTS2022_00001", seg=False)
    out = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(ckpt), "--input-dir", str(cases), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'c1.0.weight' is not finite" in err[0], err
    assert not list(out.glob("*.nii.gz"))


def test_an_integer_buffer_must_keep_its_type(tmp_path):
    """With ``decoder_norm=batch`` the network has BatchNorm's int64 counters: those, and only those, are integers."""
    cfg = load_config([*TINY, "model.decoder_norm=batch", "data.target_spacing=[1,1,1]"])
    ckpt = save_checkpoint(tmp_path / "batch.pt", build_networks(cfg.model)[1], cfg)
    assert load_checkpoint(ckpt)[0] is not None
    name = next(k for k, v in torch.load(ckpt, weights_only=True)["student"].items() if v.dtype == torch.int64)
    odd = _tampered(ckpt, tmp_path, "odd.pt", lambda p: p["student"].update({name: p["student"][name].double()}))
    with pytest.raises(InputError, match=f"its student: '{re.escape(name)}' is of type torch.float64, not torch.int64"):
        load_checkpoint(odd)


def test_an_older_checkpoint_without_a_newer_key_takes_its_default(tmp_path):
    ckpt = _tampered(tiny_checkpoint(tmp_path), tmp_path, "old.pt", lambda p: p["config"]["eval"].pop("blend"))
    assert load_checkpoint(ckpt)[1].eval.blend == load_config([]).eval.blend


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
                "--lesion",
                "brats2023",
                "--quiet",
            ]
        )
        == 0
    )
    assert (report / "eval.md").exists() and "FLAIR" in capsys.readouterr().out
    rows = list(csv.DictReader((report / "eval_cases.csv").open()))  # --lesion: the BraTS 2023 lesion columns
    assert rows and all(0 <= float(r[f"{x}_lesion_dice"]) <= 1 for r in rows for x in ("ET", "TC", "WT"))
    assert "Lesion-wise scores (brats2023)" in (report / "eval.md").read_text()
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


def test_a_killed_training_resumed_ends_with_the_uninterrupted_weights(phantoms, tmp_path, capsys, monkeypatch):
    import mstkd.centralised

    argv = [*TINY, "train.epochs=3", "train.steps_per_epoch=3", "train.eval_every=2", "train.eval_subsets=full"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", "--data", str(phantoms), "--out", str(whole), "--quiet", *argv]) == 0
    real, calls = mstkd.centralised.train_local, []

    def dies_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mstkd.centralised, "train_local", dies_in_epoch_3)
    assert main(["train", "--data", str(phantoms), "--out", str(killed), "--quiet", *argv]) == 130
    assert len((killed / "log.jsonl").read_text().splitlines()) == 2
    with (killed / "log.jsonl").open("a") as f:
        f.write('{"epoch": 3, "lo')  # a line cut short by the kill
    monkeypatch.setattr(mstkd.centralised, "train_local", real)
    capsys.readouterr()
    assert main(["train", "--resume", str(killed), "--data", str(phantoms), "--quiet"]) == 0
    assert "after epoch 2 of 3" in capsys.readouterr().err
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]  # appended to, never deleted
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(d / name, weights_only=True)["student"] for d in (whole, killed))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    a, b = (torch.load(d / "state.pt", weights_only=True) for d in (whole, killed))
    for key in a["teacher"]:
        torch.testing.assert_close(a["teacher"][key], b["teacher"][key], rtol=1e-5, atol=1e-6)
    assert load_checkpoint(killed / "last.pt")[2]["extra"]["epoch"] == 3  # last.pt is still the student alone


def test_resume_and_fresh_runs_refuse_bad_folders_in_one_line(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("")
    cases = [
        (["train", "--resume", str(tmp_path / "nothing")], "no state.pt"),
        (["train", "--resume", str(run), "--data", str(phantoms), "--out", str(run)], "give no --out or overrides"),
        (["train", "--data", str(phantoms), "--out", str(run), *TINY], "already holds a run"),
        (["train", "--quiet", *TINY], "give --data"),
        (["train", "--data", str(phantoms), "--out", str(tmp_path / "new"), *TINY, "train.epochs=2.5"], "whole epochs"),
    ]
    for argv, named in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "new").exists()
    (run / "state.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run)]) == 2
    assert "not a readable training state" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(phantoms, tmp_path_factory) -> Path:
    """A centralised run of two epochs (one step each) on ``phantoms``, its ``state.pt`` after epoch 2."""
    run = tmp_path_factory.mktemp("finished") / "run"
    argv = [*TINY, "train.epochs=2", "train.steps_per_epoch=1", "train.eval_every=5"]
    assert main(["train", "--data", str(phantoms), "--out", str(run), "--quiet", *argv]) == 0
    return run


def _moments(state: dict, key: str, change) -> dict:
    """``state`` with the first parameter's moments of optimiser ``key`` changed by ``change``."""
    optimizer = copy.deepcopy(state[key])
    first = next(iter(optimizer["state"]))
    change(optimizer["state"][first])
    return {**state, key: optimizer}


def _groups(state: dict, key: str, **settings) -> dict:
    """``state`` with ``settings`` in every parameter group of optimiser ``key``."""
    optimizer = copy.deepcopy(state[key])
    for group in optimizer["param_groups"]:
        group.update(settings)
    return {**state, key: optimizer}


def test_a_training_state_from_elsewhere_is_checked_before_it_is_resumed(finished_run, tmp_path, capsys, monkeypatch):
    """A run folder copied in: its state.pt's config passes the checks a checkpoint's does (no ``${oc.env:...}``,
    which was resolved and written into last.pt and the trackers, no model past the schema's bounds), every entry has
    the type this version writes, and its weights and moments fit the networks its config builds (on the ``meta``
    device), dense, real and finite: all before any data is read (the weights were checked after the data's cache
    was built), each refusal one line, not a traceback."""
    import mstkd.centralised

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    good = torch.load(run / "state.pt", weights_only=True)
    capsys.readouterr()
    monkeypatch.setenv("MSTKD_SECRET", "hunter2")

    def no_data_work(*args, **kwargs):
        raise AssertionError("prepare_federation was reached")

    monkeypatch.setattr(mstkd.centralised, "prepare_federation", no_data_work)

    def with_config(key: str, value):
        config = copy.deepcopy(good["config"])
        *path, last = key.split(".")
        functools.reduce(dict.__getitem__, path, config)[last] = value
        return {**good, "config": config}

    teacher = {**good["teacher"], "c1.0.weight": good["teacher"]["c1.0.weight"].clone().fill_(float("nan"))}
    tampered = [
        (with_config("train.out_dir", "leak:${oc.env:MSTKD_SECRET}"), "something other than a plain value"),
        (with_config("model.vit.layers", 100000), "model.vit.layers"),
        (with_config("eval.roi", [4096] * 3), "eval.roi"),
        ({k: v for k, v in good.items() if k != "config"}, "its config is not a mapping"),
        ({**good, "data": 5}, "'data'"),
        ({**good, "epoch": 1e9}, "'epoch'"),
        ({**good, "best": float("nan")}, "'best'"),
        ({**good, "student": {"x": torch.zeros(2)}}, "its student does not fit the network its config describes"),
        ({**good, "teacher": teacher}, "its teacher: 'c1.0.weight' is not finite"),
        (_moments(good, "optimizer", lambda m: m.update(exp_avg=torch.zeros(3))), "its optimizer does not fit"),
        (_moments(good, "disc_optimizer", lambda m: m["exp_avg_sq"].fill_(float("inf"))), "'exp_avg_sq' is not finite"),
        ({**good, "optimizer": {"state": {}, "param_groups": []}}, "its optimizer does not fit its config"),
        (_groups(good, "optimizer", maximize=True), "its optimizer does not fit its config (maximize)"),
        (_groups(good, "disc_optimizer", lr=float("nan")), "its disc_optimizer does not fit its config (lr)"),
        (_moments(good, "optimizer", lambda m: m.update(step="many")), "its optimizer does not fit its config"),
    ]
    for state, named in tampered:
        torch.save(state, run / "state.pt")
        assert main(["train", "--resume", str(run), "--quiet"]) == 2, named
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and named in errors[0] and "Traceback" not in err, (named, err)
    assert not any(b"hunter2" in p.read_bytes() for p in run.rglob("*") if p.is_file())


def test_a_training_state_from_elsewhere_chooses_no_folder_to_read_or_write(phantoms, finished_run, tmp_path, capsys):
    """A state.pt names the data folder and partition CSV it was trained on; one crafted to name someone's data made
    ``mstkd train --resume`` read those cases and write ``.mstkd-cache`` into their folder. The user names the data
    (and the CSV, if the run had one), and what they name must be what the state records."""
    run, victim = tmp_path / "run", tmp_path / "victim"
    shutil.copytree(finished_run, run)
    shutil.copytree(phantoms, victim, ignore=shutil.ignore_patterns(".mstkd-cache"))
    untouched = sorted(victim.rglob("*"))
    good = torch.load(run / "state.pt", weights_only=True)
    capsys.readouterr()

    torch.save({**good, "data": str(victim)}, run / "state.pt")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"trained with --data '.*victim': give it too$", err[0]), err
    assert main(["train", "--resume", str(run), "--data", str(phantoms), "--quiet"]) == 2
    assert "is not the run's" in capsys.readouterr().err
    torch.save({**good, "partitioning": str(victim / "partitioning.csv")}, run / "state.pt")
    with pytest.raises(InputError, match=r"trained with --partitioning '.*victim/partitioning.csv': give it too$"):
        resume_centralised(run, phantoms, progress=False)
    torch.save(good, run / "state.pt")
    with pytest.raises(InputError, match="this run was trained without --partitioning; give none$"):
        resume_centralised(run, phantoms, partitioning=victim / "partitioning.csv", progress=False)
    assert sorted(victim.rglob("*")) == untouched  # nothing read into a cache, nothing written
    assert resume_centralised(run, phantoms, progress=False) == run  # the run's own data: it resumes (and ends)


def test_tensorboard_and_mlflow_get_a_point_per_epoch(phantoms, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    argv = [*TINY, "train.epochs=2", "train.steps_per_epoch=2", "train.eval_every=1", "train.eval_subsets=full"]
    tracked = ["--tensorboard", "--tracker", "mlflow"]
    assert main(["train", "--data", str(phantoms), "--out", str(run), "--quiet", *tracked, *argv]) == 0
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    [tracked_run] = client.search_runs([client.get_experiment_by_name("mstkd").experiment_id])
    assert [m.step for m in client.get_metric_history(tracked_run.info.run_id, "val/mean_dice")] == [1, 2]
    assert float(tracked_run.data.params["config/train/epochs"]) == 2 and tracked_run.info.status == "FINISHED"
    assert {"best.pt", "val_epoch2.md"} <= {a.path for a in client.list_artifacts(tracked_run.info.run_id)}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/seg_student", "train/lr", "val/mean_dice", "val/WT_dice"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("val/mean_dice")] == [1, 2]


@pytest.mark.parametrize("scope", ["joint", "separate"])
def test_a_nan_gradient_in_the_student_never_reaches_the_teacher(scope):
    """The loss is finite, but one student gradient is NaN (as a poisoned global model can make it): with one
    clipping coefficient for both networks the teacher's step would turn NaN too. The step is skipped, counted,
    and the teacher and the optimiser's moments stay as they were, whichever clipping scope."""
    cfg = load_config(["model=tiny", "train.amp=false", f"train.grad_clip_scope={scope}"])
    nets = Networks(*build_networks(cfg.model))
    next(nets.student.parameters()).register_hook(lambda grad: grad * float("nan"))
    teacher = {k: v.clone() for k, v in nets.teacher.state_dict().items()}
    optimizers = make_optimizers(nets, cfg.train)
    batch = {"image": torch.randn(1, 4, 32, 32, 32), "label": torch.zeros(1, 3, 32, 32, 32)}
    out = train_local(nets, optimizers, [batch], cfg, steps=3, progress=False, device=torch.device("cpu"))
    assert out["skipped_steps"] == 3  # the loss itself was finite: the check is on each network's gradients
    assert all(torch.equal(teacher[k], v) for k, v in nets.teacher.state_dict().items())
    assert not optimizers.main.state  # no moment was ever updated
