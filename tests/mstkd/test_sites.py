"""A site's data (mstkd.data.sites): modalities declared or detected, and broken cases skipped and left untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mstkd.config import load_config
from mstkd.data.sites import site_data
from mstkd.runconfig import NodeConfig, RunConfig
from tests.helpers import patch_header, write_case, write_nifti


def test_deployed_site_modalities_declared_or_detected(tmp_path):
    from mstkd.data.sites import parse_dropped, site_data
    from mstkd.runconfig import NodeConfig, RunConfig
    from tests.helpers import write_case

    for i in range(4):
        write_case(tmp_path / "site", f"FeTS2022_{i:05d}", seed=i, modalities=("flair", "t1", "t2"))
    cfg = load_config(["model=tiny"])
    detected = site_data(RunConfig(), NodeConfig.parse({"data-path": str(tmp_path / "site")}), cfg)
    assert detected.available.name == "flair+t1+t2" and len(detected.subsets) == 7
    assert all(not s.mask[2] for s in detected.subsets)
    declared = site_data(
        RunConfig(),
        NodeConfig.parse({"data-path": str(tmp_path / "site"), "modalities": "flair,t2", "site-name": "h1"}),
        cfg,
    )
    assert declared.name == "h1" and declared.available.name == "flair+t2"
    assert not np.load(declared.train[0].folder / "image.npy")[1].any()  # T1 on disk, but not declared
    assert parse_dropped("2:t1ce; 3:t1ce,t2") == {
        "2": declared.available.parse("flair+t1+t2"),
        "3": declared.available.parse("flair+t1"),
    }


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".mstkd-cache" not in p.parts
    }


def write_broken_site(root: Path, good: int = 3) -> dict[str, str]:
    """``good`` valid cases plus one of each kind of broken case; returns broken case -> what is wrong."""
    for i in range(good):
        write_case(root, f"FeTS2022_{i:05d}", seed=i)
    broken = {
        "FeTS2022_00101": "truncated",
        "FeTS2022_00102": "missing t1ce",
        "FeTS2022_00103": "shape mismatch",
        "FeTS2022_00104": "NaN voxels",
        "FeTS2022_00105": "wrong labels",
        "FeTS2022_00106": "a header claiming 30000^3 voxels",
        "FeTS2022_00107": "intensities whose z-score overflows float32",
        "FeTS2022_00108": "a singular affine (its voxel size is read before the case is)",
        "split.csv": "named like the cache's own file",
    }
    for case in broken:
        write_case(root, case, seed=7)
    t2 = root / "FeTS2022_00101" / "FeTS2022_00101_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[:200])
    (root / "FeTS2022_00102" / "FeTS2022_00102_t1ce.nii.gz").unlink()
    write_nifti(root / "FeTS2022_00103" / "FeTS2022_00103_t1.nii.gz", np.ones((20, 18, 9), np.float32))
    nan = np.full((20, 18, 14), 5.0, np.float32)
    nan[3, 3, 3] = np.nan
    write_nifti(root / "FeTS2022_00104" / "FeTS2022_00104_flair.nii.gz", nan)
    labels = np.zeros((20, 18, 14), np.uint8)
    labels[5:9, 5:9, 5:9] = 3  # 3 is not a FeTS label
    write_nifti(root / "FeTS2022_00105" / "FeTS2022_00105_seg.nii.gz", labels)
    patch_header(root / "FeTS2022_00106" / "FeTS2022_00106_t1.nii.gz", dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    write_nifti(root / "FeTS2022_00107" / "FeTS2022_00107_t2.nii.gz", np.full((20, 18, 14), 3e38, np.float32))
    flair = root / "FeTS2022_00108" / "FeTS2022_00108_flair.nii.gz"
    patch_header(flair, srow_x=[0.0, 0.0, 0.0, 0.0], qform_code=0, sform_code=1)
    return broken


def test_broken_cases_are_skipped_with_one_warning_each_and_left_untouched(tmp_path, caplog):
    broken = write_broken_site(tmp_path / "site")
    before = _tree_digest(tmp_path / "site")
    cfg = load_config(["model=tiny"])
    with caplog.at_level("WARNING", logger="mstkd.data"):
        data = site_data(RunConfig(), NodeConfig.parse({"data-path": str(tmp_path / "site")}), cfg)
    assert data.available.name == "flair+t1+t1ce+t2"  # one case without T1ce does not make the site lack it
    assert set(data.federation.skipped) == set(broken)
    kept = {e.case_id for e in data.train + data.val}
    assert kept == {"FeTS2022_00000", "FeTS2022_00001", "FeTS2022_00002"}
    lines = [r.getMessage() for r in caplog.records if r.name == "mstkd.data"]
    assert len(lines) == len(broken)
    for case in broken:
        (line,) = [m for m in lines if case in m]
        assert "\n" not in line
    assert "t1ce" in next(m for m in lines if "00102" in m)
    assert "NaN" in next(m for m in lines if "00104" in m)
    assert "label value" in next(m for m in lines if "00105" in m)
    assert "claims 2.7e+13 voxels" in next(m for m in lines if "00106" in m)
    assert "t2 intensities up to 3e+38 overflow float32" in next(m for m in lines if "00107" in m)
    assert "affine is not a grid" in next(m for m in lines if "00108" in m)
    assert "the cache uses itself" in next(m for m in lines if "split.csv" in m)
    assert _tree_digest(tmp_path / "site") == before  # nothing on disk modified or deleted


def test_a_simulation_refuses_drop_modalities_for_a_site_it_does_not_have(tmp_path):
    """A misspelt site id must not leave that site with every modality unnoticed."""
    import pytest

    from mstkd.errors import InputError
    from tests.helpers import write_case

    lines = ["Partition_ID,Subject_ID"]
    for i in range(4):
        write_case(tmp_path / "data", f"FeTS2022_{i:05d}", seed=i)
        lines.append(f"{1 + i % 2},FeTS2022_{i:05d}")
    (tmp_path / "partitioning.csv").write_text("\n".join(lines) + "\n")
    paths = {"data-path": str(tmp_path / "data"), "partitioning": str(tmp_path / "partitioning.csv")}
    node = NodeConfig.parse({"partition-id": 0, "num-partitions": 2})
    cfg = load_config(["model=tiny"])
    with pytest.raises(InputError, match="drop-modalities names site '3', but the sites are 1, 2"):
        site_data(RunConfig.parse({**paths, "drop-modalities": "3:t1ce"}), node, cfg)
    assert site_data(RunConfig.parse({**paths, "drop-modalities": "1:t1ce"}), node, cfg).available.name == (
        "flair+t1+t2"
    )
