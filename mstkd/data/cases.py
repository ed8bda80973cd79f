"""Loading one case: validate its files, stack the modalities, normalise intensities.

A loaded case is a ``4 x H x W x D`` float32 image in canonical modality order
(FLAIR, T1, T1ce, T2; absent modalities zero-filled) plus, when present, the label map
as ``3 x H x W x D`` booleans ET, TC, WT. Every file must share the first image's shape
and affine; label maps must hold integers of the layout's convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from mstkd.data.labels import check_labels, regions_from_labels
from mstkd.data.layouts import CaseFiles
from mstkd.data.nifti import check_same_grid, read_labels, read_volume
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES, Subset

NORMALIZATIONS = ("zscore", "minmax")


@dataclass
class LoadedCase:
    """One case in memory, in canonical order, with the geometry of its files."""

    files: CaseFiles
    image: np.ndarray  # 4 x H x W x D float32, raw intensities (absent modalities 0)
    regions: np.ndarray | None  # 3 x H x W x D bool (ET, TC, WT), None without a label map
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]

    @property
    def available(self) -> Subset:
        """The modalities whose channels hold data."""
        return Subset.of(m for m, channel in zip(MODALITIES, self.image, strict=True) if channel.any())


def load_case(
    files: CaseFiles, *, required: Sequence[str] = MODALITIES, with_seg: bool = True, others: bool = True
) -> LoadedCase:
    """Read and validate every file of a case.

    Args:
        files: the case, as found by :func:`~mstkd.data.layouts.detect_case`.
        required: modalities that must be on disk.
        others: also read the other modalities present on disk; without, their channels stay zero
            (a site that declares it lacks a modality never uses it, even where a file exists).
        with_seg: read the label map too (and require it).

    Raises:
        InputError: a required file is missing, a file is unreadable, holds NaN/Inf,
            disagrees in shape or affine with the others, or a label value is not an
            integer of the layout's convention.
    """
    files.require(required, seg=with_seg)
    wanted = [m for m in MODALITIES if m in files.images and (others or m in required)]
    volumes = {m: read_volume(files.images[m]) for m in wanted}
    reference = next(iter(volumes.values()))
    for volume in volumes.values():
        check_same_grid(reference, volume)
    image = np.zeros((len(MODALITIES), *reference.data.shape), dtype=np.float32)
    for i, m in enumerate(MODALITIES):
        if m in volumes:
            image[i] = volumes[m].data

    if not image.any():
        raise InputError(f"{files.folder}: every voxel of the images read ({', '.join(volumes)}) is zero")
    regions = None
    if with_seg:
        seg = read_labels(files.seg)  # type: ignore[arg-type]
        check_same_grid(reference, seg)
        check_labels(seg.data, files.convention, seg.path)
        regions = regions_from_labels(seg.data, files.convention)
    return LoadedCase(files, image, regions, reference.affine, reference.header, reference.spacing)


def brain_mask(image: np.ndarray) -> np.ndarray:
    """``H x W x D`` mask of voxels non-zero in any modality (the data are skull-stripped)."""
    return (image != 0).any(axis=0)


def normalize(
    image: np.ndarray, method: str = "zscore", mask: np.ndarray | None = None, *, where: object = "image"
) -> np.ndarray:
    """Per-modality intensity normalisation of a ``C x H x W x D`` image.

    - ``zscore``: ``(x - mean_B) / std_B`` inside the brain mask B, 0 outside (nnU-Net, MONAI
      ``NormalizeIntensity(nonzero=True, channel_wise=True)``).
    - ``minmax``: ``(x - min) / (max - min)`` over the whole volume (the official MST-KDNet code).

    All-zero channels (absent modalities) stay zero.

    Raises:
        InputError: an unknown method, or a channel whose finite values are too large to normalise in float32 (from
            about 1e19, the squares of the z-score's deviations overflow it; no MR scan comes near); ``where`` (the
            case) begins its message.
    """
    if method not in NORMALIZATIONS:
        raise InputError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if mask is None:
        mask = brain_mask(image)
    out = np.zeros_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        if not channel.any():
            continue
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line
            if method == "zscore":
                values = channel[mask]
                mean, spread = float(values.mean()), float(values.std())  # inf once the squares pass float32's range
                out[c][mask] = (values - mean) / (spread if spread > 0 else 1.0)
            else:
                low, high = float(channel.min()), float(channel.max())
                spread = high - low
                out[c] = (channel - low) / (spread if spread > 0 else 1.0)
        if not (np.isfinite(spread) and np.isfinite(out[c]).all()):  # an infinite spread leaves zeros, not NaN
            name = MODALITIES[c] if len(image) == len(MODALITIES) else f"channel {c}"
            raise InputError(f"{where}: {name} intensities up to {float(np.abs(channel).max()):.3g} overflow float32")
    return out


def mask_bounds(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tightest slices holding every True voxel of ``mask``; None when it has none."""
    box: list[slice] = []
    sub = mask
    # Reduce each axis on the already narrowed sub-array: after the first axis the rest is cheap.
    for axis in range(mask.ndim):
        others = tuple(i for i in range(mask.ndim) if i != axis)
        hits = np.flatnonzero(sub.any(axis=others))
        if hits.size == 0:
            return None
        s = slice(int(hits[0]), int(hits[-1]) + 1)
        box.append(s)
        index = [slice(None)] * mask.ndim
        index[axis] = s
        sub = sub[tuple(index)]
    return tuple(box)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[tuple[int, int], ...]:
    """Per-axis ``(start, stop)`` of the non-zero voxels of ``mask``, widened by ``margin``; whole grid if empty."""
    box = mask_bounds(mask)
    if box is None:
        return tuple((0, n) for n in mask.shape)
    return tuple((max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, mask.shape, strict=True))
