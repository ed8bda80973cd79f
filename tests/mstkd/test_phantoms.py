"""Phantom cases and federations: determinism, label geometry, contrasts, site styles, files on disk."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mstkd import phantoms
from mstkd.cli import main
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES
from mstkd.phantoms import SiteStyle, federation, make_case, phantom_affine, preview, site_style, write_federation

SMALL = (48, 48, 32)
MEDIUM = (64, 64, 40)


def _case(seed: int, shape=SMALL, style: SiteStyle | None = None) -> phantoms.PhantomCase:
    return make_case(np.random.default_rng(seed), shape, style)


@pytest.fixture(scope="module")
def cases() -> list[phantoms.PhantomCase]:
    return [_case(seed, MEDIUM if seed % 2 else SMALL, site_style(seed % 4 + 1, 0)) for seed in range(6)]


def _mean(img: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() > 0
    return float(img[mask].mean())


# --------------------------------------------------------------------------- single cases


def test_same_seed_gives_identical_case_and_different_seed_differs():
    a, b, c = _case(3), _case(3), _case(4)
    for m in MODALITIES:
        assert a.images[m].dtype == np.float32 and a.images[m].shape == SMALL
        assert a.images[m].tobytes() == b.images[m].tobytes()
        assert not np.array_equal(a.images[m], c.images[m])
    assert a.labels.dtype == np.uint8 and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_affine_keeps_the_brats_field_of_view_and_orientation():
    brats = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(phantom_affine((240, 240, 155)), brats)
    case = _case(0)
    spacing = np.diag(case.affine)[:3]
    assert (spacing[:2] < 0).all() and spacing[2] > 0
    np.testing.assert_allclose(np.abs(spacing) * np.array(SMALL), [240, 240, 155])


def test_labels_are_nested_and_inside_the_brain(cases):
    enclosed = []
    for case in cases:
        labels, brain = case.labels, case.brain
        assert set(np.unique(labels)) == {0, 1, 2, 3}, "all labels present at the default sizes"
        assert not (labels[~brain]).any(), "tumour stays inside the brain"
        for m in MODALITIES:
            assert not case.images[m][~brain].any(), f"{m} is not zero outside the brain"
            assert (case.images[m][brain] > 0).all(), f"{m} has zeros inside the brain"
        # Necrosis is wrapped by enhancing tumour, the tumour core by edema.
        nec = labels == 1
        shell = ndimage.binary_dilation(nec) & ~nec
        enclosed.append(np.isin(labels[shell], [1, 3]).mean())
        assert enclosed[-1] > 0.6
        core = np.isin(labels, [1, 3])
        shell = ndimage.binary_dilation(core) & ~core
        assert (labels[shell] == 2).mean() > 0.5
        # Nested radii: necrosis nearest the centre, edema farthest out.
        centre = np.argwhere(nec).mean(axis=0)
        spacing = np.abs(np.diag(case.affine)[:3])
        dist = {k: np.linalg.norm((np.argwhere(labels == k) - centre) * spacing, axis=1).mean() for k in (1, 2, 3)}
        assert dist[1] < dist[3] < dist[2]
    assert np.mean(enclosed) > 0.85


def test_tumour_sizes_scale_with_the_grid():
    def mean_wt_ml(shape):
        vols = []
        for seed in range(4):
            case = _case(seed, shape)
            vols.append((case.labels > 0).sum() * np.prod(np.abs(np.diag(case.affine)[:3])) / 1000)
        return np.mean(vols)

    coarse, fine = mean_wt_ml(SMALL), mean_wt_ml((96, 96, 64))
    assert 20 < fine < 400
    assert 0.5 < coarse / fine < 2.0


@pytest.mark.parametrize("site", [None, 1, 2, 3])
def test_contrasts_match_the_expected_appearance(site):
    case = _case(11, MEDIUM, None if site is None else site_style(site, 0))
    im, lab, t = case.images, case.labels, case.tissue
    healthy = lab == 0
    wm = healthy & (t["wm"] > 0.8)
    gm = healthy & (t["gm"] > 0.7)
    csf = healthy & (t["csf"] > 0.8)
    et, edema, nec = lab == 3, lab == 2, lab == 1
    # Tumour against healthy tissue within 30 mm of it, as a reader compares them (the bias field varies slowly).
    near = ndimage.distance_transform_edt(healthy, sampling=np.abs(np.diag(case.affine)[:3])) < 30
    assert _mean(im["t1ce"], et) > 1.2 * _mean(im["t1ce"], wm & near), "enhancing rim bright on T1ce"
    assert _mean(im["flair"], edema) > 1.2 * _mean(im["flair"], wm & near), "edema bright on FLAIR"
    assert _mean(im["flair"], edema) > 1.2 * _mean(im["flair"], gm & near)
    assert _mean(im["t2"], csf) > 1.5 * _mean(im["t2"], wm), "CSF bright on T2"
    assert _mean(im["flair"], csf) < _mean(im["flair"], wm), "CSF dark on FLAIR"
    assert _mean(im["t1"], nec) < _mean(im["t1"], wm) and _mean(im["t1ce"], nec) < _mean(im["t1ce"], wm)
    assert _mean(im["t1"], wm) > _mean(im["t1"], gm) > _mean(im["t1"], csf)


def test_intensities_are_on_the_documented_scale():
    case = _case(2, MEDIUM)
    for m in MODALITIES:
        inside = case.images[m][case.brain]
        assert 200 < np.median(inside) < 1000
        assert inside.max() < 2500


# --------------------------------------------------------------------------- site styles


def test_site_styles_are_deterministic_different_and_in_range():
    assert site_style(2, 7) == site_style(2, 7)
    styles = [site_style(p, 0) for p in range(1, 41)]
    assert len({json.dumps(s.scale, sort_keys=True) for s in styles}) == len(styles)
    assert site_style(1, 0) != site_style(1, 1)
    for s in styles:
        assert all(0.75 <= v <= 1.25 for v in s.scale.values())
        assert all(0.8 <= v <= 1.25 for v in s.gamma.values())
        assert 0.01 <= s.noise_sd <= 0.05 and 0.04 <= s.bias_strength <= 0.2
        lo, hi = s.tumour_size
        assert 0.55 <= lo < hi <= 1.45
    with pytest.raises(InputError):
        site_style(-1, 0)


def test_sites_look_different():
    # Same anatomy and tumour draws (same rng seed), different site: intensities and noise must differ.
    means, noise = [], []
    for site in (1, 2, 3, 4):
        case = _case(5, MEDIUM, site_style(site, 0))
        img, brain = case.images["t1"], case.brain
        means.append(img[brain].mean())
        # High-pass residual inside white matter measures the noise level.
        wm = ndimage.binary_erosion((case.tissue["wm"] > 0.95) & (case.labels == 0))
        noise.append((img - ndimage.uniform_filter(img, 3))[wm].std() / img[wm].mean())
    assert np.std(means) / np.mean(means) > 0.05
    assert max(noise) > 1.5 * min(noise)


# --------------------------------------------------------------------------- federations on disk


def _read_partitions(path: Path) -> list[tuple[int, str]]:
    assert path.read_bytes().startswith(b"Partition_ID,Subject_ID\r\n")
    with open(path, newline="") as fh:
        return [(int(r["Partition_ID"]), r["Subject_ID"]) for r in csv.DictReader(fh)]


@pytest.mark.parametrize(
    ("layout", "suffixes", "label_values", "first_id"),
    [
        ("fets", ("_flair", "_t1", "_t1ce", "_t2", "_seg"), {0, 1, 2, 4}, "FeTS2022_90001"),
        ("brats2023", ("-t2f", "-t1n", "-t1c", "-t2w", "-seg"), {0, 1, 2, 3}, "BraTS-GLI-90001-000"),
    ],
)
def test_write_federation_layouts(tmp_path, layout, suffixes, label_values, first_id):
    out = tmp_path / "fed"
    csv_path = write_federation(
        out, cases=5, sites=2, shape=SMALL, layout=layout, seed=3, site_sizes=[4, 1], progress=False
    )
    assert csv_path == out / "partitioning.csv"
    rows = _read_partitions(csv_path)
    ids = [sid for _, sid in rows]
    assert ids[0] == first_id and len(set(ids)) == 5
    assert Counter(p for p, _ in rows) == {1: 4, 2: 1}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"], "no temporary folder left behind"

    seen_labels: set[int] = set()
    for sid in ids:
        files = sorted((out / sid).iterdir())
        assert sorted(f.name for f in files) == sorted(f"{sid}{s}.nii.gz" for s in suffixes)
        images = {f.name: nib.load(f) for f in files}
        affines = [img.affine for img in images.values()]
        for a in affines[1:]:
            np.testing.assert_allclose(a, affines[0])
        seg = next(img for name, img in images.items() if "seg" in name)
        values = set(np.unique(np.asarray(seg.dataobj)).tolist())
        assert values <= label_values
        seen_labels |= values
        assert seg.get_data_dtype() == np.uint8
        assert all(img.shape == SMALL for img in images.values())
    assert seen_labels == label_values

    meta = json.loads((out / "phantoms.json").read_text())
    assert meta["seed"] == 3 and meta["layout"] == layout and meta["shape"] == list(SMALL)
    assert set(meta["site_styles"]) == {"1", "2"} and meta["site_sizes"] == [4, 1]


def test_write_federation_is_deterministic(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    for out in (a, b):
        write_federation(out, cases=2, sites=2, shape=SMALL, seed=9, progress=False)
    for case in sorted(p.name for p in a.iterdir() if p.is_dir()):
        for f in sorted((a / case).iterdir()):
            assert (
                np.asarray(nib.load(f).dataobj).tobytes() == np.asarray(nib.load(b / case / f.name).dataobj).tobytes()
            )
    assert (a / "partitioning.csv").read_bytes() == (b / "partitioning.csv").read_bytes()


def test_a_federation_that_starts_after_another_draws_new_cases_of_the_same_sites(tmp_path):
    train = write_federation(tmp_path / "train", cases=3, sites=2, shape=SMALL, seed=9, progress=False).parent
    test = write_federation(tmp_path / "test", cases=2, sites=2, shape=SMALL, seed=9, first_case=4, progress=False)
    test = test.parent
    train_ids = sorted(p.name for p in train.iterdir() if p.is_dir())
    test_ids = sorted(p.name for p in test.iterdir() if p.is_dir())
    assert train_ids == ["FeTS2022_90001", "FeTS2022_90002", "FeTS2022_90003"]
    assert test_ids == ["FeTS2022_90004", "FeTS2022_90005"]
    meta = [json.loads((f / "phantoms.json").read_text()) for f in (train, test)]
    assert meta[0]["site_styles"] == meta[1]["site_styles"]  # the same sites ...
    assert meta[1]["first_case"] == 4 and meta[1]["site_sizes"] == [1, 1]

    # ... but new draws: the last case of each is site 2's, and they differ
    def flair(folder, case):
        return np.asarray(nib.load(folder / case / f"{case}_flair.nii.gz").dataobj)

    assert not np.array_equal(flair(test, "FeTS2022_90005"), flair(train, "FeTS2022_90003"))
    with pytest.raises(InputError, match="case numbers must lie in"):
        write_federation(tmp_path / "bad", cases=2, sites=1, shape=SMALL, first_case=9999, progress=False)


def test_default_site_sizes_are_balanced():
    assert federation._site_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert federation._site_counts(7, [100, 1, 1]) == [5, 1, 1]
    assert sum(federation._site_counts(23, [5, 3, 1, 1])) == 23


def test_write_federation_refuses_bad_requests(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        write_federation(busy, cases=2, sites=1, shape=SMALL, progress=False)
    assert (busy / "keep.txt").read_text() == "x"
    with pytest.raises(InputError, match="at least one case per site"):
        write_federation(tmp_path / "few", cases=2, sites=3, shape=SMALL, progress=False)
    with pytest.raises(InputError):
        write_federation(tmp_path / "sizes", cases=4, sites=2, shape=SMALL, site_sizes=[1], progress=False)
    with pytest.raises(InputError):
        write_federation(tmp_path / "layout", cases=2, sites=1, shape=SMALL, layout="msd", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_write_federation_fills_an_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_federation(out, cases=1, sites=1, shape=SMALL, progress=False)
    assert (out / "partitioning.csv").is_file() and (out / "FeTS2022_90001").is_dir()


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    real_write = federation.write_volume
    calls = 0

    def flaky_write(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 7:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(federation, "write_volume", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        write_federation(tmp_path / "fed", cases=3, sites=1, shape=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_federation(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["phantoms", str(out), "--cases", "4", "--sites", "2", "--shape", "48", "48", "32", "--quiet"]) == 0
    rows = _read_partitions(out / "partitioning.csv")
    assert len(rows) == 4 and {p for p, _ in rows} == {1, 2}
    assert main(["phantoms", str(out), "--cases", "4", "--sites", "2", "--shape", "48", "48", "32", "--quiet"]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_preview_draws_the_tumour_slice(tmp_path):
    out = tmp_path / "fed"
    write_federation(out, cases=1, sites=1, shape=SMALL, layout="brats2023", progress=False)
    png = preview(out / "BraTS-GLI-90001-000", tmp_path / "preview.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    with pytest.raises(InputError):
        preview(tmp_path, tmp_path / "none.png")
