"""Segment case folders and write label maps in each case's own grid, header and label convention.

Each case is read with whatever modalities are on disk (or a named subset of them), reoriented
and resampled to the geometry the checkpoint was trained at (its voxel size and orientation,
:mod:`mstkd.data.geometry`), normalised as the training data were, cropped to the brain,
segmented by sliding windows (optionally averaged over mirrored copies, ``tta``), and pasted
back into the full grid. A resampled case's class probabilities are resampled back to the
case's own grid before they are decoded, as nnU-Net does, so the label map is always written
in the case's own grid and affine. A case already at the target is not resampled at all. With
``et_min_mm3``, a predicted enhancing tumour under that volume becomes necrosis (:mod:`mstkd.postprocess`),
decided on the grid the model saw, as evaluation decides it.
Labels follow the case's layout: FeTS/BraTS <= 2021 cases get 1/2/4, BraTS 2023+ cases get
1/2/3. :class:`Predictor` loads the checkpoint once; :func:`mstkd.folder.predict_folder` runs it over every
case folder under a root and writes ``<CaseID>.nii.gz`` (the BraTS submission naming).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mstkd.atomic import atomic_path, check_writable
from mstkd.checkpoint import checkpoint_geometry, load_checkpoint
from mstkd.data.cache import BRAIN_MARGIN
from mstkd.data.cases import bounding_box, brain_mask, load_case, normalize
from mstkd.data.geometry import at_target, format_spacing, from_target, is_anisotropic, spacing_of, to_target
from mstkd.data.labels import CLASSES, labels_from_regions
from mstkd.data.layouts import CaseFiles, detect_case
from mstkd.data.nifti import write_volume
from mstkd.errors import InputError
from mstkd.evaluate import class_probabilities, decode_for
from mstkd.modalities import Subset
from mstkd.postprocess import check_threshold, drops_et, without_et
from mstkd.postprocess import stamp as rule_stamp
from mstkd.provenance import sha256_of
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

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | torch.device | None = None,
        *,
        tta: bool = False,
        et_min_mm3: float = 0.0,
    ):
        self.et_min_mm3 = check_threshold(et_min_mm3)
        self.device = device if isinstance(device, torch.device) else parse_device(device)
        self.net, self.cfg, payload = load_checkpoint(checkpoint, self.device)
        self.sha256 = sha256_of(checkpoint)
        self.trained_convention = payload["convention"]
        self.target = checkpoint_geometry(payload)
        if self.target is None:
            print(
                f"{checkpoint}: stores no training voxel size (made by an older version); cases are predicted at "
                "their own voxel size, as before",
                file=sys.stderr,
            )
        self.tta = tta

    def stamp(self, subset: Subset, *, et_dropped: bool = False) -> str:
        """What a label map's header says of how it was made (under NIfTI's 80 bytes): the checkpoint's SHA-256
        (its first 16 digits), the test-time augmentation, the modalities it saw and the ET post-processing's
        threshold (its shortest exact decimal), followed by ``!`` where it dropped the case's ET."""
        post = rule_stamp(self.et_min_mm3, et_dropped)
        return f"mstkd {self.sha256[:16]} tta={int(self.tta)} {subset.name}{post}"

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
        The three steps, :meth:`prepare`, :meth:`infer` and :meth:`finish`, can also run apart (a folder
        overlaps reading and writing with inference).

        Raises:
            InputError: bad case files, or ``modalities`` naming one the case does not have.
        """
        prepared = self.prepare(case_dir, modalities)
        return self.finish(prepared, self.infer(prepared), out, probabilities=probabilities)

    def prepare(self, case_dir: str | Path, modalities: str | None = None) -> Prepared:
        """Read a case, resample it to the target, normalise it and crop it to the brain (no model involved).

        Raises:
            InputError: bad case files, or ``modalities`` naming one the case does not have.
        """
        start = time.perf_counter()
        files = detect_case(case_dir)
        subset = Subset.parse(modalities) if modalities else Subset.of(files.available)
        missing = [m for m in subset.modalities if m not in files.images]
        if missing:
            raise InputError(f"{files.folder}: --modalities names {', '.join(missing)}, which the case does not have")
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
        normalised = normalize(image, str(self.cfg.data.normalization), mask, where=files.folder)[crop]
        return Prepared(
            files,
            subset,
            case.affine,
            case.header,
            case.image.shape[1:],
            affine,
            image.shape[1:],
            resampled,
            crop,
            normalised,
            time.perf_counter() - start,
        )

    def infer(self, prepared: Prepared) -> np.ndarray:
        """The class probabilities on the target grid (background outside the brain's box)."""
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the peak of this case, not of the process
        probs = np.zeros((len(CLASSES), *prepared.target_shape), dtype=np.float32)
        probs[CLASSES.index("BG")] = 1.0  # outside the brain's box
        probs[prepared.crop] = class_probabilities(
            self.net, prepared.normalised, prepared.subset, self.cfg, self.device, mirror=self.tta
        )
        if self.device.type == "cuda":
            prepared.cuda_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        prepared.seconds += time.perf_counter() - start
        return probs

    def finish(
        self, prepared: Prepared, probs: np.ndarray, out: str | Path, *, probabilities: str | Path | None = None
    ) -> dict:
        """Back to the case's own grid (probabilities first, then labels: nnU-Net's order), decoded into the
        case's label convention and written; the case's summary. Whether the ET post-processing drops the case's
        ET is decided on the grid the model saw, in its mm³, as :func:`mstkd.evaluate.evaluate_cases` decides it."""
        start = time.perf_counter()
        target_spacing = spacing_of(prepared.target_affine)
        et_dropped = bool(self.et_min_mm3) and drops_et(decode_for(self.cfg, probs), target_spacing, self.et_min_mm3)
        if prepared.resampled:
            probs = from_target(probs, prepared.target_affine, prepared.affine, prepared.shape)
        regions = decode_for(self.cfg, probs)
        labels = labels_from_regions(without_et(regions) if et_dropped else regions, prepared.files.convention)
        made_by = self.stamp(prepared.subset)
        if probabilities is not None:
            save_probabilities(probabilities, probs, made_by)
        header = prepared.header.copy()
        header["descrip"] = self.stamp(prepared.subset, et_dropped=et_dropped).encode()  # ``--continue`` reads it
        write_volume(out, labels, prepared.affine, header)  # last: a label map on disk means it is done
        spacing = spacing_of(prepared.affine)
        return {
            "case": prepared.files.case_id,
            "modalities": prepared.subset.name,
            "convention": prepared.files.convention.name,
            "spacing": list(spacing),
            "target": self.target.to_dict() if self.target else None,
            "resampled": prepared.resampled,
            "anisotropic": is_anisotropic(spacing),
            "seconds": prepared.seconds + time.perf_counter() - start,
            "out": str(out),
            "labels": sorted(int(v) for v in np.unique(labels)),
            "et_dropped": et_dropped,
            "cuda_peak_bytes": prepared.cuda_peak_bytes,
            "trained_convention": self.trained_convention,
        }


@dataclass
class Prepared:
    """A case read, resampled, normalised and cropped, ready for :meth:`Predictor.infer`."""

    files: CaseFiles
    subset: Subset
    affine: np.ndarray  # the case's own grid
    header: object
    shape: tuple[int, ...]
    target_affine: np.ndarray  # the grid the model sees (the case's own where not resampled)
    target_shape: tuple[int, ...]
    resampled: bool
    crop: tuple[slice, ...]
    normalised: np.ndarray
    seconds: float  # time spent on this case so far (reading, then inference, then writing)
    cuda_peak_bytes: int | None = None


def save_probabilities(path: str | Path, probs: np.ndarray, made_by: str = "") -> Path:
    """``probs`` (classes x the case's grid) as float16 in a compressed ``.npz`` (atomically): the array
    ``probabilities``, the array ``classes`` naming its first axis (:data:`mstkd.data.labels.CLASSES`), and
    ``made_by``, the :meth:`Predictor.stamp` of the model that made it."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        arrays = {"probabilities": probs.astype(np.float16), "classes": np.asarray(CLASSES)}
        np.savez_compressed(f, **arrays, made_by=np.asarray(made_by))
    return Path(path)


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
    et_min_mm3: float = 0.0,
) -> dict:
    """One case: :meth:`Predictor.predict` with a freshly loaded checkpoint.

    Raises:
        InputError: bad checkpoint, bad case files, an output that cannot be written, or
            ``modalities`` naming one not on disk.
    """
    check_writable(Path(out).parent, what="--out")
    predictor = Predictor(checkpoint, device, tta=tta, et_min_mm3=et_min_mm3)
    return predictor.predict(case_dir, out, modalities=modalities)
