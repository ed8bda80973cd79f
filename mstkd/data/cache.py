"""The preprocessed cache: decompress and normalise each case once, then read ``.npy`` forever after.

One folder per case under the cache root::

    <cache>/<case_id>/image.npy     4 x h x w x d, normalised, cropped to the brain (float16 by default)
    <cache>/<case_id>/regions.npy   h x w x d uint8, bit i set when the voxel is in REGIONS[i] (ET, TC, WT)
    <cache>/<case_id>/meta.json     source files and their stat fingerprint, layout, the source grid (shape,
                                    affine, spacing), the cached grid (the same, after resampling to
                                    the target geometry), crop box, normalisation, available modalities

With a target geometry (:mod:`mstkd.data.geometry`) each case is reoriented and resampled to it
before it is normalised and cropped; a case already at the target is stored as it is.

An entry is reused while its source files keep their size, modification time and last 8 bytes
(in a ``.nii.gz``, a checksum of its whole content), the normalisation settings match, and its
arrays have the shape and type its ``meta.json`` says; otherwise (a source changed, an entry
damaged or copied in from elsewhere) it is rebuilt. A cached image that is not finite is refused
when it is read. Entries are written to a temporary folder and renamed into place, so an
interrupted run never leaves a half-written entry.
Reading an entry never opens a NIfTI file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mstkd.data.cases import bounding_box, brain_mask, load_case, normalize
from mstkd.data.geometry import TargetGeometry, at_target, regions_to_target, spacing_of, to_target
from mstkd.data.labels import REGIONS
from mstkd.data.layouts import CaseFiles
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES, Subset
from mstkd.numbers import is_finite

CACHE_FORMAT = 2  # 2: entries carry their source grid and the target geometry
SPLIT_CSV = "split.csv"
"""Where the cache root keeps the split of the cases last prepared (:func:`mstkd.data.dataset.prepare_federation`)."""
CONFIG_YAML = "config.yaml"
"""Where ``mstkd preprocess`` keeps the config it prepared the cache with."""
RESERVED = frozenset({SPLIT_CSV, CONFIG_YAML})
"""Names in the cache root that are not case entries (temporary entries start with ``.``)."""
ENTRY_FILES = frozenset({"image.npy", "regions.npy", "meta.json"})
"""What a case entry holds: a folder under the root with anything else is not replaced (it is not the cache's)."""
BRAIN_MARGIN = 2  # voxels of background kept around the brain, so crops near the edge see some


@dataclass(frozen=True)
class CachedCase:
    """A case in the cache; arrays are memory-mapped on demand."""

    case_id: str
    folder: Path
    meta: dict[str, Any]

    def image(self) -> np.ndarray:
        """``4 x h x w x d`` normalised image (memory-mapped, read-only)."""
        return np.load(self.folder / "image.npy", mmap_mode="r")

    def regions(self) -> np.ndarray | None:
        """``3 x h x w x d`` boolean ET, TC, WT; None when the case had no label map."""
        path = self.folder / "regions.npy"
        if not path.exists():
            return None
        bits = np.load(path)
        return np.stack([(bits >> i) & 1 for i in range(len(REGIONS))]).astype(bool)

    @property
    def available(self) -> Subset:
        return Subset.of(self.meta["available"])

    @property
    def has_labels(self) -> bool:
        return bool(self.meta["has_labels"])


def _fingerprint(files: CaseFiles) -> dict[str, list[int]]:
    """Per source file: its size, modification time and last 8 bytes, which in a ``.nii.gz`` are the gzip trailer (the
    CRC-32 and length of the whole content), so a changed file is seen even where its size and modification time
    were kept (``cp -p`` or ``rsync -t`` of another version of the same size). Change time and inode would see more,
    but move on every ``chmod`` and, on some network mounts, every mount, and a rebuild of a large cache takes hours."""
    paths = {**files.images, **({"seg": files.seg} if files.seg else {})}
    out = {}
    for key, path in sorted(paths.items()):
        st = path.stat()
        with path.open("rb") as f:
            f.seek(max(st.st_size - 8, 0))
            tail = int.from_bytes(f.read(8), "little")
        out[key] = [st.st_size, st.st_mtime_ns, tail]
    return out


def _sizes(value: Any, count: int = 3, *, whole: bool = False) -> bool:
    """Whether ``value`` is ``count`` positive finite numbers (whole ones with ``whole``)."""
    return (
        isinstance(value, list)
        and len(value) == count
        and all(is_finite(v) and v > 0 and (not whole or float(v).is_integer()) for v in value)
    )


def _grid(value: Any) -> bool:
    """Whether ``value`` is a 4 x 4 matrix of finite numbers (an affine)."""
    rows = value if isinstance(value, list) and len(value) == 4 else []
    return bool(rows) and all(isinstance(row, list) and len(row) == 4 and all(map(is_finite, row)) for row in rows)


def _meta_sound(meta: dict[str, Any]) -> bool:
    """Whether the fields of ``meta.json`` that readers use have the types and ranges the cache writes: an entry
    copied in from elsewhere whose ``source`` spacing is text ended ``mstkd evaluate`` in a traceback."""
    source = meta.get("source")
    available = meta.get("available")
    return (
        _sizes(meta.get("shape"), whole=True)
        and _sizes(meta.get("spacing"))
        and _grid(meta.get("affine"))
        and isinstance(meta.get("resampled"), bool)
        and isinstance(meta.get("has_labels"), bool)
        and isinstance(meta.get("convention"), str)
        and isinstance(available, list)
        and bool(available)
        and all(m in MODALITIES for m in available)
        and isinstance(source, dict)
        and _sizes(source.get("shape"), whole=True)
        and _sizes(source.get("spacing"))
        and _grid(source.get("affine"))
    )


def _sound(folder: Path, meta: dict[str, Any], dtype: np.dtype) -> bool:
    """Whether an entry's arrays are what its ``meta.json`` says (read from the ``.npy`` headers, no voxel), and its
    fields are what the cache writes (:func:`_meta_sound`): an entry damaged or copied in from elsewhere is rebuilt,
    not trusted."""
    if not _meta_sound(meta):
        return False
    try:
        shape = tuple(int(b) - int(a) for a, b in meta["crop_box"])
        image = np.load(folder / "image.npy", mmap_mode="r")
        sound = isinstance(image, np.ndarray) and image.shape == (len(MODALITIES), *shape) and image.dtype == dtype
        if meta["has_labels"]:
            regions = np.load(folder / "regions.npy", mmap_mode="r")
            sound = sound and isinstance(regions, np.ndarray) and regions.shape == shape and regions.dtype == np.uint8
        return sound
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a missing array, a pickle, an .npz, ...
        return False


def _check_entry(folder: Path) -> None:
    """Refuse to replace ``folder`` unless it is a cache entry: a real folder of :data:`ENTRY_FILES` only, besides
    the hidden files a file system leaves (a cache root given as the data folder, or a folder of someone's notes,
    keeps its files)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() and not folder.is_symlink() else []
    others = sorted(n for n in names if n not in ENTRY_FILES and not n.startswith("."))  # .DS_Store, .nfs*: the OS's
    if folder.is_symlink() or not folder.is_dir() or others:
        what = f"holds {others[0]}" if others else "is a link" if folder.is_symlink() else "is not a folder"
        raise InputError(f"{folder}: not a cache entry ({what}); the cache replaces only its own entries")


def make_cache_folder(root: Path) -> None:
    """Create the cache folder ``root``, when it is missing, readable by its user only (0700): it holds a copy of
    every case's voxels, which under the usual umask was readable by every user of the machine, whatever the data
    folder allowed. A folder that exists already is the user's choice (a group that shares a cache makes it) and is
    left as it is."""
    root.parent.mkdir(parents=True, exist_ok=True)
    root.mkdir(mode=0o700, exist_ok=True)


class CaseCache:
    """Builds and reads cache entries under ``root`` for one normalisation setting."""

    def __init__(
        self,
        root: str | Path,
        *,
        normalization: str = "zscore",
        dtype: str = "float16",
        modalities: Sequence[str] = MODALITIES,
        target: TargetGeometry | None = None,
    ) -> None:
        self.root = Path(root)
        self.target = target
        self.normalization = normalization
        self.dtype = np.dtype(dtype)
        self.modalities = [m for m in MODALITIES if m in modalities]

    def _settings(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "normalization": self.normalization,
            "dtype": self.dtype.name,
            "modalities": self.modalities,
            "target": self.target.to_dict() if self.target else None,
        }

    def lookup(self, files: CaseFiles) -> CachedCase | None:
        """The valid entry for ``files``, or None when absent, stale or unsound (``stat`` and the ``.npy`` headers
        only, no NIfTI read)."""
        folder = self.root / files.case_id
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        if meta.get("settings") != self._settings() or meta.get("fingerprint") != _fingerprint(files):
            return None
        if not _sound(folder, meta, self.dtype):
            return None
        return CachedCase(files.case_id, folder, meta)

    def get(self, files: CaseFiles, *, with_seg: bool = True) -> CachedCase:
        """The entry for ``files``, built from the NIfTI files first when needed.

        Exactly the cache's ``modalities`` are read (each must be on disk); other channels are zero.

        Raises:
            InputError: a bad case (:func:`mstkd.data.cases.load_case`), or one named like the cache's own files
                (``split.csv``, or a name starting with ``.``), whose entry would take their place.
        """
        if files.case_id in RESERVED or files.case_id.startswith("."):
            raise InputError(f"{files.folder}: a case may not be named {files.case_id!r}, which the cache uses itself")
        entry = self.lookup(files)
        if entry is not None and (entry.has_labels or not with_seg):
            return entry
        return self._build(files, with_seg=with_seg)

    def _build(self, files: CaseFiles, *, with_seg: bool) -> CachedCase:
        case = load_case(files, required=self.modalities, with_seg=with_seg, others=False)
        available = case.available
        image, affine, regions = case.image, case.affine, case.regions
        resampled = self.target is not None and not at_target(affine, self.target)
        if resampled:
            image, affine = to_target(case.image, case.affine, self.target)
            if regions is not None:
                regions = regions_to_target(regions, case.affine, self.target)
        mask = brain_mask(image)
        box = bounding_box(mask, margin=BRAIN_MARGIN)
        crop = tuple(slice(a, b) for a, b in box)
        image = normalize(image, self.normalization, mask, where=files.folder)[(slice(None), *crop)].astype(self.dtype)
        meta = {
            "case_id": files.case_id,
            "layout": files.layout,
            "convention": files.convention.name,
            "sources": {k: str(p) for k, p in {**files.images, "seg": files.seg}.items() if p is not None},
            "fingerprint": _fingerprint(files),
            "settings": self._settings(),
            "available": list(available.modalities),
            "has_labels": regions is not None,
            "shape": list(mask.shape),
            "crop_box": [list(b) for b in box],
            "affine": affine.tolist(),
            "spacing": list(spacing_of(affine)) if resampled else list(case.spacing),
            "resampled": resampled,
            "source": {
                "shape": list(case.image.shape[1:]),
                "affine": case.affine.tolist(),
                "spacing": list(case.spacing),
            },
            "modalities": list(MODALITIES),
            "regions": list(REGIONS),
        }
        make_cache_folder(self.root)
        tmp = self.root / f".tmp-{files.case_id}-{uuid.uuid4().hex[:8]}"
        final = self.root / files.case_id
        try:
            tmp.mkdir()
            np.save(tmp / "image.npy", np.ascontiguousarray(image))
            if regions is not None:
                bits = np.zeros(regions.shape[1:], dtype=np.uint8)
                for i, region in enumerate(regions):
                    bits |= region.astype(np.uint8) << i
                np.save(tmp / "regions.npy", np.ascontiguousarray(bits[crop]))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.is_symlink() or final.exists():
                _check_entry(final)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError:
            # Another process may have written the same entry meanwhile; use it if valid.
            entry = self.lookup(files)
            if entry is None:
                raise
            return entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return CachedCase(files.case_id, final, meta)
