"""Reading and writing NIfTI volumes with checks that turn bad files into one-line errors.

Every read goes through :func:`read_volume`, which refuses (with :class:`InputError`)
a file that is missing, truncated, not NIfTI, not 3-D, or holds NaN/Inf voxels. Every
write goes through :func:`write_volume`, which writes to a temporary name and renames,
so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mstkd.atomic import atomic_path
from mstkd.errors import InputError

AFFINE_TOLERANCE = 1e-3
"""Largest absolute difference (mm) between two affines that still counts as the same grid."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Volume:
    """One 3-D image: voxels ``H x W x D``, the voxel-to-world affine, and the header to copy on write."""

    path: Path
    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(z) for z in self.header.get_zooms()[:3])  # type: ignore[return-value]


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def read_volume(path: str | Path, *, dtype: type = np.float32, check_finite: bool = True) -> Volume:
    """Load a 3-D NIfTI file fully into memory.

    Raises:
        InputError: the file is missing, unreadable, truncated, not NIfTI, not 3-D
            (a trailing singleton 4th axis is accepted), or contains NaN/Inf.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable NIfTI file ({reason})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI file ({type(img).__name__})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    if check_finite and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {bad} NaN or Inf voxels")
    return Volume(path=path, data=data.astype(dtype, copy=False), affine=img.affine.copy(), header=img.header.copy())


def check_same_grid(reference: Volume, other: Volume) -> None:
    """Refuse ``other`` unless it has the same shape and affine as ``reference``."""
    if reference.data.shape != other.data.shape:
        raise InputError(
            f"{other.path}: shape {other.data.shape} differs from {reference.path.name} {reference.data.shape}"
        )
    if not np.allclose(reference.affine, other.affine, atol=AFFINE_TOLERANCE):
        diff = float(np.abs(reference.affine - other.affine).max())
        raise InputError(f"{other.path}: affine differs from {reference.path.name} by up to {diff:.4g} mm")


def write_volume(
    path: str | Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None
) -> Path:
    """Write ``data`` as NIfTI atomically (temporary file, then rename).

    With a ``header`` the output copies its geometry (qform/sform, zooms, units);
    the data type is set from ``data``.
    """
    path = Path(path)
    img = nib.Nifti1Image(data, affine, header=header.copy() if header is not None else None)
    img.set_data_dtype(data.dtype)
    if header is not None:
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
