"""A Medical Segmentation Decathlon or nnU-Net raw dataset as FeTS-named case folders (``mstkd convert``).

Both keep a ``dataset.json`` beside ``imagesTr/``, ``labelsTr/`` and ``imagesTs/``:

- **MSD** (``Task01_BrainTumour``, the dataset of MONAI's BraTS tutorial): one 4-D file per case,
  ``imagesTr/BRATS_001.nii.gz`` with the modalities along the 4th axis in the order of ``"modality"``
  (``FLAIR, T1w, t1gd, T2w``), and labels named in ``"labels"`` (1 edema, 2 non-enhancing tumour, 3 enhancing).
- **nnU-Net** (v2 ``DatasetXXX_Name``, v1 ``TaskXXX_Name``): one file per channel, ``imagesTr/<ID>_0000.nii.gz``,
  the channels named in ``"channel_names"`` (v2) or ``"modality"`` (v1); labels named one by one or, for
  region-based training (nnU-Net's own BraTS conversion), as regions: ``"whole tumor": [1, 2, 3]``,
  ``"tumor core": [2, 3]``, ``"enhancing tumor": 3``.

Each case becomes ``OUT/<ID>/<ID>_{flair,t1,t1ce,t2}.nii.gz`` and, for training cases, ``<ID>_seg.nii.gz`` in the
FeTS labels (1 necrosis, 2 edema, 4 enhancing), which every ``mstkd`` command and a site's ``data-path`` read.
The channels and labels are mapped by their names, never by position, and a name that does not say what it is
refuses the dataset in one line. ``dataset.json`` comes from elsewhere: it is read as data (at most
:data:`MAX_JSON_BYTES`), its files are found by listing ``imagesTr/`` (never by paths it names), and a case id
must be a plain file name. A link out of the dataset's folder (another patient's scan on this machine, which ``OUT``
would then hold) is refused unless ``follow_links`` (a dataset that links to a shared copy of BraTS). A case is
written to a hidden folder and renamed into place when whole; one that cannot be read costs that case only, and a
case folder already in ``OUT`` is kept, so an interrupted call resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mstkd.atomic import check_writable, copy_file, write_text
from mstkd.data.labels import CONVENTIONS
from mstkd.data.layouts import Layout, case_path
from mstkd.data.nifti import (
    NIFTI_SUFFIXES,
    check_grid,
    is_nifti,
    read_header,
    read_labels,
    read_volume,
    write_volume,
)
from mstkd.errors import InputError, first_line, read_json_object

MAX_JSON_BYTES = 16 << 20
"""The largest ``dataset.json`` read (MSD's lists 750 cases in under 100 kB)."""

CHANNEL_NAMES = {
    "flair": "flair",
    "t2f": "flair",
    "t2-flair": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1n": "t1",
    "t1ce": "t1ce",
    "t1gd": "t1ce",
    "t1c": "t1ce",
    "t1-gd": "t1ce",
    "t1-ce": "t1ce",
    "t2": "t2",
    "t2w": "t2",
}
"""A channel's name in ``dataset.json`` (lower case) -> the modality it is."""

REGION_WORDS = {"WT": "whole", "TC": "core", "ET": "enhanc"}
"""nnU-Net's region names: a word each holds (``whole tumor``), or the region's abbreviation (``WT``)."""

CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a case id may be: a plain file name (it names a folder and files)."""

CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
"""nnU-Net's ``<ID>_<XXXX>`` (the file name without its NIfTI suffix)."""


@dataclass
class Dataset:
    """What ``dataset.json`` says: each channel's modality, and each label value's FeTS label."""

    folder: Path
    channels: dict[int, str]  # channel index -> modality
    labels: dict[int, int]  # label value on disk -> FeTS label (0, 1, 2, 4)


def _suffix(path: Path) -> str:
    return next(s for s in NIFTI_SUFFIXES if path.name.endswith(s))


def _index(key: str) -> int | None:
    """``key`` as a label value or channel index (ASCII digits, 0..255), else None."""
    return int(key) if key.isascii() and key.isdigit() and len(key) <= 3 and int(key) <= 255 else None


def _names(raw: object, what: str) -> dict[str, object]:
    if not isinstance(raw, dict) or not raw or len(raw) > 64:
        raise InputError(f"dataset.json: {what} is not a mapping of at most 64 entries")
    return {str(k): v for k, v in raw.items()}


def read_dataset(folder: str | Path) -> Dataset:
    """``folder/dataset.json``'s channels and labels, mapped to this project's modalities and FeTS labels.

    Raises:
        InputError: no such file, one too large or not JSON, or channels or labels whose names do not say what
            they are (one line).
    """
    folder = Path(folder)
    path = folder / "dataset.json"
    if not path.is_file():
        raise InputError(f"{folder}: no dataset.json (expected an MSD task or an nnU-Net raw dataset folder)")
    meta = read_json_object(path, MAX_JSON_BYTES)
    channels: dict[int, str] = {}
    for index, name in _names(meta.get("channel_names", meta.get("modality")), "channel_names").items():
        modality = CHANNEL_NAMES.get(str(name).strip().lower())
        if (number := _index(index)) is None or number > 3 or modality is None:
            known = ", ".join(CHANNEL_NAMES)
            raise InputError(f"{path}: channel {index!r} named {str(name)[:40]!r}: expected one of {known}")
        if modality in channels.values():
            raise InputError(f"{path}: two channels are {modality}")
        channels[number] = modality
    if sorted(channels) != list(range(len(channels))):
        raise InputError(f"{path}: channels must be numbered 0..{len(channels) - 1}")
    return Dataset(folder, dict(sorted(channels.items())), _label_map(_names(meta.get("labels"), "labels"), path))


def _label_map(labels: dict[str, object], path: Path) -> dict[int, int]:
    """Label value -> FeTS label, from labels named one by one (``{"1": "edema"}``, or nnU-Net's ``{"edema": 1}``)
    or as nnU-Net's regions (``{"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}``)."""
    fets = CONVENTIONS["fets"]
    if all(k[:1].isdigit() for k in labels):  # MSD and nnU-Net v1: value -> name
        if any(_index(k) is None for k in labels):
            raise InputError(f"{path}: label values must lie in 0..255")
        pairs = [(int(k), v) for k, v in labels.items()]
    else:
        values = {k: v if isinstance(v, list) else [v] for k, v in labels.items()}
        if not all(
            vs and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in vs)
            for vs in values.values()
        ):
            raise InputError(f"{path}: labels must map names to label values 0..255")
        if any(len(v) > 1 for v in values.values()):
            return _region_map(values, path)
        pairs = [(vs[0], name) for name, vs in values.items()]
    out: dict[int, int] = {}
    for value, name in pairs:
        kind = _label_kind(name)
        if kind is None:
            raise InputError(
                f"{path}: label {value} named {str(name)[:40]!r} is not background, necrosis, edema or enhancing"
            )
        if value in out:
            raise InputError(f"{path}: label value {value} is named twice")
        out[value] = {"BG": 0, "NCR": fets.necrosis, "ED": fets.edema, "ET": fets.enhancing}[kind]
    return _checked(out, path)


def _plain(name: object) -> str:
    """A name in lower case with everything but letters and digits taken out: ``Non_Enhancing`` -> ``nonenhancing``."""
    return re.sub(r"[\W_]+", "", name.lower()) if isinstance(name, str) else ""


def _label_kind(name: object) -> str | None:
    """``BG`` (background, or BraTS 2024's resection cavity), ``NCR``, ``ED`` or ``ET`` for a label's name; else None.
    Edema first (BraTS 2023 calls it the "surrounding non-enhancing FLAIR hyperintensity"), then necrosis
    ("non-enhancing", "necrotic"), then enhancing."""
    plain = _plain(name)
    if plain in ("background", "rc") or "resection" in plain or "cavity" in plain:
        return "BG"  # BraTS 2024's resection cavity belongs to no tumour region, as for training here
    if any(word in plain for word in ("edema", "oedema", "hyperintensity")) or plain in ("ed", "snfh"):
        return "ED"
    if any(word in plain for word in ("nonenhancing", "necro")) or plain.startswith(("ncr", "netc")):
        return "NCR"
    if "enhancing" in plain or plain == "et":
        return "ET"
    return None


def _region_map(values: dict[str, list[int]], path: Path) -> dict[int, int]:
    fets = CONVENTIONS["fets"]
    regions: dict[str, set[int]] = {}
    for name, vs in values.items():
        plain = _plain(name)
        key = next((k for k, word in REGION_WORDS.items() if word in plain or plain == k.lower()), "BG")
        if key == "BG" and vs != [0]:
            raise InputError(f"{path}: region {name[:40]!r} is not the whole tumour, tumour core or enhancing tumour")
        regions[key] = set(vs)
    if not {"WT", "TC", "ET"} <= set(regions) or not regions["ET"] <= regions["TC"] <= regions["WT"]:
        raise InputError(f"{path}: regions must give whole tumour >= tumour core >= enhancing tumour")
    out = {0: 0}
    for v in regions["WT"]:
        out[v] = fets.enhancing if v in regions["ET"] else fets.necrosis if v in regions["TC"] else fets.edema
    return _checked(out, path)


def _checked(out: dict[int, int], path: Path) -> dict[int, int]:
    if out.get(0) != 0 or sorted(set(out.values())) != [0, 1, 2, 4]:
        raise InputError(f"{path}: labels must name background (0), necrosis, edema and enhancing tumour")
    return dict(sorted(out.items()))


def find_cases(dataset: Dataset, images: str) -> dict[str, dict[int, Path] | Path]:
    """Case id -> its channel files (nnU-Net) or its one 4-D file (MSD), from listing ``images``.

    Raises:
        InputError: no such folder, no case in it, both layouts mixed, or a file name that is no plain case id.
    """
    folder = dataset.folder / images
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    stems = []
    for path in sorted(folder.iterdir()):
        if is_nifti(path) and not path.name.startswith(".") and path.is_file():  # MSD's archive holds ._ copies
            stems.append((path.name[: -len(_suffix(path))], path))
    if not stems:
        raise InputError(f"{folder}: no NIfTI files")
    split = [CHANNEL_FILE.fullmatch(stem) for stem, _ in stems]
    if len(dataset.channels) > 1 and _holds_channels(stems[0][1], len(dataset.channels)):
        split = [None] * len(stems)  # MSD: one 4-D file per case, whatever its name ends with
    if any(split) and not all(split):
        raise InputError(f"{folder}: mixes one file per channel (<ID>_0000.nii.gz) and one file per case")
    cases: dict[str, dict[int, Path] | Path] = {}
    for (stem, path), match in zip(stems, split, strict=True):
        case = match["case"] if match else stem
        if not CASE_ID.fullmatch(case):
            raise InputError(f"{path}: {case[:40]!r} is not a plain case id")
        if match:
            channel = int(match["channel"])
            if channel not in dataset.channels:
                raise InputError(f"{path}: channel {channel} is not in dataset.json")
            cases.setdefault(case, {})[channel] = path  # type: ignore[index]
        else:
            cases[case] = path
    return cases


def _holds_channels(path: Path, channels: int) -> bool:
    """Whether ``path`` is a 4-D file of ``channels`` volumes (MSD's layout)."""
    try:
        read_header(path, channels=channels)
    except InputError:
        return False
    return True


@dataclass
class ConvertResult:
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case id -> one line
    record: Path | None = None


def convert_dataset(
    src: str | Path, out: str | Path, *, test: bool = False, progress: bool = True, follow_links: bool = False
) -> ConvertResult:
    """Write every case of ``src`` (``imagesTr`` with ``labelsTr``, or ``imagesTs`` with ``test``) into ``out`` as a
    FeTS case folder, and ``out/convert.json``: the source, the channel and label maps and the cases.

    Raises:
        InputError: :func:`read_dataset`'s and :func:`find_cases`' refusals, an image or label map that links
            outside ``src`` (without ``follow_links``), or an ``out`` that cannot be written.
    """
    dataset = read_dataset(src)
    cases = find_cases(dataset, "imagesTs" if test else "imagesTr")
    files = [f for found in cases.values() for f in (found.values() if isinstance(found, dict) else [found])]
    files += [] if test else [f for f in sorted((dataset.folder / "labelsTr").glob("[!.]*")) if is_nifti(f)]
    root = dataset.folder.resolve()
    outside = [f for f in files if not f.resolve().is_relative_to(root)]
    if outside and not follow_links:
        raise InputError(
            f"{outside[0]} (and {len(outside) - 1} more) links outside {dataset.folder}; give --follow-links"
        )
    out = Path(out)
    if root.is_relative_to(out.resolve()):
        raise InputError(f"{out}: holds the dataset; convert into a folder beside it or inside it")
    check_writable(out, what="output folder")
    out.mkdir(parents=True, exist_ok=True)
    name = "convert-test.json" if test else "convert.json"
    other = out / ("convert.json" if test else "convert-test.json")
    if other.exists():  # labelled and unlabelled cases in one data folder: every training command would fail
        raise InputError(f"{out}: holds the {'training' if test else 'test'} cases ({other.name}); give each a folder")
    maps = {
        "source": str(root),
        "images": "imagesTs" if test else "imagesTr",
        "channels": {str(i): m for i, m in dataset.channels.items()},
        "labels": {str(v): label for v, label in dataset.labels.items()} if not test else None,
    }
    _check_earlier(out / name, maps, [c for c in cases if (out / c).exists()])
    write_text(out / name, json.dumps({**maps, "cases": None}, indent=1))  # before any case: what made them
    result = ConvertResult()
    for case_id in cases:  # what an interrupted call left half-written
        for stale in out.glob(f".{case_id}.*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
    for case_id, files in tqdm(cases.items(), desc="convert", unit="case", disable=not progress):
        if (out / case_id).is_dir():
            result.kept.append(case_id)
            continue
        try:
            _write_case(dataset, case_id, files, None if test else dataset.folder / "labelsTr", out)
        except (InputError, OSError, MemoryError) as exc:  # this case only; go on
            result.failed[case_id] = first_line(exc)
            tqdm.write(f"skipped {case_id}: {result.failed[case_id]}", file=sys.stderr)
            continue
        result.written.append(case_id)
    cases_record = {"written": result.written, "kept": result.kept, "failed": result.failed}
    result.record = write_text(out / name, json.dumps({**maps, "cases": cases_record}, indent=1))
    return result


def _check_earlier(record: Path, maps: dict, there: list[str]) -> None:
    """Refuse to keep case folders that this dataset's maps did not make: ones in a folder without ``record``, or
    made from another source or with other channel or label maps (a corrected ``dataset.json``)."""
    if not there:
        return
    try:
        earlier = read_json_object(record, MAX_JSON_BYTES)
    except InputError:
        raise InputError(f"{record.parent}: already holds {there[0]}, not made by mstkd convert") from None
    if {k: earlier.get(k) for k in maps} != maps:
        raise InputError(
            f"{record.parent}: holds cases converted from another source or with other channel or label maps "
            f"({record.name}); convert into a new folder"
        )


def _write_case(dataset: Dataset, case_id: str, files: dict[int, Path] | Path, labels: Path | None, out: Path) -> None:
    """One case into a hidden folder of ``out``, renamed to ``out/<ID>`` once every file is written and checked: every
    channel ``dataset.json`` names, and a label map, on one grid."""
    fets = Layout.FETS.value
    staging = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=out))
    try:
        if isinstance(files, Path):  # MSD: the channels along the 4th axis
            volume = read_volume(files, channels=len(dataset.channels))
            grid = (volume.data.shape[:3], volume.affine, files)
            for index, modality in dataset.channels.items():
                data = volume.data if volume.data.ndim == 3 else np.ascontiguousarray(volume.data[..., index])
                write_volume(case_path(staging, case_id, fets, modality), data, volume.affine, volume.header)
        else:  # nnU-Net: each channel's file as it is (``.nii`` or ``.nii.gz``), once its header reads
            if missing := [f"{case_id}_{i:04d}" for i in dataset.channels if i not in files]:
                raise InputError(
                    f"{case_id}: no {', '.join(missing)} image (dataset.json names {len(dataset.channels)})"
                )
            grid = None
            for index, path in files.items():
                img = read_header(path)
                grid = grid or (img.shape[:3], img.affine, path)
                _same_grid(grid, img.shape[:3], img.affine, path)
                copy_file(path, staging / f"{case_id}_{dataset.channels[index]}{_suffix(path)}")
        if labels is not None:
            found = [labels / f"{case_id}{s}" for s in NIFTI_SUFFIXES if (labels / f"{case_id}{s}").is_file()]
            if not found:
                raise InputError(f"{labels}: no label map {case_id}.nii.gz")
            seg = read_labels(found[0])
            _same_grid(grid, seg.data.shape, seg.affine, found[0])
            unknown = [int(v) for v in np.unique(seg.data) if int(v) not in dataset.labels]
            if unknown:
                raise InputError(f"{found[0]}: label values {unknown[:10]} are not in dataset.json")
            lookup = np.zeros(max(dataset.labels) + 1, dtype=np.uint8)
            for value, label in dataset.labels.items():
                lookup[value] = label
            write_volume(case_path(staging, case_id, fets, "seg"), lookup[seg.data], seg.affine, seg.header)
        staging.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; a case folder is as readable as its files
        staging.rename(out / case_id)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _same_grid(grid: tuple, shape: tuple, affine: np.ndarray, path: Path) -> None:
    """Refuse a file of the case on another grid than its first image (every command reads them together)."""
    first_shape, first_affine, first = grid
    check_grid(path, shape, affine, first, first_shape, first_affine)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def convert_command(args: argparse.Namespace) -> int:
    """``mstkd convert``: the exit status (1 when a case failed)."""
    result = convert_dataset(
        args.src, args.out, test=args.test, progress=not args.quiet, follow_links=args.follow_links
    )
    kept = f", {len(result.kept)} already there" if result.kept else ""
    failed = f"; {len(result.failed)} failed: {', '.join(result.failed)}" if result.failed else ""
    print(
        f"wrote {len(result.written)} case folders to {args.out}{kept}{failed}; record: {result.record}",
        file=sys.stderr,
    )
    return 1 if result.failed else 0
