"""Segment a folder of case folders: the model loaded once, reading and writing overlapped with inference,
finished cases kept (``--continue``), a folder split into parts, and a record of which model made the folder.

Each case goes through :class:`mstkd.infer.Predictor` and gets ``<CaseID>.nii.gz`` (the BraTS submission naming)
and, on request, ``<CaseID>.npz`` with its class probabilities; ``predict.json`` says how they were made.
"""

from __future__ import annotations

import argparse
import json
import shlex
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mstkd.atomic import check_writable, stale_temporaries, write_text
from mstkd.data.labels import CLASSES
from mstkd.data.layouts import detect_case, find_case_folders
from mstkd.data.nifti import read_header
from mstkd.errors import InputError, first_line
from mstkd.infer import Predictor, Prepared, anisotropy_warning, describe_geometry
from mstkd.modalities import Subset


def _plain_file(path: Path) -> bool:
    """A regular file, not a link (one planted there is not this run's output); False for any path error."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:  # missing, a name too long, a folder in the way
        return False


def _output_folder(folder: Path, output_dir: Path) -> bool:
    """Whether a case folder found under the input folder is a folder of predictions: this call's output folder
    (inside the input folder), or one where another call or part recorded its predictions."""
    return folder.resolve() == output_dir.resolve() or any(_plain_file(p) for p in folder.glob("predict*.json"))


def finished_output(
    path: Path, case_dir: Path, predictor: Predictor, modalities: str | None = None, probabilities: Path | None = None
) -> str | None:
    """The header's stamp when ``path`` already holds this case's label map as ``predictor`` makes it: a plain,
    readable NIfTI on the case's grid whose values are labels of the case's convention and whose header names this
    checkpoint, test-time augmentation, modalities and ET post-processing (:meth:`Predictor.stamp`, which also says
    whether the post-processing dropped the case's ET), with its ``probabilities`` file beside it when they are
    asked for. None for a half-written or foreign file, or one another model made."""
    if not _plain_file(path) or (probabilities is not None and not _plain_file(probabilities)):
        return None
    try:
        files = detect_case(case_dir)
        subset = Subset.parse(modalities) if modalities else Subset.of(files.available)
        stamp = predictor.stamp(subset)
        grid = read_header(next(iter(files.images.values()))).shape[:3]
        image = read_header(path)
        found = bytes(image.header["descrip"]).rstrip(b"\0").decode("ascii", "replace")
        ours = found == stamp or (bool(predictor.et_min_mm3) and found == predictor.stamp(subset, et_dropped=True))
        if ours and probabilities is not None:
            with np.load(probabilities, allow_pickle=False) as saved:
                ours = str(saved["made_by"]) == stamp
        if not ours:  # another model's, or no model's: its voxels need not be read
            return None
        labels = np.asanyarray(image.dataobj)
    except Exception:  # whatever a half-written or foreign file makes nibabel or numpy raise: not this run's output
        return None
    values = set(np.unique(labels).tolist())
    return found if labels.shape[:3] == grid and values <= set(files.convention.allowed) else None


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
    et_min_mm3: float = 0.0,
    progress: bool = True,
    resume: bool = False,
    probabilities: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    command: str = "",
    overlap: bool = True,
) -> FolderResult:
    """Segment every case folder under ``input_dir`` into ``output_dir/<CaseID>.nii.gz``.

    The checkpoint is loaded once. A case that cannot be read or segmented (bad files, too
    little memory) is skipped with one line on stderr and listed in :attr:`FolderResult.failed`;
    no partial file is left for it (writes are atomic). With ``resume``, a case whose label map is
    already there and valid (:func:`finished_output`) is kept, not predicted again. With
    ``probabilities``, each case's class probabilities go to ``<CaseID>.npz`` beside its label map (before the ET
    post-processing that ``et_min_mm3`` asks for, :mod:`mstkd.postprocess`).
    ``num_parts``/``part_id`` take every ``num_parts``-th case of the sorted list, from ``part_id``:
    parts that split one folder across machines. ``predict.json`` (``predict.part-<i>-of-<n>.json`` for
    a part) records which model made the folder and how (:func:`provenance`). With ``overlap`` (the default),
    reading the next case and writing the last one run beside the current case's inference, with the same
    label maps to the last bit.

    Raises:
        InputError: no case folders, an output folder that cannot be written, a bad checkpoint
            or device, or a part that does not exist.
    """
    start = time.perf_counter()
    if modalities:
        Subset.parse(modalities)  # a bad name is the caller's error once, not every case's
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(f"--part-id {part_id} of --num-parts {num_parts}: give 0 <= part id < parts")
    output_dir = Path(output_dir)
    cases = sorted((c, f) for c, f in find_case_folders(input_dir).items() if not _output_folder(f, output_dir))
    cases = cases[part_id::num_parts]
    check_writable(output_dir, what="--output-dir")
    predictor = Predictor(checkpoint, device, tta=tta, et_min_mm3=et_min_mm3)
    result = FolderResult()
    kept_stamps: dict[str, str] = {}
    if resume:
        for c, folder in cases:
            npz = output_dir / f"{c}.npz" if probabilities else None
            if stamp := finished_output(output_dir / f"{c}.nii.gz", folder, predictor, modalities, npz):
                kept_stamps[c] = stamp
        result.kept = list(kept_stamps)
        if result.kept:
            print(f"{len(result.kept)} of {len(cases)} cases finished earlier: kept", file=sys.stderr)
    kept = set(result.kept)
    todo = [(c, folder) for c, folder in cases if c not in kept]
    outputs = {c: (output_dir / f"{c}.nii.gz", output_dir / f"{c}.npz" if probabilities else None) for c, _ in todo}
    if resume:  # what a killed run left half-written of this part's own cases (label maps and probabilities)
        for case_id, _ in todo:
            for path in (output_dir / f"{case_id}.nii.gz", output_dir / f"{case_id}.npz"):
                for orphan in stale_temporaries(path):
                    orphan.unlink(missing_ok=True)
    bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not progress)
    for case_id, outcome in _predict_cases(predictor, todo, outputs, modalities, overlap=overlap):
        bar.update()
        if isinstance(outcome, Exception):  # this case only; go on
            result.failed[case_id] = first_line(outcome)
            tqdm.write(f"skipped {case_id}: {result.failed[case_id]}", file=sys.stderr)
            continue
        result.written.append(outcome)
        bar.set_postfix_str(f"{case_id}: {describe_geometry(outcome)}")
        if outcome["anisotropic"]:
            tqdm.write(anisotropy_warning(outcome), file=sys.stderr)
    bar.close()
    result.seconds = time.perf_counter() - start
    name = "predict.json" if num_parts == 1 else f"predict.part-{part_id}-of-{num_parts}.json"
    record = provenance(predictor, checkpoint, command=command, modalities=modalities, probabilities=probabilities)
    record["cases"] = {
        "part": [part_id, num_parts],
        "written": [w["case"] for w in result.written],
        "kept": result.kept,
        "failed": result.failed,
        "et_dropped": sorted(
            [c for c, stamp in kept_stamps.items() if stamp.endswith("!")]
            + [w["case"] for w in result.written if w["et_dropped"]]
        ),
        "conventions": {
            **_conventions(dict(cases), result.kept),
            **{w["case"]: w["convention"] for w in result.written},
        },
        "seconds": result.seconds,
    }
    result.record = write_text(output_dir / name, json.dumps(record, indent=1) + "\n")
    return result


def _conventions(folders: dict[str, Path], cases: list[str]) -> dict[str, str]:
    """Each of ``cases``' label convention, from its case folder's file names (``mstkd ensemble`` reads them)."""
    out = {}
    for case_id in cases:
        try:
            out[case_id] = detect_case(folders[case_id]).convention.name
        except InputError:
            continue
    return out


CASE_ERRORS = (InputError, OSError, ValueError, MemoryError, RuntimeError)
"""What makes one case of a folder fail without stopping the others (``RuntimeError``: what PyTorch raises when
memory runs out, on the CPU as on a GPU)."""


def _predict_cases(
    predictor: Predictor,
    todo: list[tuple[str, Path]],
    outputs: dict[str, tuple[Path, Path | None]],
    modalities: str | None,
    *,
    overlap: bool,
) -> Iterator[tuple[str, dict | Exception]]:
    """Each case's summary, or the error that stopped it, in order. With ``overlap``, two threads read and
    prepare the next case and write the last one while the model infers the current one (numpy, nibabel and
    zlib release the interpreter lock), so a folder's time is closer to its inference alone."""
    if not overlap:
        for case_id, folder in todo:
            label_map, npz = outputs[case_id]
            try:
                yield case_id, predictor.predict(folder, label_map, modalities=modalities, probabilities=npz)
            except CASE_ERRORS as exc:
                yield case_id, exc
        return
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="predict-io") as pool:
        ahead = pool.submit(predictor.prepare, todo[0][1], modalities) if todo else None
        behind: tuple[str, Future] | None = None  # the last case's write
        for i, (case_id, _) in enumerate(todo):
            prepared: Prepared | Exception
            try:
                prepared = ahead.result()
            except CASE_ERRORS as exc:
                prepared = exc
            ahead = pool.submit(predictor.prepare, todo[i + 1][1], modalities) if i + 1 < len(todo) else None
            if not isinstance(prepared, Exception):
                try:
                    probs = predictor.infer(prepared)
                except CASE_ERRORS as exc:
                    prepared = exc
            if behind is not None:
                yield behind[0], _outcome(behind[1])
                behind = None
            if isinstance(prepared, Exception):
                yield case_id, prepared
                continue
            label_map, npz = outputs[case_id]
            behind = (case_id, pool.submit(predictor.finish, prepared, probs, label_map, probabilities=npz))
        if behind is not None:
            yield behind[0], _outcome(behind[1])


def _outcome(future: Future) -> dict | Exception:
    try:
        return future.result()
    except CASE_ERRORS as exc:
        return exc


def provenance(
    predictor: Predictor, checkpoint: str | Path, *, command: str, modalities: str | None, probabilities: bool
) -> dict:
    """Which model made a folder of predictions, and how: the checkpoint's path and SHA-256, its config, its
    label convention and voxel size, this package's version and commit, the command, the device, the test-time
    augmentation, the ET post-processing and the time."""
    from omegaconf import OmegaConf

    from mstkd.provenance import package

    return {
        "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": predictor.sha256},
        "config": OmegaConf.to_container(predictor.cfg, resolve=True),
        "trained_convention": predictor.trained_convention,
        "labels": "each case's own layout: fets 0/1/2/4 (1 necrosis, 2 edema, 4 enhancing), brats2023 0/1/2/3",
        "target": predictor.target.to_dict() if predictor.target else None,
        "package": package(),
        "command": command,
        "device": str(predictor.device),
        "tta": predictor.tta,
        "et_min_mm3": predictor.et_min_mm3,
        "modalities": modalities or "what each case has",
        "probabilities": f"<CaseID>.npz, float16, classes {list(CLASSES)}" if probabilities else None,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


FOLDER_FLAGS = {
    "--continue": lambda a: a.resume,
    "--save-probabilities": lambda a: a.save_probabilities,
    "--num-parts": lambda a: a.num_parts != 1,
    "--part-id": lambda a: a.part_id != 0,
}
"""Flags of folder prediction (``--input-dir``), and whether a call gave each."""


def predict_command(args: argparse.Namespace) -> int:
    """``mstkd predict``: one case (``--case``) or a folder (``--input-dir``); the exit status."""
    from mstkd.infer import predict_case

    if bool(args.case) == bool(args.input_dir):
        raise InputError("give either --case with --out (one case) or --input-dir with --output-dir (every case)")
    how = {"modalities": args.modalities, "device": args.device, "tta": args.tta, "et_min_mm3": args.et_min_mm3}
    if args.case:
        folder_only = [f for f, on in FOLDER_FLAGS.items() if on(args)]
        if folder_only:
            raise InputError(f"{folder_only[0]} goes with --input-dir")
        if not args.out:
            raise InputError("--case needs --out (the label map to write, e.g. SEG.nii.gz)")
        if args.output_dir:
            raise InputError("--output-dir goes with --input-dir; with --case, name the file with --out")
        summary = predict_case(args.checkpoint, args.case, args.out, **how)
        if summary["anisotropic"]:
            print(anisotropy_warning(summary), file=sys.stderr)
        print(
            f"wrote {summary['out']} ({summary['modalities']}, {summary['convention']} labels "
            f"{summary['labels']}, {describe_geometry(summary)}, {summary['seconds']:.1f} s"
            f"{', ET under the threshold: made necrosis' if summary['et_dropped'] else ''})",
            file=sys.stderr,
        )
        return 0
    if not args.output_dir:
        raise InputError("--input-dir needs --output-dir (where <CaseID>.nii.gz files go)")
    if args.out:
        raise InputError("--out goes with --case; with --input-dir, name the folder with --output-dir")
    result = predict_folder(
        args.checkpoint,
        args.input_dir,
        args.output_dir,
        **how,
        progress=not args.quiet,
        resume=args.resume,
        probabilities=args.save_probabilities,
        num_parts=args.num_parts,
        part_id=args.part_id,
        command=shlex.join(["mstkd", *(args.argv or [])]),
    )
    failed = f"; {len(result.failed)} failed: {', '.join(result.failed)}" if result.failed else ""
    kept = f", {len(result.kept)} kept from before" if result.kept else ""
    dropped = sum(bool(w["et_dropped"]) for w in result.written)
    kept += f", ET under the threshold made necrosis in {dropped}" if dropped else ""
    print(
        f"wrote {len(result.written)} label maps to {args.output_dir} in {result.seconds:.1f} s{kept}{failed}; "
        f"how they were made: {result.record}",
        file=sys.stderr,
    )
    return 1 if result.failed else 0
