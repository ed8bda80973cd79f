"""Data layer: layouts, validation, normalisation, cache, partitions, transforms."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mstkd.config import load_config
from mstkd.data.cache import CaseCache
from mstkd.data.cases import load_case, normalize
from mstkd.data.dataset import make_loader, prepare_federation
from mstkd.data.geometry import orientation_of
from mstkd.data.labels import (
    CLASSES,
    CONVENTIONS,
    classes_from_regions,
    labels_from_regions,
    regions_from_classes,
    regions_from_labels,
)
from mstkd.data.layouts import detect_case, find_case_folders
from mstkd.data.partitions import make_split, read_partitions, write_split_csv
from mstkd.errors import InputError
from tests.helpers import (
    AFFINE,
    MODALITY_LEVEL,
    SHAPE,
    make_labels,
    patch_header,
    write_case,
    write_nifti,
    write_partitions,
)

FETS_CSVS = Path(__file__).resolve().parents[2] / "simulations" / "fets"
DATA_CFG = load_config().data


# --- layouts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,ext", [("fets", ".nii.gz"), ("fets", ".nii"), ("brats2023", ".nii.gz"), ("brats2023", ".nii")]
)
def test_detect_case_both_layouts_and_extensions(tmp_path, layout, ext):
    case_id = "FeTS2022_00001" if layout == "fets" else "BraTS-GLI-00001-000"
    folder = write_case(tmp_path, case_id, layout, ext=ext)
    files = detect_case(folder)
    assert files.layout == layout
    assert files.available == ("flair", "t1", "t1ce", "t2")
    assert files.seg is not None and files.seg.name.endswith(f"seg{ext}")
    # t1 and t1ce are told apart, and brats2023 names map to the canonical keys
    expected = {"fets": {"t1": "_t1", "t1ce": "_t1ce"}, "brats2023": {"t1": "-t1n", "t1ce": "-t1c"}}[layout]
    for key, suffix in expected.items():
        assert files.images[key].name == f"{case_id}{suffix}{ext}"


def test_case_order_is_canonical_regardless_of_file_names(tmp_path):
    for layout, case_id in (("fets", "A"), ("brats2023", "B")):
        case = load_case(detect_case(write_case(tmp_path, case_id, layout)))
        brain = case.image[0] > 0
        means = [float(case.image[c][brain].mean()) for c in range(4)]
        assert means == pytest.approx([MODALITY_LEVEL[m] for m in ("flair", "t1", "t1ce", "t2")], abs=3)


def test_regions_per_convention(tmp_path):
    # BraTS 2023: ET = 3, and label 4 (resection cavity) belongs to no region.
    seg = np.array([0, 1, 2, 3, 4])
    et, tc, wt = regions_from_labels(seg, CONVENTIONS["brats2023"])
    assert et.tolist() == [False, False, False, True, False]
    assert tc.tolist() == [False, True, False, True, False]
    assert wt.tolist() == [False, True, True, True, False]
    et, tc, wt = regions_from_labels(np.array([0, 1, 2, 4]), CONVENTIONS["fets"])
    assert et.tolist() == [False, False, False, True] and tc.tolist() == [False, True, False, True]
    # round trip regions -> labels in each convention
    for name, enhancing in (("fets", 4), ("brats2023", 3)):
        labels = make_labels(enhancing=enhancing)
        back = labels_from_regions(regions_from_labels(labels, CONVENTIONS[name]), CONVENTIONS[name])
        np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize(
    ("name", "netc", "ed", "et", "background"),
    [("fets", 1, 2, 4, (0,)), ("brats2023", 1, 2, 3, (0, 4))],  # BraTS 2023+: the resection cavity (4) is background
)
def test_classes_and_regions_per_convention(name, netc, ed, et, background):
    """Label map -> regions -> the four exclusive training classes -> regions again, in each convention."""
    convention = CONVENTIONS[name]
    seg = np.array([*background, netc, ed, et])
    classes = classes_from_regions(regions_from_labels(seg, convention))
    assert CLASSES == ("NETC", "ED", "ET", "BG")
    assert classes.sum(0).tolist() == [1] * len(seg)  # exactly one class per voxel
    n = len(background)
    expected = {
        "BG": list(range(n)),
        "NETC": [n],
        "ED": [n + 1],
        "ET": [n + 2],
    }
    for i, cls in enumerate(CLASSES):
        assert np.flatnonzero(classes[i]).tolist() == expected[cls], cls
    et_mask, tc_mask, wt_mask = regions_from_classes(classes)
    assert np.flatnonzero(et_mask).tolist() == [n + 2]  # ET = ET
    assert np.flatnonzero(tc_mask).tolist() == [n, n + 2]  # TC = NETC | ET
    assert np.flatnonzero(wt_mask).tolist() == [n, n + 1, n + 2]  # WT = NETC | ED | ET
    # a real label map survives labels -> regions -> classes -> regions -> labels
    labels = make_labels(enhancing=et)
    back = regions_from_classes(classes_from_regions(regions_from_labels(labels, convention)))
    np.testing.assert_array_equal(labels_from_regions(back, convention), labels)
    # overlapping class masks (independent thresholds) still give nested regions
    et_m, tc_m, wt_m = regions_from_classes(np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool))
    assert et_m.tolist() == [False, True] and tc_m.tolist() == [True, True] and wt_m.tolist() == [True, True]


def test_nested_trees_are_found(tmp_path):
    # BraTS 2018 keeps cases under HGG/ and LGG/
    write_case(tmp_path / "HGG", "Brats18_2013_2_1")
    write_case(tmp_path / "LGG", "Brats18_2013_0_1")
    folders = find_case_folders(tmp_path)
    assert set(folders) == {"Brats18_2013_2_1", "Brats18_2013_0_1"}


def test_a_site_folder_of_links_to_shared_cases_is_found(tmp_path):
    write_case(tmp_path / "shared", "FeTS2022_00001")
    write_case(tmp_path / "shared", "FeTS2022_00002")
    site = tmp_path / "site-a"
    site.mkdir()
    (site / "FeTS2022_00001").symlink_to(tmp_path / "shared" / "FeTS2022_00001", target_is_directory=True)
    (site / "loop").symlink_to(site, target_is_directory=True)  # a link back up the tree is walked once
    assert find_case_folders(site) == {"FeTS2022_00001": site / "FeTS2022_00001"}
    (site / "alias").symlink_to(tmp_path / "shared" / "FeTS2022_00001", target_is_directory=True)
    with pytest.raises(InputError, match="two links to one case"):
        find_case_folders(site)


# --- bad input ------------------------------------------------------------------------------------------------


def _corrupt(kind: str, folder: Path) -> str:
    """Break one file of a FeTS case in the way ``kind`` says; return a word the error must contain."""
    cid = folder.name
    flair = folder / f"{cid}_flair.nii.gz"
    if kind == "missing-modality":
        (folder / f"{cid}_t1ce.nii.gz").unlink()
        return "t1ce"
    if kind == "truncated":
        flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 2])
        return flair.name
    if kind == "not-nifti":
        with gzip.open(flair, "wb") as f:
            f.write(b"this is not an image" * 50)
        return flair.name
    if kind == "shape-mismatch":
        write_nifti(flair, np.ones((SHAPE[0] + 1, *SHAPE[1:]), dtype=np.float32))
        return "shape"
    if kind == "affine-mismatch":
        write_nifti(flair, nib.load(flair).get_fdata().astype(np.float32), AFFINE @ np.diag([1, 1, 1.5, 1]))
        return "affine"
    if kind == "nan":
        data = nib.load(flair).get_fdata().astype(np.float32)
        data[3, 3, 3] = np.nan
        write_nifti(flair, data)
        return "NaN"
    if kind == "inf":
        data = nib.load(flair).get_fdata().astype(np.float32)
        data[3, 3, 3] = np.inf
        write_nifti(flair, data)
        return "Inf"
    if kind == "huge-header":  # a few hundred bytes that claim 30000^3 voxels
        patch_header(flair, dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
        return "voxels"
    if kind == "rgb":
        rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        write_nifti(flair, rgb)
        return "plain numbers"
    if kind == "complex":
        write_nifti(flair, nib.load(flair).get_fdata().astype(np.complex64))
        return "plain numbers"
    if kind == "unknown-datatype":
        patch_header(flair, datatype=9999)
        return "data code 9999"
    if kind == "infinite-intercept":
        patch_header(flair, scl_slope=1.0, scl_inter=np.inf)
        return "intercept"
    if kind == "singular-affine":  # a row of zeros: no grid (nibabel will not save one, so the header is patched)
        patch_header(flair, srow_y=[0.0, 0.0, 0.0, 17.0], qform_code=0, sform_code=1)
        return "affine"
    if kind == "nan-voxel-size":  # the header's voxel size, under a sound affine
        pixdim = nib.load(flair).header["pixdim"].copy()
        pixdim[1] = np.nan
        patch_header(flair, pixdim=pixdim)
        return "voxel size"
    if kind == "metres":  # sizes of 0.001 pass the range check, but are a metre's thousandths: 1 mm voxels
        patch_header(flair, xyzt_units=1)
        return "metres, not mm"
    if kind == "float32-overflow":  # finite in the file, infinite once read as float32
        write_nifti(flair, np.full(SHAPE, 1e300))
        return "beyond the range of float32"
    if kind == "bad-label":
        write_nifti(folder / f"{cid}_seg.nii.gz", make_labels(enhancing=3))  # 3 is not a FeTS label
        return "label values 3 are not allowed"
    if kind == "fractional-label":
        write_nifti(folder / f"{cid}_seg.nii.gz", make_labels().astype(np.float32) + 0.5)
        return "non-integer"
    raise ValueError(kind)


BAD_KINDS = [
    "missing-modality",
    "truncated",
    "not-nifti",
    "shape-mismatch",
    "affine-mismatch",
    "nan",
    "inf",
    "bad-label",
    "fractional-label",
    "huge-header",
    "rgb",
    "complex",
    "unknown-datatype",
    "infinite-intercept",
    "singular-affine",
    "nan-voxel-size",
    "float32-overflow",
    "metres",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_case_is_refused_with_one_line(tmp_path, kind):
    folder = write_case(tmp_path, "FeTS2022_00007")
    word = _corrupt(kind, folder)
    with pytest.raises(InputError) as err:
        load_case(detect_case(folder))
    message = str(err.value)
    assert "\n" not in message and word in message


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_bad_input_exit_2_no_traceback_no_partial_output(dataset, kind, capsys):
    from mstkd.cli import main

    _corrupt(kind, dataset / "FeTS2022_00004")
    cache = dataset.parent / "cache"
    assert main(["preprocess", str(dataset), "--cache", str(cache), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    # entries written before the bad case are complete; nothing half-written is left
    if cache.exists():
        assert not [p for p in cache.iterdir() if p.name.startswith(".")]
        assert "FeTS2022_00004" not in {p.name for p in cache.iterdir()}
        assert not (cache / "split.csv").exists()


def test_cli_empty_folder_and_unknown_csv_cases(tmp_path, dataset, capsys):
    from mstkd.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["preprocess", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no case folders" in capsys.readouterr().err
    csv = write_partitions(tmp_path / "p.csv", {"1": ["FeTS2022_00001", "FeTS2022_99999"]})
    assert main(["preprocess", str(dataset), "--partitioning", str(csv), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "FeTS2022_99999" in err and "p.csv" in err and len(err.strip().splitlines()) == 1


# --- normalisation and cache ------------------------------------------------------------------------------------


def test_normalizations():
    rng = np.random.default_rng(0)
    image = np.zeros((4, 10, 10, 10), dtype=np.float32)
    image[:3, 2:8, 2:8, 2:8] = rng.normal(500, 50, (3, 6, 6, 6))  # channel 3 absent
    z = normalize(image, "zscore")
    brain = image[0] != 0
    for c in range(3):
        assert z[c][brain].mean() == pytest.approx(0, abs=1e-5)
        assert z[c][brain].std() == pytest.approx(1, abs=1e-4)
        assert (z[c][~brain] == 0).all()
    assert not z[3].any()
    m = normalize(image, "minmax")
    assert m[:3].min() == 0 and m[:3].max() == pytest.approx(1) and not m[3].any()
    with pytest.raises(InputError):
        normalize(image, "histogram")
    # finite float32 intensities whose normalisation overflows: refused in one line, never a NaN or a blank channel
    for scale, method in ((1e20, "zscore"), (3e38, "zscore"), (3e38, "minmax")):
        huge = image.copy()
        huge[1] *= scale / 500
        huge[1, 2, 2, 2] = -huge[1, 2, 2, 2]
        with pytest.raises(InputError, match=r"^case 7: t1 intensities up to .* overflow float32$"):
            normalize(huge, method, where="case 7")


def test_cache_second_read_does_not_touch_nifti(tmp_path, monkeypatch):
    folder = write_case(tmp_path / "data", "FeTS2022_00001")
    cache = CaseCache(tmp_path / "cache")
    first = cache.get(detect_case(folder))
    image, regions = np.array(first.image()), first.regions()

    def no_nifti(*args, **kwargs):
        raise AssertionError("NIfTI read on a cache hit")

    monkeypatch.setattr(nib, "load", no_nifti)
    second = cache.get(detect_case(folder))
    np.testing.assert_array_equal(second.image(), image)
    np.testing.assert_array_equal(second.regions(), regions)
    assert image.dtype == np.float16 and image.shape[0] == 4
    # the crop to the brain keeps every tumour voxel
    assert regions[2].sum() == (make_labels() > 0).sum()


def test_cache_rebuilds_when_source_or_setting_changes(tmp_path):
    folder = write_case(tmp_path / "data", "FeTS2022_00001")
    files = detect_case(folder)
    z = CaseCache(tmp_path / "cache").get(files)
    assert CaseCache(tmp_path / "cache", normalization="minmax").lookup(files) is None
    mm = CaseCache(tmp_path / "cache", normalization="minmax").get(files)
    assert float(np.asarray(mm.image()).max()) == pytest.approx(1.0, abs=1e-3)
    # a changed source file invalidates the entry
    seg = folder / "FeTS2022_00001_seg.nii.gz"
    write_nifti(seg, make_labels(offset=1))
    assert CaseCache(tmp_path / "cache", normalization="minmax").lookup(detect_case(folder)) is None
    assert z.case_id == "FeTS2022_00001"


def test_the_cache_never_replaces_a_folder_it_did_not_write(dataset, tmp_path, capsys):
    """``--cache`` set to the data folder (or a case folder) would have replaced each case's scans by its entry, and a
    folder of notes that shares a case's name would have been emptied: refused in one line, every file kept."""
    from mstkd.cli import main

    files = sorted(p for p in dataset.rglob("*") if p.is_file())
    for cache in (dataset, dataset / "FeTS2022_00001", dataset / "." / "FeTS2022_00002" / "..", dataset.parent):
        assert main(["preprocess", str(dataset), "--cache", str(cache), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "the cache folder may not be the data folder, a case folder or a folder above" in err
        assert len(err.splitlines()) == 1
    notes = tmp_path / "mycache" / "FeTS2022_00003"
    notes.mkdir(parents=True)
    (notes / "notes.txt").write_text("mine")
    assert main(["preprocess", str(dataset), "--cache", str(tmp_path / "mycache"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "FeTS2022_00003: not a cache entry (holds notes.txt)" in err and len(err.splitlines()) == 1
    assert (notes / "notes.txt").read_text() == "mine" and sorted(notes.iterdir()) == [notes / "notes.txt"]
    assert sorted(p for p in dataset.rglob("*") if p.is_file()) == files  # no scan removed, nothing added
    (notes / "notes.txt").unlink()
    (notes / ".DS_Store").write_text("")  # what a file system leaves in an entry does not make it someone's
    assert main(["preprocess", str(dataset), "--cache", str(tmp_path / "mycache"), "--quiet"]) == 0
    assert {p.name for p in notes.iterdir()} == {"image.npy", "regions.npy", "meta.json"}


def test_a_new_cache_folder_is_private_to_its_user(dataset, tmp_path):
    """The cache holds every case's voxels: it was created with the umask's permissions (world-readable under the
    usual 022, whatever the data folder allowed). A new one is now its user's only; one that exists is left as it is
    (a group that shares a cache makes the folder itself)."""
    import os

    from mstkd.cli import main

    old_umask = os.umask(0o022)
    try:
        assert main(["preprocess", str(dataset), "--cache", str(tmp_path / "elsewhere" / "cache"), "--quiet"]) == 0
        assert main(["preprocess", str(dataset), "--quiet"]) == 0  # the default cache, inside the data folder
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o2775)
        os.chmod(shared, 0o2775)
        assert main(["preprocess", str(dataset), "--cache", str(shared), "--quiet"]) == 0
    finally:
        os.umask(old_umask)
    for cache in (tmp_path / "elsewhere" / "cache", dataset / ".mstkd-cache"):
        assert cache.stat().st_mode & 0o7777 == 0o700
        assert any(cache.glob("*/image.npy"))
    assert shared.stat().st_mode & 0o7777 == 0o2775 and any(shared.glob("*/image.npy"))


def test_a_source_rewritten_with_its_old_mtime_or_a_damaged_entry_is_rebuilt(tmp_path):
    """``cp -p`` and ``rsync -t`` keep a file's modification time; another version of the same size then looked
    unchanged. A ``.nii.gz`` ends in a checksum of its content, which the fingerprint holds. An entry whose arrays
    are not what its meta.json says (damaged, or copied in from elsewhere) is not trusted either."""
    import gzip
    import os

    def write_stored(path: Path, labels: np.ndarray) -> None:  # gzip without compression: the size is the grid's
        write_nifti(path, labels)
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=0))

    folder = write_case(tmp_path / "data", "FeTS2022_00001")
    seg = folder / "FeTS2022_00001_seg.nii.gz"
    write_stored(seg, make_labels())
    cache = CaseCache(tmp_path / "cache")
    entry = cache.get(detect_case(folder))
    before = seg.stat()
    write_stored(seg, make_labels(offset=1))  # corrected labels: the same size ...
    os.utime(seg, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the same modification time
    assert seg.stat().st_size == before.st_size and seg.stat().st_mtime_ns == before.st_mtime_ns
    assert cache.lookup(detect_case(folder)) is None
    assert cache.get(detect_case(folder)).regions()[2].sum() == (make_labels(offset=1) > 0).sum()
    os.chmod(seg, 0o640)  # a change of permissions is no change of content
    assert cache.lookup(detect_case(folder)) is not None

    entry = cache.get(detect_case(folder))
    np.save(entry.folder / "image.npy", np.zeros((4, 5, 5, 5), np.float16))  # not the shape meta.json records
    assert cache.lookup(detect_case(folder)) is None
    for planted in (np.array([None] * 8, dtype=object), None):  # a pickle; an .npz in the .npy's place
        entry = cache.get(detect_case(folder))
        if planted is None:
            np.savez(entry.folder / "image.npz", x=np.zeros(3))
            (entry.folder / "image.npz").replace(entry.folder / "image.npy")
        else:
            np.save(entry.folder / "image.npy", planted, allow_pickle=True)
        assert cache.lookup(detect_case(folder)) is None
    entry = cache.get(detect_case(folder))
    (entry.folder / "meta.json").write_text("[1, 2]")  # JSON, but not an entry's
    assert cache.lookup(detect_case(folder)) is None
    # fields readers use, of another type: a text spacing ended mstkd evaluate in a traceback
    import json

    spacing = cache.get(detect_case(folder)).meta["source"]["spacing"]
    for key, value in (("source", {"spacing": ["x", "y", "z"]}), ("available", ["flair", "pd"]), ("shape", [0, 1, 2])):
        entry = cache.get(detect_case(folder))
        meta = json.loads((entry.folder / "meta.json").read_text())
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
        (entry.folder / "meta.json").write_text(json.dumps(meta))
        assert cache.lookup(detect_case(folder)) is None, key
    assert cache.get(detect_case(folder)).meta["source"]["spacing"] == spacing  # rebuilt


def test_a_cached_image_that_is_not_finite_is_refused_when_it_is_read(tmp_path):
    from mstkd.data.transforms import load_cached

    entry = CaseCache(tmp_path / "cache").get(detect_case(write_case(tmp_path / "data", "FeTS2022_00001")))
    image = np.load(entry.folder / "image.npy")
    image[0, 1, 1, 1] = np.nan
    np.save(entry.folder / "image.npy", image)
    with pytest.raises(InputError, match="the cached image is not finite; delete that folder to rebuild it"):
        load_cached(entry)


# --- partitions and split ---------------------------------------------------------------------------------------


def test_real_fets_partitions_read():
    p1 = read_partitions(FETS_CSVS / "partitioning_1.csv")
    p2 = read_partitions(FETS_CSVS / "partitioning_2.csv")
    assert len(p1.sites) == 23 and len(p2.sites) == 33
    assert len(p1.case_ids) == len(set(p1.case_ids)) == 1251
    assert set(p1.case_ids) == set(p2.case_ids)
    assert len(p1.sites["1"]) == 511 and len(p1.sites["18"]) == 382
    assert all(c.startswith("FeTS2022_") for c in p1.case_ids)


def test_split_deterministic_disjoint_and_test_held_out():
    parts = read_partitions(FETS_CSVS / "partitioning_1.csv")
    a = make_split(parts, seed=7)
    b = make_split(parts, seed=7)
    c = make_split(parts, seed=8)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    assert a.test != c.test
    seen: list[str] = []
    for site in a.sites:
        seen += a.train[site] + a.val[site]
        assert not set(a.train[site]) & set(a.val[site])
        assert a.train[site], f"site {site} has no training case"
    assert not set(seen) & set(a.test)
    assert sorted(seen + a.test) == sorted(parts.case_ids)
    # ~80/20 on the biggest site, tiny sites keep all cases for training/validation
    big = parts.sites["1"]
    n_rest = len(big) - sum(1 for t in a.test if a.test_origin[t] == "1")
    assert len(a.val["1"]) == round(0.2 * n_rest)
    assert not [t for t in a.test if a.test_origin[t] in ("9", "19")]  # 4-case sites


def test_split_csv_round_trip(tmp_path):
    parts = read_partitions(FETS_CSVS / "partitioning_2.csv")
    split = make_split(parts, seed=1)
    path = write_split_csv(split, tmp_path / "split.csv")
    again = make_split(read_partitions(path), seed=999)  # explicit column wins over the seed
    assert again.train == split.train and again.val == split.val and sorted(again.test) == sorted(split.test)


def test_partitions_refuse_bad_csv(tmp_path):
    (tmp_path / "a.csv").write_text("Site,Case\n1,x\n")
    (tmp_path / "b.csv").write_text("Partition_ID,Subject_ID\n1,x\n2,x\n")
    (tmp_path / "c.csv").write_text("Partition_ID,Subject_ID,TrainOrVal\n1,x,train\n1,y,maybe\n")
    (tmp_path / "d.csv").write_bytes("Partition_ID,Subject_ID\n1,Müller\n".encode("latin-1"))
    (tmp_path / "e.csv").write_text("Partition_ID,Subject_ID\n1," + "x" * 200_000 + "\n")  # past csv's field limit
    bad = {
        "a.csv": "header",
        "b.csv": "twice",
        "c.csv": "maybe",
        "missing.csv": "not found",
        "d.csv": "not UTF-8 text",
        "e.csv": "not a readable CSV",
    }
    for name, word in bad.items():
        with pytest.raises(InputError, match=word):
            read_partitions(tmp_path / name)
    # site ids that only look numeric to str.isdigit are names, sorted after the numbers
    (tmp_path / "f.csv").write_text("Partition_ID,Subject_ID\n²,a\n--1,b\n10,c\n2,d\n-3,e\n")
    assert list(read_partitions(tmp_path / "f.csv").sites) == ["-3", "2", "10", "--1", "²"]


# --- federation and loaders -------------------------------------------------------------------------------------


def test_prepare_federation_and_loaders(dataset):
    cfg = OmegaConf.merge(
        DATA_CFG, {"patch_size": [16, 16, 16], "foreground_ratio": 1.0, "split": {"test_fraction": 0.2}}
    )
    fed = prepare_federation(dataset, cfg, progress=False)
    assert fed.sites == ["1", "2"]
    assert len(fed.test_cases()) == 1  # round(0.2 * 6) from site 1; site 2 (4 cases) is too small to give one
    assert fed.split_csv.exists() and "| 1 |" in fed.summary()
    loader = make_loader(fed.site_cases("1", "train"), cfg, train=True)  # patch from data.patch_size
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (1, 4, 16, 16, 16)
    assert tuple(batch["label"].shape) == (1, 3, 16, 16, 16)
    assert batch["image"].dtype == torch.float32
    for batch in loader:  # foreground_ratio 1: every crop holds tumour
        assert batch["label"][:, 2].sum() > 0
    whole = next(iter(make_loader(fed.test_cases(), cfg, train=False)))
    assert whole["image"].shape[2:] == whole["label"].shape[2:]


def test_prepare_federation_without_csv_is_one_site(tmp_path):
    for i in range(3):
        write_case(tmp_path / "d", f"BraTS-GLI-0000{i}-000", "brats2023", seed=i)
    fed = prepare_federation(tmp_path / "d", DATA_CFG, progress=False)
    assert fed.sites == ["1"] and len(fed.split.train["1"]) + len(fed.split.val["1"]) == 3
    assert fed.entries["BraTS-GLI-00000-000"].meta["convention"] == "brats2023"
    shutil.rmtree(fed.cache_dir)


def test_odd_spacings_and_orientations_are_brought_to_the_target_and_warned_once(tmp_path, caplog):
    from tests.helpers import AFFINE

    flipped = AFFINE.copy()
    flipped[0, 0] = 1.0  # the first axis runs the other way: another orientation
    fine = np.diag([-0.9, -0.9, 0.9, 1.0])  # same orientation as AFFINE, smaller voxels
    thick = np.diag([-1.0, -1.0, 4.0, 1.0])  # slices 4x thicker than the in-plane size
    for i, affine in enumerate([AFFINE, AFFINE, AFFINE, flipped, fine, thick]):
        write_case(tmp_path / "d", f"FeTS2022_0000{i}", seed=i, affine=affine)
    with caplog.at_level("WARNING", logger="mstkd.data"):
        fed = prepare_federation(tmp_path / "d", DATA_CFG, progress=False)
        prepare_federation(tmp_path / "d", DATA_CFG, progress=False)  # the same site again: no new warning
    lines = [r.getMessage() for r in caplog.records if r.name == "mstkd.data"]
    assert len(lines) == 2 and all("\n" not in line and line.startswith("site 1: ") for line in lines)
    assert "3 of 6 cases reoriented or resampled to the target 1 x 1 x 1 mm LPS" in lines[0]
    assert any(f"{case} mm" in lines[0] for case in ("00003 from 1 x 1 x 1", "00004 from 0.9 x 0.9 x 0.9"))
    assert "1 of 6 cases have thick slices (e.g. FeTS2022_00005 at 1 x 1 x 4 mm)" in lines[1]
    # the median of the six cases' voxel sizes is the target; every entry is cached at it, in LPS
    assert fed.target.spacing == (1.0, 1.0, 1.0) and fed.target.orientation == "LPS"
    for entry in fed.entries.values():
        assert np.allclose(entry.meta["spacing"], 1.0) and orientation_of(np.array(entry.meta["affine"])) == "LPS"
    plain, mirrored = fed.entries["FeTS2022_00000"], fed.entries["FeTS2022_00003"]
    assert (
        not plain.meta["resampled"] and mirrored.meta["resampled"] and fed.entries["FeTS2022_00005"].meta["resampled"]
    )
    # reorienting is exact: the mirrored case's label map is the original's, flipped back
    seg = np.asarray(nib.load(tmp_path / "d/FeTS2022_00003/FeTS2022_00003_seg.nii.gz").dataobj)
    box = [slice(a, b) for a, b in mirrored.meta["crop_box"]]
    np.testing.assert_array_equal(mirrored.regions()[2], (seg > 0)[::-1][tuple(box)])
    # a thick-slice case becomes 4x as many 1 mm slices
    assert fed.entries["FeTS2022_00005"].meta["shape"][2] > 3 * fed.entries["FeTS2022_00005"].meta["source"]["shape"][2]


def test_a_regular_site_gets_no_geometry_warning(tmp_path, caplog):
    for i in range(3):
        write_case(tmp_path / "d", f"FeTS2022_0000{i}", seed=i)
    with caplog.at_level("WARNING", logger="mstkd.data"):
        prepare_federation(tmp_path / "d", DATA_CFG, progress=False)
    assert not [r for r in caplog.records if r.name == "mstkd.data"]
