"""Target geometry: planning the voxel size, resampling to it and back, checkpoints that store it, predict in mm."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mstkd.checkpoint import checkpoint_geometry, load_checkpoint, save_checkpoint
from mstkd.cli import main
from mstkd.config import load_config
from mstkd.data.cases import load_case
from mstkd.data.geometry import (
    TargetGeometry,
    at_target,
    from_target,
    orientation_of,
    oriented_spacing,
    plan_spacing,
    regions_to_target,
    spacing_of,
    to_target,
)
from mstkd.data.labels import CLASSES, CONVENTIONS, REGIONS, labels_from_regions
from mstkd.data.layouts import case_path, detect_case
from mstkd.data.nifti import write_volume
from mstkd.data.sites import with_target
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES
from mstkd.model import build_networks
from mstkd.phantoms import phantom_affine, write_federation
from mstkd.scoring import score_pair
from tests.helpers import write_nifti

TINY = ["model=tiny", "train.amp=false"]


def _ball(shape, affine, centre_mm, radius_mm) -> np.ndarray:
    """Voxels of a grid whose centres lie within ``radius_mm`` of the world point ``centre_mm``."""
    ijk = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:]).T
    return (np.linalg.norm(world - centre_mm, axis=1) <= radius_mm).reshape(shape)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_plan_is_the_per_axis_median():
    assert plan_spacing([[1, 1, 1], [1, 1, 3], [2, 2, 5]]) == (1.0, 1.0, 3.0)
    assert plan_spacing([[1, 1, 1], [2.5, 2.5, 2.5], [0.8, 0.8, 6.0]]) == (1.0, 1.0, 2.5)
    with pytest.raises(InputError):
        plan_spacing([])
    # a case stored with its axes in another order is planned in the target's order
    swapped = np.array([[0, 0, 3.0, 0], [-1.0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    assert orientation_of(swapped) == "PIR" and oriented_spacing(swapped, "LPS") == (3.0, 1.0, 2.0)


@pytest.mark.parametrize(
    "spacing,orientation,message",
    [((0, 1, 1), "LPS", "voxel sizes"), ((1, 1), "LPS", "voxel sizes"), ((np.nan, 1, 1), "LPS", "voxel sizes"),
     ((1, 1, 1), "LPP", "axis codes"), ((1, 1, 1), "XYZ", "axis codes")],
)  # fmt: skip
def test_a_bad_target_is_refused_in_one_line(spacing, orientation, message):
    with pytest.raises(InputError, match=message):
        TargetGeometry(spacing, orientation)


def test_config_checks_the_target():
    assert load_config(["data.target_spacing=[1,1,1.5]"]).data.target_spacing == [1, 1, 1.5]
    with pytest.raises(InputError, match="data.target_spacing"):
        load_config(["data.target_spacing=[1,-1,1]"])
    with pytest.raises(InputError, match="data.orientation"):
        load_config(["data.orientation=up"])


def test_to_target_and_back_keeps_every_structure_where_it_is_in_mm():
    # a grid of 2.5 x 2.5 x 2.42 mm in RPS (the first axis mirrored), with a 12 mm ball off-centre
    affine = np.diag([2.5, -2.5, 2.421875, 1.0])
    affine[:3, 3] = [-100.0, 110.0, -60.0]
    shape = (64, 72, 50)
    ball = _ball(shape, affine, np.array([-40.0, 30.0, -10.0]), 12.0)
    target = TargetGeometry((1.0, 1.0, 1.0), "LPS")
    out, out_affine = to_target(ball[None].astype(np.float32), affine, target)
    assert orientation_of(out_affine) == "LPS" and np.allclose(spacing_of(out_affine), 1.0)
    # the resampled ball is the same ball in mm, drawn on the new grid
    expected = _ball(out.shape[1:], out_affine, np.array([-40.0, 30.0, -10.0]), 12.0)
    assert _dice(out[0] >= 0.5, expected) > 0.95
    back = from_target(out, out_affine, affine, shape)
    assert back.shape == (1, *shape) and _dice(back[0] >= 0.5, ball) > 0.97


def test_a_grid_at_the_target_is_not_touched_and_regions_stay_nested():
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    volumes = np.random.default_rng(0).random((4, 10, 12, 8)).astype(np.float32)
    target = TargetGeometry((2.0, 2.0, 2.0))
    same, same_affine = to_target(volumes, affine, target)
    assert same is volumes and same_affine is affine and at_target(affine, target)
    assert at_target(np.diag([-2.01, -2.0, 1.99, 1.0]), target)  # within 1 %
    centre = np.array([-9.0, -11.0, 7.0])
    regions = np.stack([_ball((10, 12, 8), affine, centre, r) for r in (3.0, 5.0, 8.0)])  # ET in TC in WT
    finer = regions_to_target(regions, affine, TargetGeometry((0.7, 0.7, 0.7)))
    assert finer.dtype == bool and finer.shape[1] > 2 * regions.shape[1]
    assert (finer[0] <= finer[1]).all() and (finer[1] <= finer[2]).all() and finer[0].any()


def test_checkpoints_store_their_geometry_and_an_old_one_has_none(tmp_path):
    cfg = load_config([*TINY, "data.target_spacing=[2.5,2.5,2.421875]", "data.orientation=lps"])
    student = build_networks(cfg.model)[1]
    _, _, payload = load_checkpoint(save_checkpoint(tmp_path / "new.pt", student, cfg))
    assert payload["geometry"] == {"spacing": [2.5, 2.5, 2.421875], "orientation": "LPS"}
    assert checkpoint_geometry(payload) == TargetGeometry((2.5, 2.5, 2.421875), "LPS")
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["geometry"]
    torch.save(old, tmp_path / "old.pt")
    assert checkpoint_geometry(load_checkpoint(tmp_path / "old.pt")[2]) is None


def _case_with_a_bright_ball(folder, affine, shape, centre_mm, radius_mm):
    """A FeTS-layout case: a brain ellipsoid in all four modalities, and a ball bright in FLAIR."""
    rng = np.random.default_rng(0)
    brain = _ball(shape, affine, np.array(centre_mm), 3 * radius_mm)
    ball = _ball(shape, affine, np.array(centre_mm), radius_mm)
    for m in ("flair", "t1", "t1ce", "t2"):
        data = np.where(brain, 100 + rng.normal(0, 1, shape), 0) + (300 * ball if m == "flair" else 0)
        write_nifti(case_path(folder, folder.name, "fets", m), data.astype(np.float32), affine)
    return ball


def _bright_is_oedema(net, image, subset, cfg, device=None, *, mirror=False):
    """A stand-in network that needs no training and knows no scale: bright FLAIR is oedema, the rest background."""
    probs = np.zeros((len(CLASSES), *image.shape[1:]), dtype=np.float32)
    probs[CLASSES.index("ED")] = 1 / (1 + np.exp(-4 * (np.asarray(image[0]) - 1.0)))
    probs[CLASSES.index("BG")] = 1 - probs[CLASSES.index("ED")]
    return probs


def test_predict_resamples_to_the_checkpoint_target_and_writes_in_the_case_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mstkd.infer.class_probabilities", _bright_is_oedema)
    cfg = load_config([*TINY, "data.target_spacing=[2,2,2]"])
    ckpt = save_checkpoint(tmp_path / "m.pt", build_networks(cfg.model)[1], cfg)
    # 0.8 mm, mirrored (RPS), with slices 4 mm thick: resampled, reoriented and warned about
    affine = np.diag([0.8, -0.8, 4.0, 1.0])
    affine[:3, 3] = [-40.0, 40.0, -30.0]
    shape = (100, 100, 16)
    case = tmp_path / "FeTS2022_00001"
    ball = _case_with_a_bright_ball(case, affine, shape, (0.0, 0.0, 0.0), 12.0)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--case", str(case), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "thick slices" in err and "0.8 x 0.8 x 4 mm -> 2 x 2 x 2 mm LPS (resampled)" in err
    pred = nib.load(out)
    assert pred.shape == shape and np.allclose(pred.affine, affine)
    assert _dice(np.asarray(pred.dataobj) == 2, ball) > 0.85  # the ball, found at 2 mm, lands where it is

    # the same checkpoint without its geometry (an older one): one line, and the case is not resampled
    old = torch.load(ckpt, weights_only=True)
    del old["geometry"]
    torch.save(old, tmp_path / "old.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "old.pt"), "--case", str(case), "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "voxel size" in line]
    assert len(lines) == 1 and "stores no training voxel size" in lines[0]
    assert nib.load(out).shape == shape


def test_a_node_takes_the_agreed_target_from_its_message_and_refuses_a_bad_one():
    cfg = load_config(TINY)
    assert cfg.data.target_spacing is None
    agreed = with_target(cfg, {"target-spacing": "2.5 2.5 2.421875", "orientation": "LPS"})
    assert list(agreed.data.target_spacing) == [2.5, 2.5, 2.421875]
    from mstkd.errors import RefusedMessage

    for bad in ("1 1", "nan 1 1", "0 1 1", "a b c", "1e9 1 1"):
        with pytest.raises(RefusedMessage, match="target geometry"):
            with_target(cfg, {"target-spacing": bad})
    # a run config that sets the geometry (a plan a site approved) takes that geometry only
    pinned = OmegaConf.merge(cfg, {"data": {"target_spacing": [1.0, 1.0, 2.0], "orientation": "LPS"}})
    same = with_target(pinned, {"target-spacing": "1.0 1 2", "orientation": "LPS"})
    assert list(same.data.target_spacing) == [1, 1, 2]
    for spacing, orientation in (("1 1 2.0001", "LPS"), ("1 1 2", "RAS"), ("2 1 1", "LPS")):
        with pytest.raises(RefusedMessage, match="target geometry .* is not this run's 1 x 1 x 2 mm LPS"):
            with_target(pinned, {"target-spacing": spacing, "orientation": orientation})


DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "data" / "demo-best.pt"
"""``best.pt`` of the default demo (``bash scripts/demo.sh``: three phantom sites on the 2.5 x 2.5 x 2.42 mm
grid), its weights stored in float16. A change to the network's shape makes it unloadable: run the demo again
and store its ``best.pt`` here with ``python tests/data/store_demo_checkpoint.py RUN/best.pt``."""


def _write_case(folder: Path, image: np.ndarray, regions: np.ndarray, affine: np.ndarray) -> None:
    for i, m in enumerate(MODALITIES):
        write_volume(case_path(folder, folder.name, "fets", m), image[i].astype(np.float32), affine)
    write_volume(
        case_path(folder, folder.name, "fets", "seg"), labels_from_regions(regions, CONVENTIONS["fets"]), affine
    )


def _partial_volume(image: np.ndarray, regions: np.ndarray, shape: tuple[int, int, int]) -> tuple:
    """The same field of view on a coarser grid of ``shape``: each voxel the mean of the finer voxels it covers (what
    a scanner with larger voxels measures, and how the phantoms model partial volume); a region keeps a voxel it
    fills at least half."""

    def area(a: np.ndarray) -> np.ndarray:
        return torch.nn.functional.adaptive_avg_pool3d(torch.as_tensor(a, dtype=torch.float32)[None], shape)[0].numpy()

    return area(image), area(regions.astype(np.float32)) >= 0.5


def _mean_dice(pred_dir: Path, case_dirs: list[Path]) -> float:
    scores = []
    for folder in case_dirs:
        ref = case_path(folder, folder.name, "fets", "seg")
        _, regions, _ = score_pair(pred_dir / f"{folder.name}.nii.gz", ref)
        scores.append(np.mean([regions[r]["dice"] for r in REGIONS]))
    return float(np.mean(scores))


@pytest.mark.slow
def test_the_demo_model_segments_the_same_anatomy_at_1_mm_and_at_4_mm(tmp_path, capsys):
    """Three demo-like phantom cases generated at 1 mm (the BraTS grid, finer than the model) and written again on
    the demo's 2.5 mm grid and on a 4 mm grid (coarser than the model) by partial-volume averaging: the demo's
    ``best.pt`` scores each version within 0.10 mean Dice of the 2.5 mm one. Without its stored target (as before
    target geometries) the 1 mm cases fall apart."""
    fine = write_federation(tmp_path / "fine", cases=3, sites=3, shape=(240, 240, 155), seed=77, progress=False)
    cases = sorted(p for p in fine.parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    versions = {"1 mm": cases}
    for name, shape in {"2.5 mm": (96, 96, 64), "4 mm": (60, 60, 40)}.items():
        versions[name] = []
        for folder in cases:
            case = load_case(detect_case(folder))
            image, regions = _partial_volume(case.image, case.regions, shape)
            _write_case(tmp_path / name / folder.name, image, regions, phantom_affine(shape))
            versions[name].append(tmp_path / name / folder.name)
    dice = {}
    for name, folders in versions.items():
        out = tmp_path / f"pred {name}"
        assert main(["predict", "--checkpoint", str(DEMO_CHECKPOINT), "--input-dir", str(folders[0].parent),
                     "--output-dir", str(out), "--quiet"]) == 0  # fmt: skip
        dice[name] = _mean_dice(out, folders)
    print(f"mean Dice over ET/TC/WT: {dice}")
    assert dice["2.5 mm"] > 0.6, dice  # the model segments its own grid
    assert abs(dice["1 mm"] - dice["2.5 mm"]) <= 0.10, dice  # a model of coarse voxels on a finer case
    assert abs(dice["4 mm"] - dice["2.5 mm"]) <= 0.10, dice  # a model of fine voxels on a coarser case

    old = torch.load(DEMO_CHECKPOINT, weights_only=True)
    del old["geometry"]
    torch.save(old, tmp_path / "old.pt")
    one = tmp_path / "one at 1 mm"
    shutil.copytree(cases[0], one / cases[0].name)
    assert main(["predict", "--checkpoint", str(tmp_path / "old.pt"), "--input-dir", str(one),
                 "--output-dir", str(tmp_path / "pred old"), "--quiet"]) == 0  # fmt: skip
    unresampled = _mean_dice(tmp_path / "pred old", [one / cases[0].name])
    print(f"{cases[0].name} at 1 mm, not resampled: mean Dice {unresampled:.3f}")
    assert unresampled < dice["2.5 mm"] - 0.2, (unresampled, dice)
