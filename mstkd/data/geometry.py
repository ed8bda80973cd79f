"""The geometry a model is trained at, and the conversions into it and back out of it.

A network sees voxels, not millimetres: a tumour of 30 mm is 12 voxels wide at 2.5 mm and 30
voxels wide at 1 mm. So, as nnU-Net plans it, every model has a **target geometry**: a voxel
size (by default the per-axis median spacing of its training cases) and an orientation (the
axis codes of nibabel, e.g. ``LPS``: BraTS and FeTS files, and the phantoms, are stored that
way). Cases are reoriented and resampled to it when the cache is built, the checkpoint stores
it, and prediction resamples each case to it and the class probabilities back to the case's
own grid before they are decoded.

Interpolation: images trilinear; region masks (ET, TC, WT) linear per region, then ``>= 0.5``
(the regions are nested and linear interpolation keeps ``ET <= TC <= WT``, so the result stays
a valid label map); class probabilities trilinear. A case already within
:data:`SPACING_TOLERANCE` of the target and in its orientation is not touched at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mstkd.data.nifti import read_header
from mstkd.errors import InputError

SPACING_TOLERANCE = 0.01
"""Relative difference per axis within which a case counts as already at the target spacing."""

ANISOTROPY = 3.0
"""A case whose coarsest axis is more than this many times its finest is anisotropic (nnU-Net's threshold)."""

MIN_SPACING, MAX_SPACING = 0.3, 20.0
"""The voxel sizes (mm) a target may have: finer than any clinical brain MRI, coarser than any slice."""

MAX_VOXELS = 150_000_000
"""The most voxels a case may have once resampled (a 240 mm field of view at 0.45 mm; 2.4 GB for four float32
channels): a target far finer than a case would otherwise exhaust the memory of whoever resamples it."""

DEFAULT_ORIENTATION = "LPS"


def check_orientation(code: str) -> str:
    """``code`` upper-cased, when it names each of the three axes once (``LPS``, ``RAS``, ``PLI``, ...).

    Raises:
        InputError: anything else.
    """
    code = str(code).upper()
    axes = [{"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(c) for c in code]
    if len(code) != 3 or None in axes or sorted(axes) != [0, 1, 2]:  # type: ignore[type-var]
        raise InputError(f"orientation {code!r}: expected three axis codes such as LPS or RAS")
    return code


def check_spacing(values: Any, what: str = "target spacing") -> tuple[float, float, float]:
    """Three finite voxel sizes in mm within [:data:`MIN_SPACING`, :data:`MAX_SPACING`].

    Raises:
        InputError: any other value.
    """
    try:
        spacing = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{what}: expected three voxel sizes in mm, got {values!r}") from None
    if len(spacing) != 3 or not all(MIN_SPACING <= v <= MAX_SPACING for v in spacing):  # NaN fails too
        raise InputError(f"{what}: expected three voxel sizes in {MIN_SPACING}..{MAX_SPACING} mm, got {values!r}")
    return spacing  # type: ignore[return-value]


@dataclass(frozen=True)
class TargetGeometry:
    """The voxel size (mm, along the array axes in ``orientation``) and the orientation a model works at."""

    spacing: tuple[float, float, float]
    orientation: str = DEFAULT_ORIENTATION

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", check_spacing(self.spacing))
        object.__setattr__(self, "orientation", check_orientation(self.orientation))

    def to_dict(self) -> dict[str, Any]:
        return {"spacing": list(self.spacing), "orientation": self.orientation}

    def to_config(self) -> dict[str, Any]:
        """The ``data`` section's keys that hold this geometry."""
        return {"target_spacing": list(self.spacing), "orientation": self.orientation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetGeometry:
        return cls(tuple(data["spacing"]), str(data.get("orientation", DEFAULT_ORIENTATION)))  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, data_cfg: Any) -> TargetGeometry | None:
        """The ``data`` section's ``target_spacing`` and ``orientation``; None while the spacing is to be planned."""
        spacing = data_cfg.get("target_spacing")
        if spacing is None:
            return None
        return cls(tuple(spacing), str(data_cfg.get("orientation") or DEFAULT_ORIENTATION))

    def describe(self) -> str:
        return f"{format_spacing(self.spacing)} mm {self.orientation}"


def format_spacing(spacing: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in spacing)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes (the lengths of the affine's columns)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))  # type: ignore[return-value]


def orientation_of(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def oriented_spacing(affine: np.ndarray, orientation: str) -> tuple[float, float, float]:
    """The voxel size of a grid once reoriented to ``orientation`` (its axes permuted accordingly)."""
    spacing = spacing_of(affine)
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64)),
        nib.orientations.axcodes2ornt(tuple(orientation)),
    )
    out = [0.0, 0.0, 0.0]
    for axis, (to, _) in enumerate(transform):
        out[int(to)] = spacing[axis]
    return tuple(out)  # type: ignore[return-value]


def header_affine(path: str | Path) -> np.ndarray:
    """The voxel-to-world affine of a NIfTI file, from its header alone (the voxels are not read).

    Raises:
        InputError: a file whose header :func:`mstkd.data.nifti.read_header` refuses.
    """
    return np.asarray(read_header(path).affine, dtype=np.float64)


def plan_spacing(spacings: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """The per-axis median of ``spacings``: nnU-Net's target spacing from the cases' voxel sizes, and a federation's
    from its sites' medians (one vote per site, :mod:`server.plan`).

    Raises:
        InputError: no spacing to plan from.
    """
    values = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    if not len(values):
        raise InputError("no case to plan the target spacing from")
    return tuple(float(v) for v in np.median(values, axis=0))


def is_anisotropic(spacing: Sequence[float]) -> bool:
    """True when the coarsest axis is over :data:`ANISOTROPY` times the finest (thick slices)."""
    return max(spacing) > ANISOTROPY * min(spacing)


def at_target(affine: np.ndarray, target: TargetGeometry) -> bool:
    """True when a grid is already in ``target``'s orientation and within tolerance of its spacing."""
    if orientation_of(affine) != target.orientation:
        return False
    return all(abs(s - t) <= SPACING_TOLERANCE * t for s, t in zip(spacing_of(affine), target.spacing, strict=True))


def to_target(
    volumes: np.ndarray, affine: np.ndarray, target: TargetGeometry, *, brain: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``C x H x W x D`` volumes on the grid ``affine`` -> the same volumes reoriented and resampled to ``target``.

    Returns the new ``C x h x w x d`` float32 array and its affine (MONAI's ``Orientation`` then
    ``Spacing``, trilinear; zeros outside the source). A grid already at the target is returned as it is.

    ``brain`` (images): the brain mask (voxels non-zero in any channel) is resampled with the images
    (linear, ``>= 0.5``) and every voxel outside it is set to 0. An interpolator leaves small values just
    outside the brain, which the z-score normalisation would count as brain (:func:`mstkd.data.cases.brain_mask`).
    Measured with the demo's model on three phantom cases written at 1, 2.5, 3 and 4 mm: mean Dice 0.81 /
    0.78 / 0.62 / 0.58 without this step, 0.82 / 0.78 / 0.75 / 0.70 with it. Nothing smooths before a grid is
    made coarser (nnU-Net does not either); a cubic spline instead of trilinear gained at most 0.015 there.
    """
    if at_target(affine, target):
        return volumes, affine
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    extent = np.asarray(volumes.shape[1:]) * np.asarray(spacing_of(affine))  # the field of view, mm
    voxels = float(np.prod(extent) / np.prod(target.spacing))
    if voxels > MAX_VOXELS:
        raise InputError(
            f"resampling a {format_spacing(spacing_of(affine))} mm grid of {volumes.shape[1:]} to "
            f"{target.describe()} would make {voxels:.3g} voxels (at most {MAX_VOXELS:.3g})"
        )
    channels = [np.asarray(volumes, dtype=np.float32)]
    if brain:
        channels.append(np.any(channels[0] != 0, axis=0, keepdims=True).astype(np.float32))
    image = MetaTensor(torch.as_tensor(np.concatenate(channels)), affine=torch.as_tensor(affine))
    image = Orientation(axcodes=target.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    if not at_target(image.affine.numpy(), target):
        image = Spacing(pixdim=target.spacing, mode="bilinear", padding_mode="zeros", dtype=torch.float32)(image)
    out = image.numpy()
    if brain:
        out = out[:-1] * (out[-1:] >= 0.5)
    return np.ascontiguousarray(out, dtype=np.float32), image.affine.numpy().astype(np.float64)


def regions_to_target(regions: np.ndarray, affine: np.ndarray, target: TargetGeometry) -> np.ndarray:
    """``3 x H x W x D`` boolean nested regions -> the same on ``target``'s grid (linear per region, ``>= 0.5``)."""
    if at_target(affine, target):
        return regions
    resampled, _ = to_target(regions.astype(np.float32), affine, target, brain=False)
    return resampled >= 0.5


def from_target(values: np.ndarray, affine: np.ndarray, out_affine: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """``C x h x w x d`` values on the grid ``affine`` -> ``C x *out_shape`` on the grid ``out_affine``
    (MONAI's ``SpatialResample``, trilinear, edge values repeated beyond the source grid)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    image = MetaTensor(torch.as_tensor(np.asarray(values, dtype=np.float32)), affine=torch.as_tensor(affine))
    out = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
        image, dst_affine=torch.as_tensor(out_affine), spatial_size=tuple(int(n) for n in out_shape)
    )
    return np.asarray(out.numpy(), dtype=np.float32)
