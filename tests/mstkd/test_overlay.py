"""``mstkd overlay``: a case's scan with its reference and prediction over it, in the radiological convention and
the voxels' true aspect whatever the file's voxel order; the prediction's Dice in the title; a map on another grid
refused; a data folder as one picture per case."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from mstkd.cli import main
from mstkd.data.layouts import detect_case
from mstkd.data.nifti import Volume
from mstkd.errors import InputError
from mstkd.overlay import Oriented, _slices, overlay
from tests.helpers import write_case, write_nifti

SHAPE = (24, 20, 16)


def _case(root, case_id="FeTS2022_00001", affine=None, order=(0, 1, 2)):
    """A case whose scan is bright on the patient's right, anterior and superior side of the tumour, written with
    its voxels in ``order`` (and the affine that keeps every voxel where it is in the world)."""
    folder = write_case(root, case_id, shape=SHAPE)
    if order == (0, 1, 2):
        return detect_case(folder)
    for path in folder.iterdir():
        img = nib.load(path)
        data = np.transpose(np.asarray(img.dataobj), order)[::-1]  # axes permuted, the first reversed
        affine = img.affine[:, [*order, 3]]
        affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
        affine[:3, 0] *= -1
        path.unlink()
        write_nifti(path, data.astype(np.uint8 if path.name.endswith("seg.nii.gz") else np.float32), affine)
    return detect_case(folder)


def test_the_picture_is_the_same_whatever_the_files_voxel_order(tmp_path):
    """A file stored with its axes in another order (another scanner's, or a reorientation) is the same head: the
    picture must not turn or mirror with the voxel order."""
    plain = overlay(_case(tmp_path / "a"), tmp_path / "a.png")
    assert plain is None  # a reference only: no scores
    overlay(_case(tmp_path / "b", order=(2, 0, 1)), tmp_path / "b.png")
    a, b = (matplotlib.image.imread(tmp_path / f"{n}.png") for n in "ab")
    assert a.shape == b.shape and np.array_equal(a, b)


def test_the_patients_right_is_on_the_left_and_anterior_and_superior_are_up():
    """RAS+: high x is the patient's right, high y anterior, high z superior (radiological convention)."""
    data = np.zeros((5, 6, 7), np.float32)
    data[4, 5, 6] = 1.0  # right, anterior, superior corner
    oriented = Oriented.of(Volume(Path("ras"), data, np.diag([1.0, 1.0, 1.0, 1.0]), nib.Nifti1Header()))
    views = _slices(oriented.data, (4, 5, 6))
    assert views["axial"][0, 0] == 1  # top row (anterior), first column (right)
    assert views["coronal"][0, 0] == 1  # top row (superior), first column (right)
    assert views["sagittal"][0, 0] == 1  # top row (superior), first column (anterior)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # the same corner stored in LPS order is voxel (0, 0, 6)
    flipped = Oriented.of(Volume(Path("lps"), data[::-1, ::-1].copy(), lps, nib.Nifti1Header()))
    assert np.array_equal(flipped.data, oriented.data) and flipped.index((0, 0, 6), data.shape) == (4, 5, 6)


def test_the_prediction_is_scored_against_the_reference_and_one_on_another_grid_refused(tmp_path, capsys):
    case = _case(tmp_path / "data")
    seg = nib.load(case.seg)
    shifted = np.roll(np.asarray(seg.dataobj), 2, axis=0)
    pred = write_nifti(tmp_path / "pred.nii.gz", shifted.astype(np.uint8), seg.affine)
    assert main(["overlay", str(case.folder), "--pred", str(pred), "--out", str(tmp_path / "x.png")]) == 0
    line = capsys.readouterr().err
    assert line.startswith(f"wrote {tmp_path / 'x.png'} (Dice ET ") and "WT " in line
    assert matplotlib.image.imread(tmp_path / "x.png").shape[0] > 200  # two rows of views
    other = write_nifti(tmp_path / "other.nii.gz", shifted[:-1].astype(np.uint8), seg.affine)
    with pytest.raises(InputError, match="other.nii.gz: not on the grid of .*flair"):
        overlay(case, tmp_path / "y.png", pred=other)
    assert not (tmp_path / "y.png").exists()
    with pytest.raises(InputError, match="--slices 0 0 99: give three voxel indices within"):
        overlay(case, tmp_path / "y.png", slices=(0, 0, 99))


def test_a_data_folder_gives_one_picture_per_case_and_a_broken_case_costs_itself(tmp_path, capsys):
    for i in (1, 2, 3):
        _case(tmp_path / "data", f"FeTS2022_0000{i}")
    (tmp_path / "data" / "FeTS2022_00003" / "FeTS2022_00003_seg.nii.gz").write_bytes(b"not a nifti file")
    assert main(["overlay", str(tmp_path / "data"), "--out", str(tmp_path / "png"), "--quiet"]) == 1
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["FeTS2022_00001.png", "FeTS2022_00002.png"]
    err = capsys.readouterr().err
    assert "skipped FeTS2022_00003:" in err and "wrote 2 pictures to" in err
    assert main(["overlay", str(tmp_path / "png")]) == 2  # no case folder at all: one line
    assert "neither a case folder nor a folder of case folders" in capsys.readouterr().err
    # a prediction folder that lacks a case's prediction: that case is named, not drawn with its reference alone
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "FeTS2022_00001.nii.gz").write_bytes(
        (tmp_path / "data/FeTS2022_00001/FeTS2022_00001_seg.nii.gz").read_bytes()
    )
    assert main(["overlay", str(tmp_path / "data"), "--pred", str(preds), "--out", str(tmp_path / "p"), "--quiet"]) == 1
    assert "skipped FeTS2022_00002: no prediction FeTS2022_00002.nii.gz in" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["FeTS2022_00001.png"]
    assert main(["overlay", str(tmp_path / "data"), "--pred", str(preds / "FeTS2022_00001.nii.gz")]) == 2
    assert "not a folder (for a data folder, give the folder of <CaseID>.nii.gz)" in capsys.readouterr().err


@pytest.mark.parametrize("spacing", [(2, 2, 2), (1, 8, 1), (8, 1, 1), (0.5, 0.5, 6)])
def test_every_view_draws_the_head_at_one_scale_whatever_its_voxel_size(tmp_path, spacing):
    """A 50 mm tumour in a 200 mm cube: the views were laid out by voxel count, so with 8 mm voxels on one axis one
    view drew it 14 pixels wide and the others 101."""
    shape = tuple(round(200 / s) for s in spacing)
    x, y, z = np.meshgrid(*[(np.arange(n) + 0.5) * s - 100 for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    radius = np.sqrt(x**2 + y**2 + z**2)
    affine = np.diag([*map(float, spacing), 1.0])
    folder = tmp_path / "FeTS2022_00001"
    write_nifti(folder / "FeTS2022_00001_flair.nii.gz", np.where(radius <= 80, 100.0, 0.0).astype(np.float32), affine)
    seg = np.where(radius <= 25, 2, 0).astype(np.uint8)
    write_nifti(folder / "FeTS2022_00001_seg.nii.gz", seg, affine)
    overlay(detect_case(folder), tmp_path / "x.png")
    rgb = matplotlib.image.imread(tmp_path / "x.png")[..., :3]
    green = (rgb[..., 1] - rgb[..., 0] > 0.3)[rgb.shape[0] // 8 :]  # below the title
    columns = np.flatnonzero(green.any(axis=0))
    views = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)  # the three drawings of the tumour
    sizes = [(len(v), int(green[:, v].any(axis=1).sum())) for v in views]
    assert len(sizes) == 3
    assert max(max(s) for s in sizes) <= 1.25 * min(min(s) for s in sizes)  # one scale: within a few pixels
