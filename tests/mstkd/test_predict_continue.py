"""``mstkd predict --input-dir --continue`` after a real interruption: the process is killed midway, and the
rerun predicts only the cases it had not finished, keeping the finished ones byte for byte."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mstkd.cli import main
from mstkd.data.labels import CLASSES, get_convention, labels_from_regions
from mstkd.evaluate import decode
from tests.helpers import tiny_checkpoint, write_case

CASES = 16


def written(out):
    """The finished label maps (not the hidden temporary files that atomic writes rename into place)."""
    return [p for p in out.glob("*.nii.gz") if not p.name.startswith(".")]


@pytest.mark.slow
def test_a_killed_folder_prediction_continues_with_only_the_missing_cases(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    cases, out = tmp_path / "cases", tmp_path / "pred"
    ids = [f"FeTS2022_{i:05d}" for i in range(1, CASES + 1)]
    for i, case_id in enumerate(ids):
        write_case(cases, case_id, shape=(40, 40, 32), seed=i, seg=False)
    argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(cases), "--output-dir", str(out), "--quiet"]
    argv += ["--save-probabilities"]  # a case is finished with its probabilities beside it
    code = "import sys; from mstkd.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not written(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind
    proc.wait()
    finished = {p.name: p.read_bytes() for p in written(out)}
    assert 0 < len(finished) < CASES, "the kill should land midway"
    assert not (out / "predict.json").exists()  # the record comes last

    assert main([*argv, "--continue"]) == 0
    assert f"{len(finished)} of {CASES} cases finished earlier: kept" in capsys.readouterr().err
    record = json.loads((out / "predict.json").read_text())
    assert sorted(record["cases"]["kept"]) == sorted(n.removesuffix(".nii.gz") for n in finished)
    assert len(record["cases"]["written"]) == CASES - len(finished)
    assert all((out / name).read_bytes() == data for name, data in finished.items())  # kept as they were
    assert sorted(p.name for p in written(out)) == sorted(f"{i}.nii.gz" for i in ids)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file of the killed run is left

    # --save-probabilities: the probabilities argmax back to the written labels (the model's decoding is argmax),
    # except where float16 rounding ties the two likeliest classes (the untrained model's are close everywhere)
    fets = get_convention("fets")
    for case_id in record["cases"]["written"]:
        with np.load(out / f"{case_id}.npz") as saved:
            assert list(saved["classes"]) == list(CLASSES)
            probs = saved["probabilities"].astype(np.float32)
        labels = np.asarray(nib.load(out / f"{case_id}.nii.gz").dataobj)
        differ = labels_from_regions(decode(probs, "argmax"), fets) != labels
        top2 = np.sort(probs, axis=0)[-2:]
        assert differ.mean() < 1e-3 and np.all(top2[1][differ] - top2[0][differ] <= 1e-3)


def test_a_foreign_file_where_an_output_belongs_is_not_taken_for_a_finished_case(tmp_path):
    """``--continue`` skips a case whose label map is already there, made by this model: a file nibabel cannot read
    in its place (here one whose data type code is unknown), a link planted there, a label map another checkpoint,
    test-time augmentation or set of modalities made, or one without the probabilities asked for, is not finished,
    and is no reason to stop the folder."""
    from mstkd.folder import finished_output
    from mstkd.infer import Predictor
    from mstkd.modalities import Subset
    from tests.helpers import SHAPE, make_labels, patch_header, write_nifti

    case = write_case(tmp_path / "in", "FeTS2022_00001")
    predictor = Predictor(tiny_checkpoint(tmp_path), "cpu")
    out = tmp_path / "out" / "FeTS2022_00001.nii.gz"

    def label_map(stamp: str) -> Path:
        path = write_nifti(out, make_labels(SHAPE))
        image = nib.load(path)
        image.header["descrip"] = stamp.encode()
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), path)
        return path

    ours = predictor.stamp(Subset.parse("flair+t1+t1ce+t2"))
    assert finished_output(label_map(ours), case, predictor)
    assert not finished_output(out, case, predictor, probabilities=tmp_path / "out" / "FeTS2022_00001.npz")
    assert not finished_output(out, case, predictor, modalities="flair")
    for stamp in ("", ours.replace("tta=0", "tta=1"), "mstkd 0123456789abcdef tta=0 flair+t1+t1ce+t2"):
        assert not finished_output(label_map(stamp), case, predictor)
    patch_header(label_map(ours), datatype=9999)
    assert not finished_output(out, case, predictor)
    label_map(ours).rename(tmp_path / "elsewhere.nii.gz")
    out.symlink_to(tmp_path / "elsewhere.nii.gz")
    assert not finished_output(out, case, predictor)


def test_one_case_that_fails_or_is_named_oddly_costs_only_itself(tmp_path, capsys, monkeypatch):
    """A CPU allocation that fails (PyTorch raises a plain RuntimeError) stopped the whole folder; a case name of
    230 characters made ``--continue`` raise (the temporary name grew past 255 bytes); an output folder inside the
    input folder became a failing case of every later run."""
    from mstkd.infer import Predictor

    ckpt, cases = tiny_checkpoint(tmp_path), tmp_path / "cases"
    ids = ["FeTS2022_00001", "Patient[01]", "L" * 230]
    for i, case_id in enumerate(ids):
        write_case(cases, case_id, shape=(40, 40, 32), seed=i, seg=False)
    out = cases / "preds"
    argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(cases), "--output-dir", str(out), "--quiet"]
    infer = Predictor.infer

    def out_of_memory(self, prepared):
        if prepared.files.case_id == ids[0]:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        return infer(self, prepared)

    monkeypatch.setattr(Predictor, "infer", out_of_memory)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"skipped {ids[0]}: [enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator" in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in ids[1:])
    monkeypatch.setattr(Predictor, "infer", infer)
    assert main([*argv, "--continue"]) == 0
    err = capsys.readouterr().err
    assert "2 of 3 cases finished earlier: kept" in err and "skipped preds" not in err
    record = json.loads((out / "predict.json").read_text())["cases"]
    assert record["written"] == [ids[0]] and sorted(record["kept"]) == sorted(ids[1:]) and not record["failed"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_an_output_folder_above_or_beside_the_cases_and_probabilities_of_another_setting(tmp_path, capsys):
    """An output folder that holds the input folder dropped every case; a part's output folder inside the input
    folder became a case of the next part; ``--continue`` kept probabilities another ``--tta`` setting made."""
    ckpt, data = tiny_checkpoint(tmp_path), tmp_path / "data"
    ids = ["FeTS2022_00001", "FeTS2022_00002", "FeTS2022_00003"]
    for i, case_id in enumerate(ids):
        write_case(data / "test", case_id, shape=(40, 40, 32), seed=i, seg=False)
    base = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(data / "test"), "--quiet"]
    assert main([*base, "--output-dir", str(data)]) == 0  # the output folder holds the input folder
    assert json.loads((data / "predict.json").read_text())["cases"]["written"] == ids
    for part in (0, 1):  # each part's output folder inside the input folder
        argv = [*base, "--output-dir", str(data / "test" / f"part{part}"), "--num-parts", "2", "--part-id", str(part)]
        assert main(argv) == 0
    parts = [json.loads((data / "test" / f"part{p}" / f"predict.part-{p}-of-2.json").read_text()) for p in (0, 1)]
    assert sorted(parts[0]["cases"]["written"] + parts[1]["cases"]["written"]) == ids
    out = ["--output-dir", str(tmp_path / "out"), "--save-probabilities"]
    assert main([*base, *out, "--tta"]) == 0
    assert main([*base, *out, "--continue"]) == 0  # without --tta: neither label maps nor probabilities are kept
    record = json.loads((tmp_path / "out" / "predict.json").read_text())["cases"]
    assert record["kept"] == [] and record["written"] == ids
    assert main([*base, *out, "--continue"]) == 0
    assert sorted(json.loads((tmp_path / "out" / "predict.json").read_text())["cases"]["kept"]) == ids
    with np.load(tmp_path / "out" / f"{ids[0]}.npz") as saved:
        assert str(saved["made_by"]).endswith("tta=0 flair+t1+t1ce+t2")
    capsys.readouterr()
    long = tmp_path / ("L" * 300 + ".nii.gz")  # a name no file system takes: one line, not a traceback
    case = str(data / "test" / ids[0])
    assert main(["predict", "--checkpoint", str(ckpt), "--case", case, "--out", str(long)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: [Errno 36] File name too long") and "Traceback" not in "\n".join(err)
