"""Shared fixtures: tiny hand-made cases in either on-disk layout (no phantom generator needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mstkd.data.layouts import case_path
from mstkd.modalities import MODALITIES

SHAPE = (20, 18, 14)
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 17], [0, 0, 1.0, 0], [0, 0, 0, 1]])
# Distinct mean intensity per modality, so tests can tell the channels apart.
MODALITY_LEVEL = {"flair": 100.0, "t1": 200.0, "t1ce": 300.0, "t2": 400.0}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def make_labels(shape=SHAPE, enhancing: int = 4, offset: int = 0) -> np.ndarray:
    """A box tumour: edema shell (2), enhancing layer (ET label), necrotic centre (1)."""
    seg = np.zeros(shape, dtype=np.uint8)
    c = [s // 2 for s in shape]
    c[0] += offset
    seg[c[0] - 5 : c[0] + 5, c[1] - 5 : c[1] + 5, c[2] - 4 : c[2] + 4] = 2
    seg[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = enhancing
    seg[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 1
    return seg


def write_case(
    root: Path,
    case_id: str,
    layout: str = "fets",
    *,
    shape=SHAPE,
    seed: int = 0,
    ext: str = ".nii.gz",
    modalities=MODALITIES,
    seg: bool = True,
    affine: np.ndarray = AFFINE,
) -> Path:
    """Write one small case; brain = an ellipsoid, intensities = level + noise inside it."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    brain = (((grid - centre[:, None, None, None]) / (centre[:, None, None, None] + 0.5)) ** 2).sum(0) <= 1.0
    for m in modalities:
        data = np.where(brain, MODALITY_LEVEL[m] + rng.normal(0, 10, shape), 0).astype(np.float32)
        write_nifti(case_path(folder, case_id, layout, m).with_suffix("").with_suffix(ext), data, affine)
    if seg:
        labels = make_labels(shape, enhancing=4 if layout == "fets" else 3, offset=seed % 3)
        write_nifti(case_path(folder, case_id, layout, "seg").with_suffix("").with_suffix(ext), labels, affine)
    return folder


def write_partitions(path: Path, sites: dict[str, list[str]], crlf: bool = True) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n" if crlf else "\n")
        writer.writerow(["Partition_ID", "Subject_ID"])
        for site, cases in sites.items():
            writer.writerows([site, c] for c in cases)
    return path


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test's own ``$MSTKD_HOME``: a deployed node keeps its state there when its node config names no
    ``state-dir`` (it never takes a folder from the run config), and nothing may land in the user's ~/.mstkd."""
    home = tmp_path_factory.mktemp("mstkd-home")
    monkeypatch.setenv("MSTKD_HOME", str(home))
    return home


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Ten FeTS-layout cases over two sites (6 + 4) with ``partitioning.csv``."""
    root = tmp_path / "data"
    ids = [f"FeTS2022_{i:05d}" for i in range(1, 11)]
    for i, case_id in enumerate(ids):
        write_case(root, case_id, seed=i)
    write_partitions(root / "partitioning.csv", {"1": ids[:6], "2": ids[6:]})
    return root
