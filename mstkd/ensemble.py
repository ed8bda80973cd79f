"""Several models' predictions of one folder as one (``mstkd ensemble``), as ``nnUNetv2_ensemble`` does.

Each input is a folder that ``mstkd predict --input-dir ... --save-probabilities`` wrote: ``<CaseID>.nii.gz``, the
label map, and ``<CaseID>.npz``, the four class probabilities on the case's own grid. For every case the inputs'
probabilities are averaged and decoded as the models decode them (``predict.json`` records their config: argmax for
softmax outputs, a threshold for sigmoid ones; inputs that decode differently are refused), and the label map is
written with the first input's grid and header, in the case's label convention (read from the inputs' label maps,
or ``labels``). With ``et_min_mm3`` the small-ET rule (:mod:`mstkd.postprocess`) applies, in mm³ of the case's grid
(the models may have worked at different voxel sizes). ``ensemble.json`` records which checkpoints made the inputs.

The inputs come from elsewhere as often as not (a colleague's folds, another site's models): a probabilities file
is read without pickle, only once its zip directory shows the one array of the case's size it should hold, and a
case whose files disagree (shape, classes, grid) is skipped with one line while the others go on.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mstkd.atomic import check_writable, write_text
from mstkd.data.geometry import spacing_of
from mstkd.data.labels import CLASSES, CONVENTIONS, labels_from_regions
from mstkd.data.nifti import AFFINE_TOLERANCE, read_header, write_volume
from mstkd.errors import InputError, first_line
from mstkd.evaluate import decode
from mstkd.postprocess import check_threshold, suppress_small_et

MAX_RECORD_BYTES = 16 << 20
"""The largest ``predict.json`` read (it holds a config and the case lists)."""

DECODES = ("argmax", "threshold")


def decode_rule(folder: Path) -> tuple[str, float]:
    """How the models that wrote ``folder`` decode probabilities: ``argmax`` or ``threshold`` and its threshold, from
    the configs its ``predict*.json`` records (they must agree).

    Raises:
        InputError: no record, one that does not read, or records that decode differently.
    """
    rules = set()
    for path in sorted(folder.glob("predict*.json")):
        if path.name.startswith(".") or not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
            continue
        try:
            cfg = json.loads(path.read_text())["config"]
            how, activation, threshold = cfg["eval"]["decode"], cfg["loss"]["activation"], cfg["eval"]["threshold"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{path}: not a record of mstkd predict (no config to decode by)") from None
        if how == "auto":
            how = "argmax" if activation == "softmax" else "threshold"
        if how not in DECODES or not isinstance(threshold, int | float) or not 0 < threshold < 1:
            raise InputError(f"{path}: decodes by {str(how)[:20]!r} at {str(threshold)[:20]}, not a rule mstkd knows")
        rules.add((how, float(threshold) if how == "threshold" else 0.5))
    if not rules:
        raise InputError(f"{folder}: no predict.json (predict with --input-dir and --save-probabilities)")
    if len(rules) > 1:
        raise InputError(f"{folder}: its records decode in different ways ({sorted(rules)})")
    return rules.pop()


def _cases(folder: Path) -> set[str]:
    return {p.name[: -len(".npz")] for p in folder.glob("*.npz") if not p.name.startswith(".") and p.is_file()}


def read_probabilities(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """``path``'s class probabilities (``len(CLASSES) x shape``) as float32, once its zip directory shows them at
    that size, as float16, in classes of :data:`CLASSES`.

    Raises:
        InputError: a file that is not such a file.
    """
    expected = len(CLASSES) * int(np.prod(shape)) * 2
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
    out = probs.astype(np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"{path}: probabilities that are not finite")
    return out


@dataclass
class EnsembleResult:
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
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
    rules = {f: decode_rule(f) for f in folders}
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
    result = EnsembleResult()
    for case_id in tqdm(sorted(cases), desc="ensemble", unit="case", disable=not progress):
        try:
            _ensemble_case(case_id, folders, output_dir, how, threshold, labels, et_min_mm3)
        except (InputError, OSError, MemoryError) as exc:  # this case only; go on
            result.failed[case_id] = first_line(exc)
            tqdm.write(f"skipped {case_id}: {result.failed[case_id]}", file=sys.stderr)
            continue
        result.written.append(case_id)
    record = {
        "inputs": [_provenance(f) for f in folders],
        "decode": how if how == "argmax" else f"threshold {threshold:g}",
        "et_min_mm3": et_min_mm3,
        "cases": {"written": result.written, "failed": result.failed},
    }
    result.record = write_text(output_dir / "ensemble.json", json.dumps(record, indent=1) + "\n")
    return result


def _provenance(folder: Path) -> dict:
    """An input folder and the checkpoints its records name (SHA-256)."""
    made_by = set()
    for path in sorted(folder.glob("predict*.json")):
        try:
            sha = json.loads(path.read_text())["checkpoint"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(sha, str):
            made_by.add(sha[:64])
    return {"folder": str(folder.resolve()), "checkpoints": sorted(made_by)}


def _ensemble_case(
    case_id: str, folders: list[Path], out: Path, how: str, threshold: float, labels: str, et_min_mm3: float
) -> None:
    maps = [read_header(f / f"{case_id}.nii.gz") for f in folders]
    first = maps[0]
    shape = tuple(int(n) for n in first.shape[:3])
    for folder, img in zip(folders[1:], maps[1:], strict=True):
        if tuple(img.shape[:3]) != shape or not np.allclose(img.affine, first.affine, atol=AFFINE_TOLERANCE):
            raise InputError(f"{folder / f'{case_id}.nii.gz'}: not on the grid of {folders[0] / f'{case_id}.nii.gz'}")
    total = np.zeros((len(CLASSES), *shape), dtype=np.float32)
    for folder in folders:
        total += read_probabilities(folder / f"{case_id}.npz", shape)
    regions, _ = suppress_small_et(decode(total / len(folders), how, threshold), spacing_of(first.affine), et_min_mm3)
    convention = CONVENTIONS[labels if labels != "auto" else _convention(case_id, folders, maps)]
    header = first.header.copy()
    header["descrip"] = f"mstkd ensemble of {len(folders)}".encode()
    write_volume(out / f"{case_id}.nii.gz", labels_from_regions(regions, convention), first.affine, header)


def _convention(case_id: str, folders: list[Path], maps: list) -> str:
    """The inputs' label convention for a case: ``fets`` where their maps hold a 4, ``brats2023`` where a 3."""
    found = set()
    for img in maps:
        values = set(np.unique(np.asanyarray(img.dataobj)).tolist())
        found |= {"fets"} if 4 in values else set()
        found |= {"brats2023"} if 3 in values else set()
    if len(found) != 1:
        what = "no input marks enhancing tumour" if not found else "the inputs use both conventions"
        raise InputError(f"{case_id}: {what}, so its labels are unknown; give --labels fets or brats2023")
    return found.pop()


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
