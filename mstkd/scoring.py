"""Score a folder of predictions against a folder of references: a per-case table and its summary.

Predictions are label maps named ``<CaseID>.nii.gz`` (what ``mstkd predict --input-dir`` writes,
and the BraTS submission naming). Each is paired with ``<ref-dir>/<CaseID>.nii.gz`` or, when
the references are case folders (``<ref-dir>/<CaseID>/<CaseID>_seg.nii.gz`` or
``...-seg.nii.gz``), with that folder's label map, whose file naming also tells the label
convention. Each pair is scored as :func:`mstkd.metrics.score_volumes` does and, with
``lesion`` set to a mode of :data:`mstkd.lesion.LESION_MODES`, also lesion-wise (:mod:`mstkd.lesion`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mstkd.atomic import check_writable, write_csv, write_text
from mstkd.data.labels import REGIONS
from mstkd.data.layouts import LAYOUT_CONVENTION, detect_case, find_case_folders
from mstkd.data.nifti import NIFTI_SUFFIXES, read_labels
from mstkd.errors import InputError, first_line
from mstkd.metrics import METRICS, format_scores, label_pair, score_files, score_labels

SUMMARY_ROWS = ("mean", "sd", "median")
SUMMARY_CSV, SUMMARY_JSON = "summary.csv", "summary.json"
"""The summary's files, written beside a per-case table."""


def strict_json(obj: object, indent: int | None = None) -> str:
    """JSON that every parser reads: NaN and infinities (e.g. a lesion-wise mean over no lesion) become null."""

    def finite(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(obj), indent=indent, allow_nan=False)


CASE_ERRORS = (InputError, OSError, ValueError, MemoryError, RuntimeError)
"""What makes one case of a folder fail without stopping the others, as for ``mstkd predict``
(:data:`mstkd.folder.CASE_ERRORS`): a file refused, a volume too large for memory, a numpy error on an input no
check foresaw; :class:`LesionScoringError` is a ``RuntimeError``."""


def _case_id(path: Path) -> str:
    return next(path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s))


def label_maps(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted, leaving out hidden names: what a file system or this project
    leaves beside them (macOS's ``._<name>``, a write's temporary ``.<name>.<pid>-<hex>.tmp.nii.gz``) is no case."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES) and p.name[0] != "."]


def case_error(exc: BaseException) -> str:
    """One line for a case that could not be scored: an :class:`InputError`'s own message, else the error's type
    and its first line."""
    if isinstance(exc, InputError):
        return str(exc)
    name, text = type(exc).__name__, first_line(exc)
    return name if text == name else f"{name}: {text}"


def find_references(ref_dir: Path) -> dict[str, tuple[Path, str | None]]:
    """Case id -> (reference label map, its layout's convention or None) for every reference under ``ref_dir``."""
    refs: dict[str, tuple[Path, str | None]] = {_case_id(p): (p, None) for p in label_maps(ref_dir)}
    if any(p.is_dir() and not p.name.startswith(".") for p in ref_dir.iterdir()):
        try:
            folders = find_case_folders(ref_dir)
        except InputError:
            if not refs:
                raise
            folders = {}  # sub-folders without NIfTI files beside flat label maps
        for case_id, folder in folders.items():
            try:
                files = detect_case(folder)
            except InputError as exc:  # one bad reference folder costs its case, not the others
                print(f"warning: no reference for {case_id}: {exc}", file=sys.stderr)
                continue
            if files.seg is not None:
                refs.setdefault(case_id, (files.seg, LAYOUT_CONVENTION[files.layout]))
    return refs


@dataclass
class FolderScores:
    """Per-case rows (``case``, ``labels``, ``<R>_<metric>``) and the cases that could not be scored.

    With ``lesion`` (a mode of :data:`mstkd.lesion.LESION_MODES`) the rows also hold ``<R>_<lesion metric>`` for
    every key of that mode (:func:`mstkd.lesion.mode_metrics`).
    """

    rows: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # predictions that could not be scored
    unpredicted: list[str] = field(default_factory=list)  # references without a prediction
    lesion: str = ""  # the lesion-wise mode whose columns the rows hold too ("": none)

    @property
    def columns(self) -> list[str]:
        columns = ["case", "labels", *(f"{r}_{m}" for r in REGIONS for m in METRICS)]
        if self.lesion:
            from mstkd.lesion import mode_metrics

            columns += [f"{r}_{m}" for r in REGIONS for m in mode_metrics(self.lesion)]
        return columns

    def summary(self) -> list[dict]:
        """One row each for the mean, sample sd and median over the cases, per column.

        NaN values (panoptica's matched-lesion means when a case has no lesion at all) are left
        out, as pandas does; an infinite value makes the mean infinite and the sd NaN.
        """
        out = []
        for name in SUMMARY_ROWS:
            row: dict = {"case": name, "labels": ""}
            for col in self.columns[2:]:
                values = [r[col] for r in self.rows if not math.isnan(r[col])]
                if name == "mean":
                    row[col] = float(np.mean(values)) if values else float("nan")
                elif name == "sd":
                    finite = all(math.isfinite(v) for v in values)
                    row[col] = (statistics.stdev(values) if finite else float("nan")) if len(values) > 1 else 0.0
                else:
                    row[col] = float(np.median(values)) if values else float("nan")
            out.append(row)
        return out

    def write(self, path: str | Path) -> tuple[Path, Path, Path]:
        """The per-case table at ``path`` and, beside it, its summary (mean, sd, median per column) as
        ``summary.csv`` and ``summary.json``, each written atomically. The per-case table holds cases only,
        so ``pandas.read_csv(path).mean()`` is a mean over cases."""
        path = Path(path)
        summary = self.summary()
        table = write_csv(path, self.rows, self.columns, outside=("case",))  # names from the folders
        stats = [{"statistic": row["case"], **{c: row[c] for c in self.columns[2:]}} for row in summary]
        summary_csv = write_csv(path.parent / SUMMARY_CSV, stats, ["statistic", *self.columns[2:]])
        record = {
            "cases": len(self.rows),
            "lesion_mode": self.lesion or None,
            "not_scored": self.failed,
            "unpredicted": self.unpredicted,
            **{row["case"]: {c: row[c] for c in self.columns[2:]} for row in summary},
        }
        summary_json = write_text(path.parent / SUMMARY_JSON, strict_json(record, indent=1) + "\n")
        return table, summary_csv, summary_json

    def markdown(self) -> str:
        """Mean ± sd (median) per region: Dice and HD95."""
        mean, sd, median = self.summary()
        lines = [
            f"{len(self.rows)} cases" + (f" ({len(self.failed)} not scored)" if self.failed else ""),
            "",
            "| Region | Dice mean ± sd | Dice median | HD95 mm mean ± sd | HD95 median |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in REGIONS:
            d, h = f"{r}_dice", f"{r}_hd95"
            dice = f"{mean[d]:.4f} ± {sd[d]:.4f} | {median[d]:.4f}"
            lines.append(f"| {r} | {dice} | {mean[h]:.2f} ± {sd[h]:.2f} | {median[h]:.2f} |")
        if self.lesion:
            lines += ["", *self._lesion_markdown(mean, sd)]
        return "\n".join(lines)

    def _lesion_markdown(self, mean: dict, sd: dict) -> list[str]:
        """Lesion counts summed over the cases, and the mean ± sd of the penalised lesion-wise scores."""
        from mstkd.lesion import mode_columns, mode_rule

        counts, scores = mode_columns(self.lesion)
        names = {"dice": "Lesion Dice", "hd95": "Lesion HD95 mm", "nsd": "Lesion NSD", "small": "left out (small)"}
        lines = [
            "| Region | "
            + " | ".join(names.get(k, k.upper()) for k in counts)
            + " | "
            + " | ".join(f"{names[m]} mean ± sd" for m in scores)
            + " |",
            "|---|" + "---:|" * (len(counts) + len(scores)),
        ]
        for r in REGIONS:
            cells = [str(sum(int(row[f"{r}_lesion_{k}"]) for row in self.rows)) for k in counts]
            for m in scores:
                key, digits = f"{r}_lesion_{m}", 2 if m == "hd95" else 4
                cells.append(f"{mean[key]:.{digits}f} ± {sd[key]:.{digits}f}")
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        return [*lines, "", mode_rule(self.lesion)]


class LesionScoringError(RuntimeError):
    """Lesion-wise scoring (e.g. panoptica) failed on a pair that the whole-region scores accepted."""


def score_pair(
    pred: Path,
    ref: Path,
    *,
    labels: str = "auto",
    hint: str | None = None,
    hd95: str = "max",
    empty_hd95: float | None = None,
    lesion: str = "",
) -> tuple[str, dict[str, dict[str, float]], dict[str, dict[str, float]] | None]:
    """Read and score one predicted and one reference label map: the label convention's name, the
    whole-region scores of :func:`mstkd.metrics.score_labels` and, with ``lesion`` (a mode), the lesion-wise
    scores of :func:`mstkd.lesion.mode_scores` (else None).

    Raises:
        InputError: as :func:`mstkd.metrics.score_files` does.
        LesionScoringError: lesion-wise scoring raised on this pair.
    """
    convention, pred_labels, ref_labels, spacing = label_pair(
        read_labels(pred), read_labels(ref), labels=labels, hint=hint
    )
    scores = score_labels(pred_labels, ref_labels, convention, spacing, hd95=hd95, empty_hd95=empty_hd95)
    if not lesion:
        return convention.name, scores, None
    from mstkd.lesion import mode_scores

    try:
        lesions = mode_scores(lesion, pred_labels, ref_labels, convention, spacing)
    except Exception as exc:  # e.g. an error inside panoptica: the caller decides whether it skips the case
        raise LesionScoringError(f"lesion-wise scoring failed: {type(exc).__name__}: {exc}") from exc
    return convention.name, scores, lesions


def score_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    *,
    labels: str = "auto",
    hd95: str = "max",
    empty_hd95: float | None = None,
    lesion: str = "",
    progress: bool = True,
    jobs: int = 1,
) -> FolderScores:
    """Score every ``<CaseID>.nii.gz`` in ``pred_dir`` (hidden names left out: :func:`label_maps`) against its
    reference in ``ref_dir``.

    With ``lesion`` (a mode) every case is also scored lesion-wise (:func:`mstkd.lesion.mode_scores`). With ``jobs``
    above 1, that many processes score cases side by side; the rows, in case order, are the same to the last bit.

    A prediction without a reference, or a pair that cannot be scored (unreadable file, other
    grid, labels outside the convention, any of :data:`CASE_ERRORS` while it is read or scored, a lack of
    memory included), is skipped with one line on stderr and listed in
    :attr:`FolderScores.failed`; references without a prediction are counted in one line and
    listed in :attr:`FolderScores.unpredicted`.

    Raises:
        InputError: a folder is missing, ``pred_dir`` holds no NIfTI file, or ``lesion`` is an unknown mode or
            the panoptica mode without panoptica installed.
    """
    if lesion:
        from mstkd.lesion import check_mode

        check_mode(lesion)
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for what, folder in (("--pred-dir", pred_dir), ("--ref-dir", ref_dir)):
        if not folder.is_dir():
            raise InputError(f"{what} {folder}: folder not found")
    preds = {_case_id(p): p for p in label_maps(pred_dir)}
    if not preds:
        raise InputError(f"--pred-dir {pred_dir}: no label maps (expected <CaseID>.nii.gz files)")
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: give at least 1")
    refs = find_references(ref_dir)
    result = FolderScores(lesion=lesion)
    options = {"labels": labels, "hd95": hd95, "empty_hd95": empty_hd95, "lesion": lesion}
    tasks = [(case_id, pred, refs.get(case_id), options) for case_id, pred in preds.items()]
    parallel = jobs > 1 and len(tasks) > 1  # fresh processes (spawn): no forked copy of this one's threads
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=spawn) if parallel else nullcontext() as pool:
        outcomes = (pool.map if parallel else map)(_score_case, tasks)  # in case order, whichever process scored it
        for (case_id, pred, _, _), (row, error) in tqdm(
            zip(tasks, outcomes, strict=True), total=len(tasks), desc="score", unit="case", disable=not progress
        ):
            if row is not None:
                result.rows.append(row)
                continue
            result.failed[case_id] = error or f"no reference for {pred.name} under {ref_dir}"
            tqdm.write(f"skipped {case_id}: {result.failed[case_id]}", file=sys.stderr)
    result.unpredicted = sorted(set(refs) - set(preds))
    if result.unpredicted:  # e.g. a test split's predictions against the whole data folder: not an error
        print(f"{len(result.unpredicted)} references have no prediction and are not scored", file=sys.stderr)
    return result


def _score_case(task: tuple) -> tuple[dict | None, str | None]:
    """One case's row, or (None, why it could not be scored; None: it has no reference)."""
    case_id, pred, ref, options = task
    if ref is None:
        return None, None
    ref_path, hint = ref
    try:
        name, scores, lesions = score_pair(pred, ref_path, hint=hint, **options)
    except CASE_ERRORS as exc:  # one case's failure costs that case only
        return None, case_error(exc)
    row = {"case": case_id, "labels": name}
    row.update({f"{r}_{m}": scores[r][m] for r in REGIONS for m in METRICS})
    if lesions is not None:
        row.update({f"{r}_{m}": v for r in REGIONS for m, v in lesions[r].items()})
    return row, None


def score_command(args: argparse.Namespace) -> int:
    """The ``mstkd score`` verb: one pair (``--pred --ref``) or two folders (``--pred-dir --ref-dir``)."""
    if args.lesion:
        from mstkd.lesion import check_mode

        check_mode(args.lesion)  # before any work: panoptica's mode says in one line how to install it
    pair, folders = bool(args.pred or args.ref), bool(args.pred_dir or args.ref_dir)
    if pair == folders:
        raise InputError("give either --pred with --ref (one pair) or --pred-dir with --ref-dir (every case)")
    if pair:
        if not (args.pred and args.ref):
            raise InputError("--pred and --ref go together")
        if args.csv:
            raise InputError("--csv writes the per-case table of --pred-dir/--ref-dir; use --json for one pair")
        try:
            if args.lesion:
                return _score_pair_lesions(args)
            scores = score_files(args.pred, args.ref, labels=args.labels, hd95=args.hd95)
        except CASE_ERRORS as exc:  # one line, as a folder's case says it (an OSError is the command's own)
            if isinstance(exc, InputError | OSError):
                raise
            raise InputError(f"{args.pred} against {args.ref}: not scored ({case_error(exc)})") from None
        print(strict_json(scores) if args.json else format_scores(scores, hd95=args.hd95))
        return 0
    if not (args.pred_dir and args.ref_dir):
        raise InputError("--pred-dir and --ref-dir go together")
    if args.csv:
        if Path(args.csv).is_dir():
            raise InputError(f"--csv {args.csv} is a folder; name the file to write, e.g. scores.csv")
        if Path(args.csv).name in (SUMMARY_CSV, SUMMARY_JSON):
            raise InputError(f"--csv {args.csv}: the summary is written beside the table under that name")
        check_writable(Path(args.csv).parent, what="--csv")
    result = score_folders(
        args.pred_dir,
        args.ref_dir,
        labels=args.labels,
        hd95=args.hd95,
        lesion=args.lesion,
        progress=not args.quiet,
        jobs=args.jobs,
    )
    if not result.rows:
        raise InputError(f"no case could be scored ({len(result.failed)} skipped)")
    written = result.write(args.csv) if args.csv else ()
    if args.json:
        print(strict_json({"cases": result.rows, "summary": result.summary(), "failed": result.failed}))
    else:
        print(result.markdown())
    if written:
        table, *summary = written
        print(f"per-case table: {table}; summary: {', '.join(map(str, summary))}", file=sys.stderr)
    return 1 if result.failed else 0


def _score_pair_lesions(args: argparse.Namespace) -> int:
    """``score --pred --ref --lesion MODE``: each region's dict also holds the lesion-wise scores."""
    from mstkd.lesion import format_lesion_scores

    options = {"labels": args.labels, "hd95": args.hd95, "lesion": args.lesion}
    _, scores, lesions = score_pair(Path(args.pred), Path(args.ref), **options)
    if args.json:
        print(strict_json({r: {**scores[r], **lesions[r]} for r in scores}))
    else:
        print(format_scores(scores, hd95=args.hd95) + "\n\n" + format_lesion_scores(lesions, args.lesion))
    return 0
