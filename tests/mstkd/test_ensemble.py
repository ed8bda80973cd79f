"""``mstkd ensemble``: the averaged probabilities of several prediction folders, decoded as the models decode them,
written on each case's grid; what it refuses; a bad case costs itself."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from mstkd.checkpoint import save_checkpoint
from mstkd.cli import main
from mstkd.config import load_config
from mstkd.ensemble import ensemble_folders
from mstkd.errors import InputError
from mstkd.model import build_networks
from tests.helpers import write_case

CLASS = {"NETC": 0, "ED": 1, "ET": 2}


def one_class_checkpoint(folder, name: str, winner: str, activation: str = "softmax"):
    """A tiny student that gives every voxel it sees the class ``winner``, decisively."""
    cfg = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[1,1,1]", f"loss.activation={activation}"])
    net = build_networks(cfg.model)[1]
    bias = torch.full((4,), -10.0)
    bias[CLASS[winner]] = 10.0
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(bias)
    return save_checkpoint(folder / f"{name}.pt", net, cfg)


@pytest.fixture
def predictions(tmp_path):
    """Three prediction folders of the same two cases: two models say enhancing tumour, one edema."""
    for k in range(2):
        write_case(tmp_path / "cases", f"FeTS2022_0000{k + 1}", seed=k, seg=False)
    folders = {}
    for name, winner in (("et1", "ET"), ("et2", "ET"), ("ed", "ED")):
        ckpt = one_class_checkpoint(tmp_path, name, winner)
        folders[name] = tmp_path / name
        argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(tmp_path / "cases")]
        assert main([*argv, "--output-dir", str(folders[name]), "--save-probabilities", "--quiet"]) == 0
    return folders


def labels(path):
    return set(np.unique(np.asarray(nib.load(path).dataobj)).tolist()) - {0}


def test_the_majority_of_the_averaged_probabilities_wins(predictions, tmp_path):
    out = tmp_path / "ensemble"
    args = ["ensemble", "--input-dirs", *(str(predictions[n]) for n in ("et1", "et2", "ed"))]
    assert main([*args, "--output-dir", str(out), "--quiet"]) == 0
    for case in ("FeTS2022_00001", "FeTS2022_00002"):
        assert labels(out / f"{case}.nii.gz") == {4}  # two of three say enhancing tumour
        ensembled, single = nib.load(out / f"{case}.nii.gz"), nib.load(predictions["ed"] / f"{case}.nii.gz")
        assert ensembled.shape == single.shape and np.allclose(ensembled.affine, single.affine)
    flipped = ensemble_folders(
        [predictions["ed"], predictions["ed"], predictions["et1"]], tmp_path / "e2", progress=False
    )
    assert flipped.written == ["FeTS2022_00001", "FeTS2022_00002"]
    assert labels(tmp_path / "e2" / "FeTS2022_00001.nii.gz") == {2}  # two of three say edema
    record = json.loads((out / "ensemble.json").read_text())
    assert record["decode"] == "argmax" and len(record["inputs"]) == 3
    assert all(len(i["checkpoints"]) == 1 and len(i["checkpoints"][0]) == 64 for i in record["inputs"])


def test_inputs_that_do_not_fit_together_are_refused(predictions, tmp_path):
    folders = [predictions["et1"], predictions["ed"]]
    with pytest.raises(InputError, match="at least two"):
        ensemble_folders(folders[:1], tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="is one of the inputs"):
        ensemble_folders(folders, predictions["ed"], progress=False)
    (predictions["ed"] / "FeTS2022_00002.npz").unlink()
    with pytest.raises(InputError, match="does not hold the same cases"):
        ensemble_folders(folders, tmp_path / "o", progress=False)
    record = predictions["et1"] / "predict.json"
    saved = json.loads(record.read_text())
    saved["config"]["loss"]["activation"], saved["config"]["eval"]["decode"] = "sigmoid", "auto"
    record.write_text(json.dumps(saved))
    with pytest.raises(InputError, match="decode in different ways"):
        ensemble_folders([predictions["et1"], predictions["et2"]], tmp_path / "o", progress=False)


def test_a_probabilities_file_that_is_not_its_case_costs_that_case(predictions, tmp_path):
    big = np.zeros((4, 64, 64, 64), np.float16)  # another grid's probabilities, far larger than the case's
    np.savez_compressed(predictions["ed"] / "FeTS2022_00001.npz", probabilities=big, classes=np.asarray(["a"]))
    result = ensemble_folders([predictions["et1"], predictions["ed"]], tmp_path / "o", progress=False)
    assert result.written == ["FeTS2022_00002"]
    assert "holds more than the" in result.failed["FeTS2022_00001"]


def test_each_case_is_written_in_the_labels_its_records_name(predictions, tmp_path):
    inputs = [predictions["et1"], predictions["et2"]]
    with pytest.raises(InputError, match="--labels"):
        ensemble_folders(inputs, tmp_path / "o", labels="bogus", progress=False)
    result = ensemble_folders(inputs, tmp_path / "o", labels="brats2023", progress=False)  # against the records
    assert result.written == [] and "predicted in fets labels" in result.failed["FeTS2022_00001"]
    for folder in inputs:  # records of an older version name no labels: --labels must
        record = json.loads((folder / "predict.json").read_text())
        del record["cases"]["conventions"]
        (folder / "predict.json").write_text(json.dumps(record))
    assert "give --labels" in ensemble_folders(inputs, tmp_path / "o", progress=False).failed["FeTS2022_00001"]
    assert ensemble_folders(inputs, tmp_path / "o", labels="brats2023", progress=False).written
    assert labels(tmp_path / "o" / "FeTS2022_00001.nii.gz") == {3}  # BraTS 2023's enhancing tumour


def test_a_threshold_ensemble_and_the_small_et_rule(tmp_path):
    """Sigmoid models decode by threshold: two of three above 0.5 passes. The rule at a volume above the whole
    case's drops the ensemble's ET, which then reads as necrosis, and is recorded."""
    write_case(tmp_path / "cases", "FeTS2022_00001", seg=False)
    folders = []
    for name, winner in (("a", "ET"), ("b", "ET"), ("c", "ED")):
        ckpt = one_class_checkpoint(tmp_path, name, winner, activation="sigmoid")
        folders.append(tmp_path / name)
        argv = ["predict", "--checkpoint", str(ckpt), "--input-dir", str(tmp_path / "cases")]
        assert main([*argv, "--output-dir", str(folders[-1]), "--save-probabilities", "--quiet"]) == 0
    result = ensemble_folders(folders, tmp_path / "o", progress=False)
    record = json.loads((tmp_path / "o" / "ensemble.json").read_text())
    assert result.written == ["FeTS2022_00001"] and record["decode"] == "threshold 0.5"
    assert labels(tmp_path / "o" / "FeTS2022_00001.nii.gz") == {4}
    volume = float(np.prod(nib.load(tmp_path / "o" / "FeTS2022_00001.nii.gz").shape))  # 1 mm voxels
    ensemble_folders(folders, tmp_path / "pp", et_min_mm3=volume + 1, progress=False)
    assert labels(tmp_path / "pp" / "FeTS2022_00001.nii.gz") == {1}
    assert json.loads((tmp_path / "pp" / "ensemble.json").read_text())["cases"]["et_dropped"] == ["FeTS2022_00001"]
    header = nib.load(tmp_path / "pp" / "FeTS2022_00001.nii.gz").header
    assert bytes(header["descrip"]).rstrip(b"\0").decode().endswith("!")


def test_broken_inputs_cost_their_case_or_are_refused_in_one_line(predictions, tmp_path):
    inputs = [predictions["et1"], predictions["ed"]]
    data = (predictions["ed"] / "FeTS2022_00001.nii.gz").read_bytes()
    (predictions["ed"] / "FeTS2022_00001.nii.gz").write_bytes(data[: len(data) // 2])  # truncated
    with np.load(predictions["et1"] / "FeTS2022_00002.npz") as saved:
        arrays = dict(saved)
    arrays["probabilities"][1] = 60000  # finite, far outside 0..1: it would outvote every other input
    np.savez_compressed(predictions["et1"] / "FeTS2022_00002.npz", **arrays)
    result = ensemble_folders(inputs, tmp_path / "o", progress=False)
    assert result.written == [] and set(result.failed) == {"FeTS2022_00001", "FeTS2022_00002"}
    assert "outside 0..1" in result.failed["FeTS2022_00002"]
    os.mkfifo(predictions["ed"] / "predict.part-1-of-2.json")  # reading it would wait for ever
    with pytest.raises(InputError, match="not a record of mstkd predict"):
        ensemble_folders(inputs, tmp_path / "o", progress=False)
