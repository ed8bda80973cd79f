"""Segment case folders and write label maps in each case's own grid, header and label convention.

Each case is read with whatever modalities are on disk (or a named subset of them), reoriented
and resampled to the geometry the checkpoint was trained at (its voxel size and orientation,
:mod:`mstkd.data.geometry`), normalised as the training data were, cropped to the brain,
segmented by sliding windows (optionally averaged over mirrored copies, ``tta``), and pasted
back into the full grid. A resampled case's class probabilities are resampled back to the
case's own grid before they are decoded, as nnU-Net does, so the label map is always written
in the case's own grid and affine. A case already at the target is not resampled at all.
Labels follow the case's layout: FeTS/BraTS <= 2021 cases get 1/2/4, BraTS 2023+ cases get
1/2/3. :class:`Predictor` loads the checkpoint once; :func:`predict_folder` runs it over every
case folder under a root and writes ``<CaseID>.nii.gz`` (the BraTS submission naming).
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from tqdm.auto import tqdm

from mstkd.atomic import atomic_path, check_writable, write_text
from mstkd.checkpoint import checkpoint_geometry, load_checkpoint
from mstkd.data.cache import BRAIN_MARGIN
from mstkd.data.cases import bounding_box, brain_mask, load_case, normalize
from mstkd.data.geometry import at_target, format_spacing, from_target, is_anisotropic, spacing_of, to_target
from mstkd.data.labels import CLASSES, labels_from_regions
from mstkd.data.layouts import detect_case, find_case_folders
from mstkd.data.nifti import write_volume
from mstkd.errors import InputError
from mstkd.evaluate import class_probabilities, decode_for
from mstkd.modalities import Subset
from mstkd.train import pick_device


def parse_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:<n>`` or ``mps``; None picks CUDA when present.

    Raises:
        InputError: a device name torch does not know, or one this machine does not have.
    """
    if not name:
        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected cpu, cuda, cuda:<n> or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this machine has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available here")
    return device


class Predictor:
    """A checkpoint's student, loaded once, that segments case folders."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device | None = None, *, tta: bool = False):
        self.device = device if isinstance(device, torch.device) else parse_device(device)
        self.net, self.cfg, payload = load_checkpoint(checkpoint, self.device)
        self.trained_convention = payload["convention"]
        self.target = checkpoint_geometry(payload)
        if self.target is None:
            print(
                f"{checkpoint}: stores no training voxel size (made by an older version); cases are predicted at "
                "their own voxel size, as before",
                file=sys.stderr,
            )
        self.tta = tta

    def predict(
        self,
        case_dir: str | Path,
        out: str | Path,
        *,
        modalities: str | None = None,
        probabilities: str | Path | None = None,
    ) -> dict:
        """Write the segmentation of ``case_dir`` to ``out`` (``.nii.gz``, atomically); return a short summary.

        With ``probabilities``, also write the four class probabilities there (:func:`save_probabilities`).

        Raises:
            InputError: bad case files, or ``modalities`` naming one the case does not have.
        """
        files = detect_case(case_dir)
        subset = Subset.parse(modalities) if modalities else Subset.of(files.available)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the peak of this case, not of the process
        missing = [m for m in subset.modalities if m not in files.images]
        if missing:
            raise InputError(f"{files.folder}: --modalities names {', '.join(missing)}, which the case does not have")
        start = time.perf_counter()
        case = load_case(files, required=subset.modalities, with_seg=False)
        image = case.image * np.asarray(subset.mask, dtype=np.float32)[:, None, None, None]
        resampled = self.target is not None and not at_target(case.affine, self.target)
        affine = case.affine
        if resampled:
            image, affine = to_target(image, case.affine, self.target)
        mask = brain_mask(image)
        if not mask.any():
            raise InputError(f"{files.folder}: every voxel of the chosen modalities is zero")
        crop = (slice(None), *(slice(a, b) for a, b in bounding_box(mask, margin=BRAIN_MARGIN)))
        normalised = normalize(image, str(self.cfg.data.normalization), mask)[crop]
        probs = np.zeros((len(CLASSES), *image.shape[1:]), dtype=np.float32)
        probs[CLASSES.index("BG")] = 1.0  # outside the brain's box
        probs[crop] = class_probabilities(self.net, normalised, subset, self.cfg, self.device, mirror=self.tta)
        if resampled:  # back to the case's own grid before decoding (nnU-Net's order)
            probs = from_target(probs, affine, case.affine, case.image.shape[1:])
        labels = labels_from_regions(decode_for(self.cfg, probs), files.convention)
        if probabilities is not None:
            save_probabilities(probabilities, probs)
        write_volume(out, labels, case.affine, case.header)  # last: a label map on disk means the case is done
        spacing = spacing_of(case.affine)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {
            "case": files.case_id,
            "modalities": subset.name,
            "convention": files.convention.name,
            "spacing": list(spacing),
            "target": self.target.to_dict() if self.target else None,
            "resampled": resampled,
            "anisotropic": is_anisotropic(spacing),
            "seconds": time.perf_counter() - start,
            "out": str(out),
            "labels": sorted(int(v) for v in np.unique(labels)),
            "cuda_peak_bytes": peak,
            "trained_convention": self.trained_convention,
        }


def save_probabilities(path: str | Path, probs: np.ndarray) -> Path:
    """``probs`` (classes x the case's grid) as float16 in a compressed ``.npz`` (atomically): the array
    ``probabilities`` and the array ``classes`` naming its first axis (:data:`mstkd.data.labels.CLASSES`)."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, probabilities=probs.astype(np.float16), classes=np.asarray(CLASSES))
    return Path(path)


def finished_output(path: Path, case_dir: Path) -> bool:
    """Whether ``path`` already holds this case's label map: a readable NIfTI on the case's grid whose values
    are labels of the case's convention (a half-written or foreign file is not)."""
    if not path.is_file():
        return False
    try:
        files = detect_case(case_dir)
        grid = nib.load(next(iter(files.images.values()))).shape[:3]
        labels = np.asanyarray(nib.load(path).dataobj)
    except (InputError, OSError, ValueError, EOFError, StopIteration, ImageFileError, zlib.error):
        return False
    values = set(np.unique(labels).tolist())
    return labels.shape[:3] == grid and values <= set(files.convention.allowed)


def describe_geometry(summary: dict) -> str:
    """``0.78 x 0.78 x 6.5 mm -> 2.5 x 2.5 x 2.42 mm LPS (resampled)`` for a :meth:`Predictor.predict` summary."""
    source = f"{format_spacing(summary['spacing'])} mm"
    if summary["target"] is None:
        return f"{source} (no target stored: not resampled)"
    target = f"{format_spacing(summary['target']['spacing'])} mm {summary['target']['orientation']}"
    return f"{source} -> {target} ({'resampled' if summary['resampled'] else 'already at the target'})"


def anisotropy_warning(summary: dict) -> str:
    return (
        f"warning: {summary['case']} has thick slices ({format_spacing(summary['spacing'])} mm, the coarsest axis over "
        "3x the finest): the model cannot recover the detail between them"
    )


def predict_case(
    checkpoint: str | Path,
    case_dir: str | Path,
    out: str | Path,
    *,
    modalities: str | None = None,
    device: str | None = None,
    tta: bool = False,
) -> dict:
    """One case: :meth:`Predictor.predict` with a freshly loaded checkpoint.

    Raises:
        InputError: bad checkpoint, bad case files, an output that cannot be written, or
            ``modalities`` naming one not on disk.
    """
    check_writable(Path(out).parent, what="--out")
    return Predictor(checkpoint, device, tta=tta).predict(case_dir, out, modalities=modalities)


@dataclass
class FolderResult:
    written: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case id -> one-line reason
    kept: list[str] = field(default_factory=list)  # finished earlier (``resume``): not predicted again
    seconds: float = 0.0
    record: Path | None = None  # predict.json


def predict_folder(
    checkpoint: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    modalities: str | None = None,
    device: str | None = None,
    tta: bool = False,
    progress: bool = True,
    resume: bool = False,
    probabilities: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    command: str = "",
) -> FolderResult:
    """Segment every case folder under ``input_dir`` into ``output_dir/<CaseID>.nii.gz``.

    The checkpoint is loaded once. A case that cannot be read or segmented (bad files, too
    little memory) is skipped with one line on stderr and listed in :attr:`FolderResult.failed`;
    no partial file is left for it (writes are atomic). With ``resume``, a case whose label map is
    already there and valid (:func:`finished_output`) is kept, not predicted again. With
    ``probabilities``, each case's class probabilities go to ``<CaseID>.npz`` beside its label map.
    ``num_parts``/``part_id`` take every ``num_parts``-th case of the sorted list, from ``part_id``:
    parts that split one folder across machines. ``predict.json`` (``predict.part-<i>-of-<n>.json`` for
    a part) records which model made the folder and how (:func:`provenance`).

    Raises:
        InputError: no case folders, an output folder that cannot be written, a bad checkpoint
            or device, or a part that does not exist.
    """
    start = time.perf_counter()
    if modalities:
        Subset.parse(modalities)  # a bad name is the caller's error once, not every case's
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(f"--part-id {part_id} of --num-parts {num_parts}: give 0 <= part id < parts")
    cases = sorted(find_case_folders(input_dir).items())[part_id::num_parts]
    output_dir = Path(output_dir)
    check_writable(output_dir, what="--output-dir")
    predictor = Predictor(checkpoint, device, tta=tta)
    result = FolderResult()
    if resume:
        result.kept = [c for c, folder in cases if finished_output(output_dir / f"{c}.nii.gz", folder)]
        if result.kept:
            print(f"{len(result.kept)} of {len(cases)} cases finished earlier: kept", file=sys.stderr)
    todo = [(c, folder) for c, folder in cases if c not in set(result.kept)]
    bar = tqdm(todo, desc="predict", unit="case", disable=not progress)
    for case_id, folder in bar:
        try:
            summary = predictor.predict(
                folder,
                output_dir / f"{case_id}.nii.gz",
                modalities=modalities,
                probabilities=output_dir / f"{case_id}.npz" if probabilities else None,
            )
            result.written.append(summary)
            bar.set_postfix_str(f"{case_id}: {describe_geometry(summary)}")
            if summary["anisotropic"]:
                tqdm.write(anisotropy_warning(summary), file=sys.stderr)
        except (InputError, OSError, ValueError, torch.OutOfMemoryError) as exc:  # this case only; go on
            result.failed[case_id] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            tqdm.write(f"skipped {case_id}: {result.failed[case_id]}", file=sys.stderr)
    result.seconds = time.perf_counter() - start
    name = "predict.json" if num_parts == 1 else f"predict.part-{part_id}-of-{num_parts}.json"
    record = provenance(predictor, checkpoint, command=command, modalities=modalities, probabilities=probabilities)
    record["cases"] = {
        "part": [part_id, num_parts],
        "written": [w["case"] for w in result.written],
        "kept": result.kept,
        "failed": result.failed,
        "seconds": result.seconds,
    }
    result.record = write_text(output_dir / name, json.dumps(record, indent=1) + "\n")
    return result


def provenance(
    predictor: Predictor, checkpoint: str | Path, *, command: str, modalities: str | None, probabilities: bool
) -> dict:
    """Which model made a folder of predictions, and how: the checkpoint's path and SHA-256, its config, its
    label convention and voxel size, this package's version and commit, the command, the device, the test-time
    augmentation and the time."""
    from omegaconf import OmegaConf

    from mstkd.provenance import package, sha256_of

    return {
        "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": sha256_of(checkpoint)},
        "config": OmegaConf.to_container(predictor.cfg, resolve=True),
        "trained_convention": predictor.trained_convention,
        "labels": "each case's own layout: fets 0/1/2/4 (1 necrosis, 2 edema, 4 enhancing), brats2023 0/1/2/3",
        "target": predictor.target.to_dict() if predictor.target else None,
        "package": package(),
        "command": command,
        "device": str(predictor.device),
        "tta": predictor.tta,
        "modalities": modalities or "what each case has",
        "probabilities": f"<CaseID>.npz, float16, classes {list(CLASSES)}" if probabilities else None,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
