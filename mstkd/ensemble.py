"""Several models' predictions of one folder as one (``mstkd ensemble``), as ``nnUNetv2_ensemble`` does.

Each input is a folder that ``mstkd predict --input-dir ... --save-probabilities`` wrote: ``<CaseID>.nii.gz``, the
label map, and ``<CaseID>.npz``, the four class probabilities on the case's own grid. For every case the inputs'
probabilities are averaged and decoded as the models decode them (``predict.json`` records their config: argmax for
softmax outputs, a threshold for sigmoid ones; inputs that decode differently are refused), and the label map is
written with the first input's grid and header, in the case's label convention (which the inputs' records name,
or ``labels``). The probabilities were stored as float16, so where a model's classes nearly tie its ensemble with
itself can differ from its own label map (76 of 196,608 voxels of an untrained model). With ``et_min_mm3`` the
small-ET rule (:mod:`mstkd.postprocess`) applies, in mm³ of the case's grid (the models may have worked at
different voxel sizes). ``ensemble.json`` records which checkpoints made the inputs.

The inputs come from elsewhere as often as not (a colleague's folds, another site's models): a probabilities file
is read without pickle, only once its zip directory shows the one array of the case's size it should hold, and a
case whose files disagree (shape, classes, grid) is skipped with one line while the others go on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mstkd.atomic import check_writable, write_text
from mstkd.data.geometry import spacing_of
from mstkd.data.labels import CLASSES, CONVENTIONS, labels_from_regions
from mstkd.data.nifti import check_grid, read_header, write_volume
from mstkd.errors import InputError, first_line, read_json_object
from mstkd.evaluate import decode, resolve_decode
from mstkd.postprocess import check_threshold, stamp, suppress_small_et

MAX_RECORD_BYTES = 16 << 20
"""The largest ``predict.json`` read (it holds a config and the case lists)."""

DECODES = ("argmax", "threshold")

PROBABILITY_SLACK = 1e-3
"""How far outside 0..1 a stored probability may lie (float16 rounding lies far within it)."""

MAX_VOXELS = 150_000_000
"""The largest case grid ensembled: its four-class float32 sum takes 2.4 GB (BraTS's 240 x 240 x 155 grid has 8.9
million voxels); the grid comes from a label map from elsewhere, whose header alone can claim any size."""

CASE_ERRORS = (InputError, OSError, ValueError, EOFError, MemoryError, RuntimeError)
"""What makes one case fail without stopping the others (``EOFError``: a truncated ``.nii.gz``)."""


def records(folder: Path) -> list[tuple[Path, dict]]:
    """The ``predict*.json`` records of ``folder`` (one per part), each a plain file of at most
    :data:`MAX_RECORD_BYTES` holding a JSON object.

    Raises:
        InputError: a record that is not such a file (a FIFO, a folder, a huge or malformed file).
    """
    found = []
    for path in sorted(folder.glob("predict*.json")):
        if path.name.startswith("."):
            continue
        try:
            found.append((path, read_json_object(path, MAX_RECORD_BYTES)))
        except InputError as exc:
            raise InputError(f"{path}: not a record of mstkd predict ({first_line(exc)})") from None
    if not found:
        raise InputError(f"{folder}: no predict.json (predict with --input-dir and --save-probabilities)")
    return found


def decode_rule(folder: Path, found: list[tuple[Path, dict]]) -> tuple[str, float]:
    """How the models that wrote ``folder`` decode probabilities: ``argmax`` or ``threshold`` and its threshold, from
    the configs its records (``found``, :func:`records`) hold; they must agree.

    Raises:
        InputError: no record, one that does not read, or records that decode differently.
    """
    rules = set()
    for path, record in found:
        try:
            cfg = record["config"]
            how, activation, threshold = cfg["eval"]["decode"], cfg["loss"]["activation"], cfg["eval"]["threshold"]
        except (KeyError, TypeError):
            raise InputError(f"{path}: not a record of mstkd predict (no config to decode by)") from None
        how = resolve_decode(how, activation)
        if how not in DECODES or not isinstance(threshold, int | float) or not 0 < threshold < 1:
            raise InputError(f"{path}: decodes by {str(how)[:20]!r} at {str(threshold)[:20]}, not a rule mstkd knows")
        rules.add((how, float(threshold) if how == "threshold" else 0.5))
    if len(rules) > 1:
        raise InputError(f"{folder}: its records decode in different ways ({sorted(rules)})")
    return rules.pop()


def conventions(found: list[tuple[Path, dict]]) -> dict[str, str]:
    """Case id -> its label convention, as a folder's records (``found``) say (records before this version say
    nothing)."""
    out: dict[str, str] = {}
    for _, record in found:
        cases = record.get("cases")
        named = cases.get("conventions") if isinstance(cases, dict) else None
        if isinstance(named, dict):
            out.update({str(c): v for c, v in named.items() if v in CONVENTIONS})
    return out


def _cases(folder: Path) -> set[str]:
    return {p.name[: -len(".npz")] for p in folder.glob("*.npz") if not p.name.startswith(".") and p.is_file()}


def read_probabilities(path: Path, shape: tuple[int, ...], *, into: np.ndarray) -> None:
    """Add ``path``'s class probabilities (``len(CLASSES) x shape``, float16, in classes of :data:`CLASSES`, each in
    0..1) to ``into``, class by class, once its zip directory shows them at that size.

    Raises:
        InputError: a file that is not such a file.
    """
    expected = len(CLASSES) * math.prod(shape) * 2
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = {info.filename: info.file_size for info in archive.infolist()}
        if sizes.get("probabilities.npy", expected + 1024) > expected + 1024 or sum(sizes.values()) > expected + 65536:
            raise InputError(f"{path}: holds more than the {expected} bytes of probabilities of its case's grid")
        with np.load(path, allow_pickle=False) as saved:
            probs, classes = saved["probabilities"], saved["classes"]
    except InputError:
        raise
    except Exception as exc:  # a damaged zip or array, a missing name: that file's error
        raise InputError(f"{path}: not a probabilities file of mstkd predict ({first_line(exc)})") from None
    if probs.dtype != np.float16 or probs.shape != (len(CLASSES), *shape) or classes.tolist() != list(CLASSES):
        raise InputError(f"{path}: probabilities of shape {probs.shape} ({probs.dtype}), not {len(CLASSES)} x {shape}")
    for c in range(len(CLASSES)):
        values = probs[c].astype(np.float32)
        if not (
            np.isfinite(values).all() and values.min() >= -PROBABILITY_SLACK and values.max() <= 1 + PROBABILITY_SLACK
        ):
            raise InputError(f"{path}: {CLASSES[c]} probabilities outside 0..1")
        into[c] += values


@dataclass
class EnsembleResult:
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    et_dropped: list[str] = field(default_factory=list)
    record: Path | None = None


def ensemble_folders(
    inputs: list[str | Path],
    output_dir: str | Path,
    *,
    labels: str = "auto",
    et_min_mm3: float = 0.0,
    progress: bool = True,
) -> EnsembleResult:
    """Average the probabilities of every case the ``inputs`` share, decode them and write ``<CaseID>.nii.gz``.

    Raises:
        InputError: fewer than two inputs, inputs that decode differently or hold different cases, a bad
            ``labels`` or ``et_min_mm3``, or an output folder that cannot be written.
    """
    folders = [Path(f) for f in inputs]
    et_min_mm3 = check_threshold(et_min_mm3)
    if len(folders) < 2:
        raise InputError("give at least two prediction folders to ensemble")
    if labels not in ("auto", *CONVENTIONS):
        raise InputError(f"--labels {labels!r}: expected auto, {' or '.join(CONVENTIONS)}")
    found = {f: records(f) for f in folders}  # each read once
    rules = {f: decode_rule(f, found[f]) for f in folders}
    if len(set(rules.values())) > 1:
        raise InputError(f"the inputs decode in different ways: {', '.join(f'{f}: {r[0]}' for f, r in rules.items())}")
    how, threshold = rules[folders[0]]
    cases = _cases(folders[0])
    for folder in folders[1:]:
        if (other := _cases(folder)) != cases:
            odd = sorted(cases ^ other)[0]
            raise InputError(f"{folder}: does not hold the same cases as {folders[0]} (e.g. {odd})")
    if not cases:
        raise InputError(f"{folders[0]}: no <CaseID>.npz (predict with --save-probabilities)")
    output_dir = Path(output_dir)
    if any(output_dir.resolve() == f.resolve() for f in folders):
        raise InputError(f"{output_dir}: is one of the inputs; write the ensemble to a folder of its own")
    check_writable(output_dir, what="--output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    named = [conventions(found[f]) for f in folders]
    result = EnsembleResult()
    for case_id in tqdm(sorted(cases), desc="ensemble", unit="case", disable=not progress):
        try:
            convention = case_convention(case_id, named, labels)
            if _ensemble_case(case_id, folders, output_dir, how, threshold, convention, et_min_mm3):
                result.et_dropped.append(case_id)
        except CASE_ERRORS as exc:  # this case only; go on
            result.failed[case_id] = first_line(exc)
            tqdm.write(f"skipped {case_id}: {result.failed[case_id]}", file=sys.stderr)
            continue
        result.written.append(case_id)
    record = {
        "inputs": [_provenance(f, found[f]) for f in folders],
        "decode": how if how == "argmax" else f"threshold {threshold:g}",
        "et_min_mm3": et_min_mm3,
        "cases": {"written": result.written, "failed": result.failed, "et_dropped": result.et_dropped},
    }
    result.record = write_text(output_dir / "ensemble.json", json.dumps(record, indent=1) + "\n")
    return result


def _provenance(folder: Path, found: list[tuple[Path, dict]]) -> dict:
    """An input folder and the checkpoints its records (``found``) name (SHA-256)."""
    made_by = set()
    for _, record in found:
        checkpoint = record.get("checkpoint")
        sha = checkpoint.get("sha256") if isinstance(checkpoint, dict) else None
        if isinstance(sha, str):
            made_by.add(sha[:64])
    return {"folder": str(folder.resolve()), "checkpoints": sorted(made_by)}


def _ensemble_case(
    case_id: str, folders: list[Path], out: Path, how: str, threshold: float, convention: str, et_min_mm3: float
) -> bool:
    """One case's ensemble written to ``out``; whether the small-ET rule dropped its ET."""
    maps = [read_header(f / f"{case_id}.nii.gz") for f in folders]
    first = maps[0]
    shape = tuple(int(n) for n in first.shape[:3])
    if (voxels := math.prod(shape)) > MAX_VOXELS:
        raise InputError(f"{folders[0] / f'{case_id}.nii.gz'}: {voxels:.3g} voxels, more than {MAX_VOXELS:.3g}")
    for folder, img in zip(folders[1:], maps[1:], strict=True):
        check_grid(
            folder / f"{case_id}.nii.gz",
            img.shape[:3],
            img.affine,
            folders[0] / f"{case_id}.nii.gz",
            shape,
            first.affine,
        )
    total = np.zeros((len(CLASSES), *shape), dtype=np.float32)
    for folder in folders:
        read_probabilities(folder / f"{case_id}.npz", shape, into=total)
    total /= len(folders)
    regions, dropped = suppress_small_et(decode(total, how, threshold), spacing_of(first.affine), et_min_mm3)
    header = first.header.copy()
    header["descrip"] = f"mstkd ensemble of {len(folders)}{stamp(et_min_mm3, dropped)}".encode()
    write_volume(out / f"{case_id}.nii.gz", labels_from_regions(regions, CONVENTIONS[convention]), first.affine, header)
    return dropped


def case_convention(case_id: str, named: list[dict[str, str]], labels: str) -> str:
    """The label convention a case's ensemble is written in: the one the inputs' records name for it, or ``labels``.

    Raises:
        InputError: records that name different ones, ``labels`` against what they name, or neither.
    """
    said = {n[case_id] for n in named if case_id in n}
    if len(said) > 1:
        raise InputError(f"{case_id}: the inputs' records name different label conventions ({', '.join(sorted(said))})")
    if said and labels != "auto" and said != {labels}:
        raise InputError(f"{case_id}: --labels {labels}, but the inputs were predicted in {said.pop()} labels")
    if said:
        return said.pop()
    if labels == "auto":
        raise InputError(f"{case_id}: the inputs' records do not name its labels (an older predict); give --labels")
    return labels


def ensemble_command(args: argparse.Namespace) -> int:
    """``mstkd ensemble``: the exit status (1 when a case failed)."""
    result = ensemble_folders(
        args.input_dirs, args.output_dir, labels=args.labels, et_min_mm3=args.et_min_mm3, progress=not args.quiet
    )
    failed = f"; {len(result.failed)} failed: {', '.join(result.failed)}" if result.failed else ""
    print(
        f"wrote {len(result.written)} label maps to {args.output_dir}{failed}; record: {result.record}", file=sys.stderr
    )
    return 1 if result.failed else 0
