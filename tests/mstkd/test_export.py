"""``mstkd export --format monai-bundle``: the bundle's files, and its labels against ``mstkd predict``'s.

The quick test runs the bundle in this process through ``monai.bundle.run``; the slow one runs
``python -m monai.bundle run`` in a new virtual environment that holds PyTorch, MONAI, nibabel and fire
(MONAI's command line), and no ``mstkd``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mstkd.cli import main
from mstkd.errors import InputError
from mstkd.export import export_bundle
from mstkd.phantoms import write_federation
from mstkd.provenance import sha256_of


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained for two steps, its bundle, and one case at the model's geometry (alone in a folder)."""
    tmp = tmp_path_factory.mktemp("export")
    write_federation(tmp / "data", cases=6, sites=2, shape=(48, 48, 32), seed=3, progress=False)
    argv = ["model=tiny", "train.amp=false", "train.epochs=1", "train.steps_per_epoch=2", "train.eval_subsets=full"]
    assert main(["train", "--data", str(tmp / "data"), "--out", str(tmp / "run"), "--quiet", *argv]) == 0
    assert main(["export", str(tmp / "run" / "best.pt"), str(tmp / "bundle")]) == 0
    (tmp / "cases").mkdir()
    (tmp / "cases" / "FeTS2022_90001").symlink_to(tmp / "data" / "FeTS2022_90001")
    case = tmp / "data" / "FeTS2022_90001"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp / "run" / "best.pt"),
                "--case",
                str(case),
                "--out",
                str(tmp / "mstkd.nii.gz"),
            ]
        )
        == 0
    )
    return tmp


def bundle_args(tmp: Path, output: Path) -> dict:
    bundle = tmp / "bundle"
    return {
        "config_file": str(bundle / "configs" / "inference.json"),
        "meta_file": str(bundle / "configs" / "metadata.json"),
        "bundle_root": str(bundle),
        "dataset_dir": str(tmp / "cases"),
        "output_dir": str(output),
    }


def same_labels(tmp: Path, output: Path) -> None:
    ours, theirs = nib.load(tmp / "mstkd.nii.gz"), nib.load(output / "FeTS2022_90001.nii.gz")
    assert np.allclose(ours.affine, theirs.affine) and ours.shape == theirs.shape
    labels = np.asarray(ours.dataobj)
    assert len(np.unique(labels)) > 1  # the untrained model predicts several classes: a comparison that can fail
    # At the model's geometry every step is the same but the convolutions' kernels: equal to the last voxel here.
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), labels)


def test_the_bundle_records_what_it_holds(exported):
    bundle = exported / "bundle"
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == {
        "configs/inference.json",
        "configs/metadata.json",
        "models/model.ts",
        "docs/README.md",
    }
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["mstkd"]["checkpoint_sha256"] == sha256_of(exported / "run" / "best.pt")
    assert meta["mstkd"]["labels"] == {"NETC": 1, "ED": 2, "ET": 4} and meta["mstkd"]["label_convention"] == "fets"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "NETC",
        "1": "ED",
        "2": "ET",
        "3": "BG",
    }
    assert meta["mstkd"]["modality_files"] == {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2"}
    with pytest.raises(InputError, match="not empty"):
        export_bundle(exported / "run" / "best.pt", bundle)


def test_the_bundle_gives_predicts_labels(exported, tmp_path):
    from monai.bundle import run

    run(**bundle_args(exported, tmp_path / "out"))
    assert torch.is_grad_enabled()  # the bundle leaves the process's grad mode as it found it
    same_labels(exported, tmp_path / "out")


@pytest.mark.slow
def test_the_bundle_runs_with_monai_alone(exported, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pins = [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "monai", "nibabel", "numpy")]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins, "fire"], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(python), "-c", "import mstkd"], cwd=tmp_path, env=env, capture_output=True)
    assert probe.returncode != 0  # the environment has no mstkd
    args = [f"--{key}={value}" for key, value in bundle_args(exported, tmp_path / "out").items()]
    subprocess.run([str(python), "-m", "monai.bundle", "run", *args], cwd=tmp_path, env=env, check=True)
    same_labels(exported, tmp_path / "out")


def test_a_sigmoid_model_is_decoded_by_threshold_in_the_bundle_too(tmp_path):
    """The other decoding: sigmoid class outputs, each class above eval.threshold (ET, else NETC, else ED)."""
    from monai.bundle import run

    from mstkd.checkpoint import save_checkpoint
    from mstkd.config import load_config
    from mstkd.model import build_networks
    from tests.helpers import write_case

    cfg = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[1,1,1]", "loss.activation=sigmoid"])
    torch.manual_seed(1)
    ckpt = save_checkpoint(tmp_path / "sigmoid.pt", build_networks(cfg.model)[1], cfg)
    case = write_case(tmp_path / "cases", "FeTS2022_90001", shape=(40, 36, 30), seed=2, seg=False)
    assert main(["export", str(ckpt), str(tmp_path / "bundle")]) == 0
    assert json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())["mstkd"]["decode"] == "threshold"
    assert (
        main(["predict", "--checkpoint", str(ckpt), "--case", str(case), "--out", str(tmp_path / "mstkd.nii.gz")]) == 0
    )
    run(**bundle_args(tmp_path, tmp_path / "out"))
    same_labels(tmp_path, tmp_path / "out")


def test_a_refused_export_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    """``model.ts`` was written before the settings were checked, so a refused export left a half bundle, and the
    next try was refused as "not empty"; an output that is a broken link or a file is one line too."""
    from mstkd.checkpoint import save_checkpoint
    from mstkd.config import load_config
    from mstkd.model import build_networks

    cfg = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[1,1,1]", "data.normalization=minmax"])
    ckpt = save_checkpoint(tmp_path / "minmax.pt", build_networks(cfg.model)[1], cfg)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    for out, reason in (("bundle", "writes the z-score only"), ("dangling", "a link to nothing"), ("file", "a file")):
        assert main(["export", str(ckpt), str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file", "minmax.pt"]

    # an empty folder given as it is, through a link, or as ``.``: filled in place, keeping its mode
    zscore = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[1,1,1]"])
    good = save_checkpoint(tmp_path / "good.pt", build_networks(zscore.model)[1], zscore)
    (tmp_path / "shared").mkdir(mode=0o2770)
    (tmp_path / "shared").chmod(0o2770)
    (tmp_path / "linked").symlink_to(tmp_path / "shared")
    (tmp_path / "here").mkdir()
    assert main(["export", str(good), str(tmp_path / "linked")]) == 0
    monkeypatch.chdir(tmp_path / "here")
    assert main(["export", str(good), "."]) == 0
    for folder in (tmp_path / "shared", tmp_path / "here"):
        assert sorted(p.name for p in folder.iterdir()) == ["configs", "docs", "models"]
    assert (tmp_path / "linked").is_symlink() and (tmp_path / "shared").stat().st_mode & 0o7777 == 0o2770
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
