"""On-disk layouts of FeTS and BraTS cases, detected per case folder.

==========  ==============================================  ===========  ===========
layout      files in ``<ID>/``                              labels       ET
==========  ==============================================  ===========  ===========
``fets``    ``<ID>_{flair,t1,t1ce,t2,seg}.nii[.gz]``        0/1/2/4      4
``brats2023`` ``<ID>-{t2f,t1n,t1c,t2w,seg}.nii[.gz]``       0/1/2/3(/4)  3
==========  ==============================================  ===========  ===========

``fets`` covers FeTS 2021-2024, BraTS 2018-2021 and the FeTS Task-2 ``_brain_*`` names;
``brats2023`` covers BraTS 2023 and 2024 (label 4 = resection cavity). Files are matched
by their suffix, so the case folder name need not prefix them. A case folder is any folder
that directly holds NIfTI files; nested trees such as BraTS 2018's ``HGG/``/``LGG/`` work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from mstkd.data.labels import CONVENTIONS, LabelConvention
from mstkd.data.nifti import NIFTI_SUFFIXES, is_nifti
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES


class Layout(StrEnum):
    """How a dataset names its files (and which label convention it uses)."""

    FETS = "fets"  # FeTS 2022/2024, BraTS 2018-2021: <ID>_flair.nii.gz, labels 1/2/4
    BRATS2023 = "brats2023"  # BraTS 2023+: <ID>-t2f.nii.gz, labels 1/2/3


# Suffix on disk -> canonical key ("seg" for the label map), per layout. Longer suffixes
# come first in each pattern so that ``_t1ce`` is not read as ``_t1``.
_SUFFIXES: dict[Layout, dict[str, str]] = {
    Layout.FETS: {"flair": "flair", "t1ce": "t1ce", "t1gd": "t1ce", "t1": "t1", "t2": "t2", "seg": "seg"},
    Layout.BRATS2023: {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "seg"},
}
_SEPARATOR = {Layout.FETS: "_", Layout.BRATS2023: "-"}
_PATTERNS = {
    layout: re.compile(rf"{re.escape(_SEPARATOR[layout])}({'|'.join(suffixes)})$")
    for layout, suffixes in _SUFFIXES.items()
}
FILE_SUFFIX = {
    Layout.FETS: {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "seg": "seg"},
    Layout.BRATS2023: {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"},
}
"""Canonical key -> file suffix, for writing files in a layout."""

LAYOUT_CONVENTION = {Layout.FETS: "fets", Layout.BRATS2023: "brats2023"}


def file_endings(layout: Layout | str) -> dict[str, str]:
    """Canonical key -> how a file name of ``layout`` ends before ``.nii.gz`` (``flair`` -> ``_flair`` or ``-t2f``)."""
    return {key: _SEPARATOR[layout] + suffix for key, suffix in FILE_SUFFIX[layout].items()}


@dataclass
class CaseFiles:
    """The NIfTI files of one case, keyed by canonical modality."""

    case_id: str
    folder: Path
    layout: str
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None

    @property
    def convention(self) -> LabelConvention:
        return CONVENTIONS[LAYOUT_CONVENTION[self.layout]]

    @property
    def available(self) -> tuple[str, ...]:
        """Modalities present on disk, in canonical order."""
        return tuple(m for m in MODALITIES if m in self.images)

    def require(self, modalities: Sequence[str], *, seg: bool = False) -> None:
        """Refuse the case unless every modality in ``modalities`` (and the label map) is on disk."""
        for m in modalities:
            if m not in self.images:
                expected = f"{self.case_id}{_SEPARATOR[self.layout]}{FILE_SUFFIX[self.layout][m]}.nii.gz"
                raise InputError(f"{self.folder}: missing {m} image (expected {expected})")
        if seg and self.seg is None:
            expected = f"{self.case_id}{_SEPARATOR[self.layout]}seg.nii.gz"
            raise InputError(f"{self.folder}: missing label map (expected {expected})")


def _stem(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_path(folder: Path, case_id: str, layout: str, key: str) -> Path:
    """Where ``key`` (a modality or ``seg``) of a case lives in ``layout``."""
    return folder / f"{case_id}{_SEPARATOR[layout]}{FILE_SUFFIX[layout][key]}.nii.gz"


def detect_case(folder: str | Path) -> CaseFiles:
    """Find the modality and label files of one case folder and its layout.

    Raises:
        InputError: the folder holds no FeTS/BraTS-named NIfTI file, mixes the two
            layouts, or holds the same modality twice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    found: dict[str, dict[str, Path]] = {layout: {} for layout in _SUFFIXES}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and is_nifti(path)) or path.name.startswith("."):
            continue
        stem = _stem(path.name)
        for layout, pattern in _PATTERNS.items():
            match = pattern.search(stem)
            if match is None:
                continue
            key = _SUFFIXES[layout][match.group(1)]
            if key in found[layout]:
                raise InputError(f"{folder}: two files for {key}: {found[layout][key].name} and {path.name}")
            found[layout][key] = path
    layouts = [layout for layout, files in found.items() if files]
    if not layouts:
        raise InputError(
            f"{folder}: no FeTS/BraTS image files "
            f"(expected e.g. {folder.name}_flair.nii.gz or {folder.name}-t2f.nii.gz)"
        )
    if len(layouts) > 1:
        raise InputError(f"{folder}: mixes FeTS (_flair, _t1ce, ...) and BraTS 2023 (-t2f, -t1c, ...) file names")
    layout = layouts[0]
    files = found[layout]
    seg = files.pop("seg", None)
    if not files:
        raise InputError(f"{folder}: a label map but no image files")
    return CaseFiles(case_id=folder.name, folder=folder, layout=layout, images=files, seg=seg)


def find_case_folders(root: str | Path) -> dict[str, Path]:
    """Every folder under ``root`` that directly holds NIfTI files, keyed by folder name (= case id).

    Hidden folders (such as the preprocessed cache) are skipped. Symbolic links to folders are
    followed (a site folder may link the cases of a shared dataset), each real folder once.

    Raises:
        InputError: ``root`` is missing or empty of cases, two case folders share a name, or two paths
            lead to one case folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data folder not found")
    cases: dict[str, Path] = {}
    seen: dict[str, str] = {}  # real path -> the first path it was reached by
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        holds_cases = Path(dirpath) != root and any(is_nifti(Path(f)) for f in filenames)
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree (walked once), or a second path to one case
            dirnames[:] = []
            if holds_cases:
                raise InputError(f"{dirpath}: the same case folder as {seen[real]} (two links to one case)")
            continue
        seen[real] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if holds_cases:
            folder = Path(dirpath)
            if folder.name in cases:
                raise InputError(f"{folder}: case id {folder.name} also at {cases[folder.name]}")
            cases[folder.name] = folder
    if not cases:
        raise InputError(f"{root}: no case folders with NIfTI files (expected {root}/<ID>/<ID>_flair.nii.gz, ...)")
    return cases
