"""Reading a benchmark's finished runs: per (arm, seed) folder, the numbers the report is built from.

A run folder holds ``done.json`` (wall time, machine, the spec it was made with, which files hold the
result), the final 15-subset table and the per-round log; :func:`run_numbers` turns them into one dict.
:func:`reference_runs` reads another scenario's published runs for the report's ``compare-with`` section.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mstkd.data.labels import REGIONS
from mstkd.errors import InputError, first_line
from mstkd.evaluate import find_collapse
from mstkd.numbers import is_finite
from simulations.comparisons import ADVANTAGE, Reference, convergence
from simulations.convergence import convergence_score, simulated_round_times
from simulations.published import DONE, read_done, read_meta, run_id, run_spec, same_cases
from simulations.scenario import ARMS, Arm, Scenario, load_scenario
from simulations.stats import case_scores
from simulations.tables import CELLS, ROW_NAMES

MAX_ROUNDS, MAX_SITES = 1000, 1000
"""The most rounds and sites a run's log may hold (a log from elsewhere could claim millions, at minutes of CPU)."""

RESULTS = Path(__file__).resolve().parent / "results"
"""The published benchmarks (a scenario's ``compare-with`` is read from here)."""


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_folder(bench: Path, arm: str, seed: int) -> Path:
    """Where a run's files are: ``<bench>/<arm>/seed-<s>`` in a benchmark folder, ``<bench>/runs/<arm>/seed-<s>``
    in a published one (which holds only the small files the report reads)."""
    folder = bench / run_id(arm, seed)
    published = bench / "runs" / run_id(arm, seed)
    return published if not (folder / DONE).is_file() and (published / DONE).is_file() else folder


def finished_runs(bench: Path, arm: Arm, seeds: Sequence[int]) -> list[tuple[int, Path, dict]]:
    """(seed, folder, ``done.json``) of each of ``seeds`` that ``arm`` has finished in ``bench``."""
    out = []
    for seed in seeds:
        folder = run_folder(bench, arm.name, seed)
        if (folder / DONE).is_file():
            out.append((seed, folder, read_done(bench, str(folder.relative_to(bench)))))
    return out


def _check_scores(path: Path, rows: list[dict]) -> None:
    """Every row of a table or case list scores each region with a Dice in [0, 1] and a finite HD95 of at least 0
    (the scorer gives an absent region 1 and 0, and a missed one the volume diagonal: never NaN)."""
    for row in rows:
        for region in REGIONS:
            dice, hd95 = row[f"{region}_dice"], row[f"{region}_hd95"]
            if not (is_finite(dice) and 0 <= dice <= 1 and is_finite(hd95) and hd95 >= 0):
                raise InputError(f"{path}: {region} Dice {dice!r} or HD95 {hd95!r} is not a score")


def _number_or_none(value: Any) -> float | None:
    if value is not None and not is_finite(value):
        raise ValueError(f"{str(value)[:40]!r} is not a number")
    return value


def run_numbers(arm: Arm, folder: Path, done: dict, local_epochs: float) -> dict[str, Any]:
    """Everything the report needs from one finished run (``done``: its :func:`~simulations.published.read_done`).

    Raises:
        InputError: files that are not a finished run's (a run folder may come from elsewhere): a key missing, a
            value of the wrong type, a score out of range; in one line that names the folder.
    """
    with _run_files(folder):
        return _run_numbers(arm, folder, done, local_epochs)


@contextmanager
def _run_files(folder: Path) -> Iterator[None]:
    """Reading a finished run's files (which may come from elsewhere): a missing key or a value of the wrong type
    becomes one :class:`InputError` naming the folder."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise InputError(f"{folder}: not a finished run's files ({type(exc).__name__}: {first_line(exc)})") from None


def _scored(folder: Path, done: dict) -> dict:
    """A run's final table file (``done["table"]``), every row of its table and its case list score-checked."""
    scored = _json(folder / done["table"])
    _check_scores(folder / done["table"], [*scored["table"], *scored["cases"]])
    return scored


def _run_numbers(arm: Arm, folder: Path, done: dict, local_epochs: float) -> dict[str, Any]:
    scored = _scored(folder, done)
    table = scored["table"]
    if [row["display"] for row in table] != ROW_NAMES:
        raise ValueError(f"{folder / done['table']}: expected the 15 subsets and the average")
    avg = table[-1]
    out: dict[str, Any] = {
        "table": table,
        "cases": case_scores(scored["cases"]),  # per test case: Dice averaged over regions and subsets
        "case_rows": scored["cases"],  # per test case and subset
        "mean_dice": float(np.mean([avg[f"{r}_dice"] for r in REGIONS])),
        **_collapse_numbers(table),
        **{k: float(avg[k]) for k in CELLS},
        "seconds": float(done["seconds"]),
        "machine": done.get("machine", ""),
        "commit": done.get("commit", ""),
    }
    if arm.federated:
        records = [r for r in _jsonl(folder / done["log"]) if r["round"] >= 1]
        if len(records) > MAX_ROUNDS or len(records[-1]["sites"]) > MAX_SITES:  # the time model below is their product
            raise ValueError(f"{len(records)} rounds of {len(records[-1]['sites'])} sites: more than a benchmark runs")
        out["curve"] = [(r["round"], r.get("val", {}).get("val-mean-dice")) for r in records]
        out["bytes_per_round"] = float(np.mean([r["bytes_sent"] + r["bytes_received"] for r in records]))
        out["bytes_total"] = float(sum(r["bytes_sent"] + r["bytes_received"] for r in records))
        out["model_norm"] = _number_or_none(records[-1].get("model_norm"))  # the final model's L2 norm (old logs: none)
        # the privacy spent by the last release (a skipped round releases nothing and records no epsilon)
        privacy = next((r["privacy"] for r in reversed(records) if "epsilon" in r.get("privacy", {})), None)
        privacy = privacy or records[-1].get("privacy") or {}
        out["epsilon"], out["delta"] = _number_or_none(privacy.get("epsilon")), _number_or_none(privacy.get("delta"))
        out["clip_last"] = _number_or_none(privacy.get("clipping_norm_next", privacy.get("clipping_norm")))
        out["skipped_rounds"] = sum(bool(r.get("skipped")) for r in records)
        out["failed_replies"] = sum(len(r.get("failures", [])) for r in records)
        # per site by the name it gave (the log keys them by node id, which differs between runs)
        last = {str(s.get("name", key)): s for key, s in records[-1]["sites"].items()}
        out["sites"] = {
            name: {
                "train": int(s.get("train-examples", 0)),
                "val": int(s.get("evaluate-examples", 0)),
                "dice": float(s["val-mean-dice"]) if s.get("evaluate-examples") else None,
            }
            for name, s in last.items()
        }
        names = sorted(out["sites"])
        times = simulated_round_times(
            [out["sites"][n]["train"] for n in names],
            [out["sites"][n]["val"] for n in names],
            len(records),
            local_epochs,
        )
        # round r starts from the model validated after round r - 1; the untrained model counts as Dice 0
        dice = [0.0] + [v if v is not None else 0.0 for _, v in out["curve"]][:-1]
        out["convergence"] = convergence_score(dice, times)
        out["simulated_hours"] = float(times.sum() / 3600)
    else:
        records = _jsonl(folder / done["log"])
        out["curve"] = [(r["epoch"] / local_epochs, r["val"]["mean_dice"]) for r in records if "val" in r]
        out["bytes_per_round"] = out["bytes_total"] = 0.0
    out["val_trend_last"] = convergence(out["curve"])
    return out


def reference_runs(scenario: Scenario, meta: dict) -> tuple[Reference | None, str]:
    """The published runs of ``scenario.compare_with`` of the :data:`ADVANTAGE` arms, at the seeds its report covers
    and made as that scenario says (``done.json`` ``spec``), or None and why. Runs on other cases than this
    benchmark's (``bench.json``) are not taken."""
    name = str(scenario.compare_with)
    folder = RESULTS / name
    shown = f"simulations/results/{name}/"
    summary = folder / "summary.csv"
    if not summary.is_file():
        return None, f"`{name}` has no published report in `{shown}`"
    record = read_meta(folder)
    if not record.get("test_data_path") or not same_cases(record, meta):
        return None, f"`{name}`'s published runs were made on other cases ({record.get('data', 'not recorded')})"
    with summary.open() as f:
        covered = [(r["arm"], int(r["seed"])) for r in csv.DictReader(f)]
    other = load_scenario(name)
    runs: dict[str, list[dict]] = {}
    seeds_of: dict[str, list[int]] = {}
    for arm in ADVANTAGE:
        for seed, folder_of_run, done in finished_runs(folder, ARMS[arm], sorted(s for a, s in covered if a == arm)):
            if done.get("spec") != run_spec(other, ARMS[arm], seed, ""):
                return None, f"`{name}`'s {arm} seed {seed} was made with another config than its scenario's"
            with _run_files(folder_of_run):  # another scenario's published runs: checked as this one's are
                runs.setdefault(arm, []).append({"case_rows": _scored(folder_of_run, done)["cases"]})
            seeds_of.setdefault(arm, []).append(seed)
    if len(runs) < len(ADVANTAGE):
        return None, f"`{name}` has no published runs of both {' and '.join(ADVANTAGE)}"
    return Reference(name, shown, runs, seeds_of), ""


def _collapse_numbers(table: list[dict]) -> dict[str, Any]:
    """The largest share of the brain any region takes under any subset, and whether the run collapsed
    (:func:`mstkd.evaluate.find_collapse` at its default limits: a region over more than half the brain,
    or at more than ten times its reference volume, case means)."""
    rows = table[:-1]
    if not all(f"{r}_share" in row for row in rows for r in REGIONS):
        return {"max_share": None, "max_share_region": None, "collapsed": None}  # tables from older versions
    share, region = max((row[f"{r}_share"], r) for row in rows for r in REGIONS)
    return {"max_share": float(share), "max_share_region": region, "collapsed": bool(find_collapse(rows))}
