"""Reading and writing NIfTI volumes with checks that turn bad files into one-line errors.

Every read goes through :func:`read_header` (the header alone), :func:`read_volume` or
:func:`read_labels`, which refuse (with :class:`InputError`, one line) a file that is missing,
truncated or not NIfTI, and before a voxel is read, one whose header and extensions reach past
:data:`MAX_VOX_OFFSET` bytes (checked before nibabel reads the extensions), whose header claims more
than 3 axes, an empty axis or more than :data:`MAX_FILE_VOXELS` voxels, voxels that are not plain
numbers (complex, RGB), metres or micrometres as the spatial unit, or a geometry that is not a grid (a
non-finite or singular affine, a voxel size outside :data:`VOXEL_SIZE_RANGE`, a header voxel size
that is not the affine's); then one whose values are NaN, Inf, or beyond the range of the type they
are read as, and one too large for the memory left. Whatever nibabel raises for a broken file becomes
that one line, so one bad file costs its case, never a whole site or folder. Every write goes through
:func:`write_volume`, which writes to a temporary name and renames, so an interrupted run never leaves
a half-written file behind, and writes no header extension.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from mstkd.atomic import atomic_path
from mstkd.data.labels import label_map
from mstkd.errors import InputError, first_line
from mstkd.numbers import is_finite

AFFINE_TOLERANCE = 1e-3
"""Largest absolute difference (mm) between two affines that still counts as the same grid."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")

MAX_FILE_VOXELS = 500_000_000
"""The most voxels one file may hold (a 0.3 mm grid over 240 x 240 x 170 mm is 363 million; 2 GB as float32): a
header that claims more is refused before anything is allocated, since a few hundred bytes can claim terabytes."""

VOXEL_SIZE_RANGE = (1e-3, 1e3)
"""Voxel sizes (mm) a file may have; outside them a header describes no scan (a 1e-30 mm axis squashes a case to
one slice once resampled)."""

ZOOM_TOLERANCE = 0.01
"""Largest relative difference between a header's voxel size (``pixdim``) and its affine's column lengths: the
affine places the voxels (grid checks, resampling), the header's size measures distances (HD95), so a file on
which they disagree would be scored at another scale than it is read at. Float rounding is far below 1 %."""

MAX_VOX_OFFSET = 1 << 20
"""Where a file's voxels may start at the latest (bytes, 1 MiB). nibabel reads the header's extensions (free text,
DICOM headers) into memory whole, up to that offset, so a few MB of gzip holding gigabytes of "comment" would
otherwise be read by a header check; real extensions take kilobytes."""

HEADER_LAYOUTS = {348: (108, "f4"), 540: (168, "i8")}
"""``sizeof_hdr`` of NIfTI-1 and NIfTI-2 -> where their ``vox_offset`` lies (bytes) and its type."""

OTHER_UNITS = {1: "metres", 3: "micrometres"}
"""Spatial units (the NIfTI ``xyzt_units`` code's low three bits) that are not mm. The project reads every voxel
size and affine in mm, so a file in one of these is refused, not read a thousand times too coarse or too fine;
the code for mm (2), "unknown" (0) and the codes NIfTI leaves undefined (4..7) are read as mm."""


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


def check_layout(path: Path) -> None:
    """Refuse, from the fixed header alone (its first bytes, decompressed as nibabel would), a file that is not
    single-file NIfTI-1 or NIfTI-2, or whose voxels start past :data:`MAX_VOX_OFFSET` (or that announces extensions
    with no room for them: nibabel then reads them to the end of the file).

    Raises:
        InputError: one line naming the file.
    """
    try:
        with ImageOpener(path) as f:
            raw = f.read(max(HEADER_LAYOUTS) + 4)
            for order in "<>":
                size = int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0]) if len(raw) >= 4 else 0
                if size in HEADER_LAYOUTS and len(raw) >= size:
                    break
            else:
                raise InputError(f"{path}: not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)")
            at, kind = HEADER_LAYOUTS[size]
            offset = float(np.frombuffer(raw, dtype=f"{order}{kind}", count=1, offset=at)[0])
            if not offset <= MAX_VOX_OFFSET:
                raise InputError(f"{path}: its voxels start at byte {offset:.4g}, past {MAX_VOX_OFFSET} (extensions)")
            flagged = len(raw) >= size + 4 and raw[size] != 0
            if flagged:  # the extensions' own sizes, which nibabel believes, up to where the voxels start
                raw += f.read(max(int(offset) - len(raw), 0))
    except InputError:
        raise
    except Exception as exc:  # gzip and bz2 raise several types for a damaged stream
        raise InputError(f"{path}: not a readable NIfTI file ({first_line(exc)})") from None
    if flagged and offset < size + 4:
        raise InputError(f"{path}: its header announces extensions but its voxels start at byte {offset:g}")
    start, left = size + 4, int(offset) - size - 4
    while flagged and left >= 16:  # as nibabel walks them: each claims its size, 8 bytes of it its own header
        claimed = int(np.frombuffer(raw, dtype=f"{order}i4", count=1, offset=start)[0]) if len(raw) >= start + 4 else 0
        if not 8 <= claimed <= left:
            raise InputError(
                f"{path}: a header extension claims {claimed} bytes, where {left} are left before the voxels"
            )
        start, left = start + claimed, left - claimed


def read_header(path: str | Path, *, channels: int = 1) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open a NIfTI file and check its header, reading no voxel: header extensions within :data:`MAX_VOX_OFFSET`
    bytes (:func:`check_layout`), 3 spatial axes (and a 4th of ``channels``, as the Medical Segmentation
    Decathlon stores its modalities; a trailing singleton 4th is accepted for 1), none empty, and
    :data:`MAX_FILE_VOXELS` voxels, plain numbers as voxels, a spatial unit that is not metres or micrometres, a
    finite non-singular affine, voxel sizes (the header's and the affine's) within :data:`VOXEL_SIZE_RANGE` that
    agree within :data:`ZOOM_TOLERANCE`.

    Raises:
        InputError: the file is missing or is not such a file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    check_layout(path)
    try:
        img = nib.load(path)
        shape, stored, affine = img.shape, img.get_data_dtype(), np.asarray(img.affine, dtype=np.float64)
        zooms = img.header.get_zooms()[:3]
    except Exception as exc:  # nibabel raises many types for a broken file (HeaderDataError is not a ValueError)
        raise InputError(f"{path}: not a readable NIfTI file ({first_line(exc)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI file ({type(img).__name__})")
    if min(shape, default=0) < 1:
        raise InputError(f"{path}: its header claims an empty axis (shape {tuple(int(n) for n in shape)})")
    if len(shape) == 4 and shape[3] == channels:
        shape = shape[:3]
    elif channels > 1:
        raise InputError(f"{path}: expected a 3-D volume of {channels} channels, got shape {tuple(shape)}")
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3-D volume, got shape {tuple(shape)}")
    if (voxels := float(np.prod(img.shape, dtype=np.float64))) > MAX_FILE_VOXELS:
        raise InputError(f"{path}: its header claims {voxels:.3g} voxels (at most {MAX_FILE_VOXELS:.3g})")
    if stored.kind not in "biuf" or stored.fields is not None or stored.subdtype is not None:
        raise InputError(f"{path}: its voxels are not plain numbers ({stored})")
    if unit := OTHER_UNITS.get(int(img.header["xyzt_units"]) & 0x07):
        raise InputError(f"{path}: its spatial unit is {unit}, not mm (convert the file to mm)")
    low, high = VOXEL_SIZE_RANGE
    columns = np.linalg.norm(affine[:3, :3], axis=0) if np.isfinite(affine).all() else None
    if columns is None or abs(np.linalg.det(affine[:3, :3])) == 0:
        raise InputError(f"{path}: its voxel-to-world affine is not a grid (not finite, or singular)")
    for where, sizes in (("its header's", zooms), ("its affine's", columns)):
        if not all(is_finite(float(z)) and low <= float(z) <= high for z in sizes):
            shown = " x ".join(f"{float(z):.3g}" for z in sizes)
            raise InputError(f"{path}: {where} voxel size {shown} mm is not in {low:g}..{high:g} mm")
    if any(abs(float(z) - c) > ZOOM_TOLERANCE * c for z, c in zip(zooms, columns, strict=True)):
        header, grid = (" x ".join(f"{float(z):.4g}" for z in sizes) for sizes in (zooms, columns))
        raise InputError(f"{path}: its header's voxel size {header} mm is not its affine's {grid} mm")
    return img


def read_volume(path: str | Path, *, dtype: type = np.float32, check_finite: bool = True, channels: int = 1) -> Volume:
    """Load a 3-D NIfTI file fully into memory, once :func:`read_header` has accepted it; with ``channels`` above 1,
    a file of that many 3-D volumes along a 4th axis (``H x W x D x channels``).

    Raises:
        InputError: :func:`read_header`'s refusals; voxels that cannot be read (truncated, corrupt, a scaling that
            is not finite, too many for the memory left); and with ``check_finite``, NaN/Inf voxels or values beyond
            ``dtype``'s range.
    """
    path = Path(path)
    img = read_header(path, channels=channels)
    with _memory_is_input(path, img):
        data = _voxels(path, img, channels)
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            out = data.astype(dtype, copy=False)
        # one pass over the voxels: the cast keeps NaN and Inf, and turns a value beyond the target's range into inf
        checked = out if np.issubdtype(out.dtype, np.floating) else data
        if check_finite and np.issubdtype(data.dtype, np.floating) and not np.isfinite(checked).all():
            if bad := int((~np.isfinite(data)).sum()):
                raise InputError(f"{path}: {bad} NaN or Inf voxels")
            bad = int((~np.isfinite(out)).sum())
            raise InputError(f"{path}: {bad} voxels beyond the range of {np.dtype(dtype).name}")
        return _volume(path, img, out)


def read_labels(path: str | Path) -> Volume:
    """Load a label map: integer values, as uint8 when they all lie in 0..255 (every label convention's do, so a
    map costs one byte a voxel), else in the type they are stored in, for the caller to name the values its
    convention refuses (:func:`mstkd.data.labels.check_labels`).

    Raises:
        InputError: :func:`read_header`'s refusals; voxels that cannot be read or do not fit in memory; NaN/Inf or
            non-integer values.
    """
    path = Path(path)
    img = read_header(path)
    with _memory_is_input(path, img):
        data = _voxels(path, img)
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise InputError(f"{path}: {int((~np.isfinite(data)).sum())} NaN or Inf voxels")
        return _volume(path, img, label_map(data, path))


def _voxels(path: Path, img: nib.Nifti1Image | nib.Nifti2Image, channels: int = 1) -> np.ndarray:
    """The voxels as stored (scaled when the header says so), 3-D (4-D with ``channels`` above 1)."""
    try:
        data = np.asarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt data, a scaling nibabel refuses
        raise InputError(f"{path}: not a readable NIfTI file ({first_line(exc)})") from None
    return data[..., 0] if data.ndim == 4 and channels == 1 else data


def _volume(path: Path, img: nib.Nifti1Image | nib.Nifti2Image, data: np.ndarray) -> Volume:
    header = img.header.copy()
    header.extensions.clear()  # the copy's own list: what is written from this header carries none
    return Volume(path=path, data=data, affine=img.affine.copy(), header=header)


@contextmanager
def _memory_is_input(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> Iterator[None]:
    """A file whose voxels, or any array made from them while it is read, do not fit in memory is that file's
    error (one line), not the whole run's."""
    try:
        yield
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read its {math.prod(img.shape):.3g} voxels") from None


def check_same_grid(reference: Volume, other: Volume) -> None:
    """Refuse ``other`` unless it has the same shape and affine as ``reference``."""
    check_grid(other.path, other.data.shape, other.affine, reference.path, reference.data.shape, reference.affine)


def check_grid(
    path: Path,
    shape: Sequence[int],
    affine: np.ndarray,
    reference: Path,
    ref_shape: Sequence[int],
    ref_affine: np.ndarray,
) -> None:
    """Refuse the file ``path`` unless its ``shape`` and ``affine`` (from a header or a volume) are those of the
    file ``reference``, the affine within :data:`AFFINE_TOLERANCE`."""
    shape, ref_shape = tuple(int(n) for n in shape), tuple(int(n) for n in ref_shape)
    ref = reference if reference.name == Path(path).name else reference.name  # the same name in another folder
    if shape != ref_shape:
        raise InputError(f"{path}: not on the grid of {ref}: shape {shape} differs from {ref_shape}")
    if not np.allclose(ref_affine, affine, atol=AFFINE_TOLERANCE):
        diff = float(np.abs(np.asarray(ref_affine) - np.asarray(affine)).max())
        raise InputError(f"{path}: not on the grid of {ref}: affine differs by up to {diff:.4g} mm")


def write_volume(
    path: str | Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None
) -> Path:
    """Write ``data`` as NIfTI atomically (temporary file, then rename).

    With a ``header`` the output copies its geometry (qform/sform, zooms, units) and its fields, never its
    extensions nor its free text but ``descrip`` (which a caller sets); the data type is set from ``data``.
    """
    path = Path(path)
    img = nib.Nifti1Image(data, affine, header=header.copy() if header is not None else None)
    img.header.extensions.clear()  # an input's extensions (free text, a DICOM header) never reach an output
    img.header["aux_file"], img.header["intent_name"] = b"", b""  # nor its free-text fields (``descrip`` is set)
    img.set_data_dtype(data.dtype)
    if header is not None:
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
