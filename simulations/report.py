"""The benchmark report: ``REPORT.md`` plus the CSV/JSON tables and PNG plots it is built from.

Inputs, per finished (arm, seed) folder: ``done.json`` (wall time, machine, which files hold
the result), the final 15-subset table (``eval/round_<R>.json`` for federated arms,
``eval/final.json`` for the centralised arm), and the per-round log (``metrics.jsonl`` or,
centralised, ``log.jsonl``). Outputs, in the benchmark folder:

- ``tables/<arm>.csv|json|md``: the 15 subsets + average, Dice and HD95 per region, mean and
  standard deviation over seeds;
- ``tables/paper_dice.md``, ``tables/paper_hd95.md``: the layout of the paper's Tables 1-4
  (one row per region and arm, one column per subset, means over seeds);
- ``tables/ablation.csv|md``: the layout of the paper's Table 5;
- ``curves.csv`` and ``curves.png``: validation Dice over rounds per arm;
- ``summary.json`` / ``summary.csv``: per arm and seed, the numbers of every other section
  (average Dice and HD95, FeTS convergence score, bytes, wall time);
- ``sites.csv``: per-site validation Dice of the federated arms;
- ``REPORT.md``.

This module gathers the finished runs and writes the files; the tables and the sections that compare arms
are built in :mod:`simulations.tables`, the FeTS convergence score in :mod:`simulations.convergence`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mstkd.atomic import write_csv, write_text
from mstkd.data.labels import REGIONS
from mstkd.evaluate import find_collapse
from mstkd.runconfig import RunConfig
from simulations.comparisons import (
    ADVANTAGE,
    Reference,
    against,
    against_text,
    compare,
    comparison_rows,
    comparison_sections,
    convergence,
    convergence_section,
    validation_section,
)
from simulations.convergence import convergence_score, simulated_round_times
from simulations.plots import validation_curves
from simulations.published import read_meta, run_spec, same_cases
from simulations.scenario import ARMS, Arm, Scenario, load_scenario
from simulations.stats import case_scores
from simulations.tables import (
    CELLS,
    ROW_NAMES,
    ablation_table,
    arm_table,
    collapse_section,
    fmt,
    mean_sd,
    paper_table,
    privacy_section,
    robustness_section,
)

RESULTS = Path(__file__).resolve().parent / "results"
"""The published benchmarks (a scenario's ``compare-with`` is read from here)."""

# --------------------------------------------------------------------------- reading the runs


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_folder(bench: Path, arm: str, seed: int) -> Path:
    """Where a run's files are: ``<bench>/<arm>/seed-<s>`` in a benchmark folder, ``<bench>/runs/<arm>/seed-<s>``
    in a published one (which holds only the small files the report reads)."""
    folder = bench / arm / f"seed-{seed}"
    published = bench / "runs" / arm / f"seed-{seed}"
    return published if not (folder / "done.json").is_file() and (published / "done.json").is_file() else folder


def _finished(bench: Path, arm: Arm, seeds: Sequence[int]) -> list[tuple[int, Path, dict]]:
    out = []
    for seed in seeds:
        folder = run_folder(bench, arm.name, seed)
        if (folder / "done.json").is_file():
            out.append((seed, folder, _json(folder / "done.json")))
    return out


def _run_numbers(arm: Arm, folder: Path, done: dict, local_epochs: float) -> dict[str, Any]:
    """Everything the report needs from one finished run."""
    scored = _json(folder / done["table"])
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
        out["curve"] = [(r["round"], r.get("val", {}).get("val-mean-dice")) for r in records]
        out["bytes_per_round"] = float(np.mean([r["bytes_sent"] + r["bytes_received"] for r in records]))
        out["bytes_total"] = float(sum(r["bytes_sent"] + r["bytes_received"] for r in records))
        out["model_norm"] = records[-1].get("model_norm")  # the final global model's L2 norm (absent in old logs)
        # the privacy spent by the last release (a skipped round releases nothing and records no epsilon)
        privacy = next((r["privacy"] for r in reversed(records) if "epsilon" in r.get("privacy", {})), None)
        privacy = privacy or records[-1].get("privacy") or {}
        out["epsilon"], out["delta"] = privacy.get("epsilon"), privacy.get("delta")
        out["clip_last"] = privacy.get("clipping_norm_next", privacy.get("clipping_norm"))
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
        for seed, folder_of_run, done in _finished(folder, ARMS[arm], sorted(s for a, s in covered if a == arm)):
            if done.get("spec") != run_spec(other, ARMS[arm], seed, ""):
                return None, f"`{name}`'s {arm} seed {seed} was made with another config than its scenario's"
            runs.setdefault(arm, []).append({"case_rows": _json(folder_of_run / done["table"])["cases"]})
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


# --------------------------------------------------------------------------- writing


def schedules(scenario: Scenario) -> str:
    """How long the federated arms and the centralised arm train, in epochs over the training cases."""
    run = scenario.config
    if run.local_steps:
        federated = f"{run.num_server_rounds} rounds of {run.local_steps} local steps"
    else:
        total = run.num_server_rounds * run.local_epochs
        federated = f"{run.num_server_rounds} rounds of {run.local_epochs:g} local epochs ({total:g} epochs in all)"
    trains_longer = scenario.centralised_train_epochs > scenario.federated_train_epochs
    longer = " (longer, to level off: see Convergence)" if trains_longer else ""
    return (
        f"**Schedules**: the federated arms train {federated}; the centralised arm trains "
        f"{scenario.centralised_train_epochs} epochs over the pooled training cases{longer}."
    )


def write_report(bench: Path, scenario: Scenario, arms: Sequence[Arm], seeds: Sequence[int]) -> Path:
    """Rebuild every report file of ``bench`` from the finished runs; return the path of ``REPORT.md``."""
    tables = bench / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    local_epochs = scenario.config.local_epochs
    results: dict[str, list[dict]] = {}
    seeds_of: dict[str, list[int]] = {}
    for arm in arms:
        finished = _finished(bench, arm, seeds)
        if finished:
            epochs = RunConfig.parse(scenario.arm_run_config(arm, 0)).local_epochs if arm.federated else local_epochs
            results[arm.name] = [_run_numbers(arm, folder, done, epochs) for _, folder, done in finished]
            seeds_of[arm.name] = [seed for seed, _, _ in finished]
    meta = read_meta(bench)

    summary_rows = []
    for name, runs in results.items():
        for seed, result in zip(seeds_of[name], runs, strict=True):
            summary_rows.append(
                {
                    "arm": name,
                    "seed": seed,
                    "mean_dice": result["mean_dice"],
                    "test_cases": len(result["cases"]),
                    **{k: result[k] for k in CELLS},
                    "max_region_share": result["max_share"],
                    "collapsed": result["collapsed"],
                    "convergence_score": result.get("convergence"),
                    "simulated_hours": result.get("simulated_hours"),
                    "bytes_per_round": result["bytes_per_round"],
                    "bytes_total": result["bytes_total"],
                    "wall_seconds": result["seconds"],
                    "model_norm": result.get("model_norm"),
                    "skipped_rounds": result.get("skipped_rounds"),
                    "failed_replies": result.get("failed_replies"),
                    "val_trend_last": result["val_trend_last"],
                    "epsilon": result.get("epsilon"),
                }
            )
    if summary_rows:
        write_csv(bench / "summary.csv", summary_rows)
    write_text(bench / "summary.json", json.dumps({"scenario": scenario.name, "runs": summary_rows}, indent=1))

    site_rows = []
    for name, runs in results.items():
        if not ARMS[name].federated:
            continue
        for site in sorted(runs[0]["sites"], key=lambda s: -runs[0]["sites"][s]["train"]):
            values = [
                r["sites"][site]["dice"] for r in runs if site in r["sites"] and r["sites"][site]["dice"] is not None
            ]
            first = runs[0]["sites"][site]
            site_rows.append(
                {
                    "arm": name,
                    "site": site,
                    "train_cases": first["train"],
                    "val_cases": first["val"],
                    "val_mean_dice": float(np.mean(values)) if values else None,
                    "sd": mean_sd(values)[1] if values else None,
                    "seeds": len(values),
                }
            )
    if site_rows:
        write_csv(bench / "sites.csv", site_rows)

    lines = [f"# Benchmark: {scenario.name}", "", scenario.description, ""]
    if meta:
        lines += [
            f"- Data: {meta.get('data', '')}.",
            f"- Command: `{meta.get('command', '')}`",
            f"- Code: commit `{meta.get('commit') or 'not recorded'}`.",
            f"- Machine: {meta.get('machine', '')}.",
            f"- Scenario file: `simulations/scenarios/{scenario.source.name}`; seeds: {', '.join(map(str, seeds))}.",
        ]
    if "phantom" in str(meta.get("data", "phantom")):
        lines += [
            "",
            "> These numbers come from synthetic phantom cases, not from FeTS or BraTS scans. They test the "
            "machinery and compare arms with each other on the same phantoms; they are **not comparable** with "
            "the paper's real-data numbers.",
        ]
    if meta.get("note"):
        lines += ["", "## What changed", "", meta["note"].strip()]
    lines += ["", "Every number below is read from a file in this folder; each section names its files.", ""]
    missing = [f"{a.name} seed {s}" for a in arms for s in seeds if s not in seeds_of.get(a.name, [])]
    if missing:
        lines += [f"**Incomplete**: not yet finished: {', '.join(missing)}.", ""]

    if results:
        sizes = sorted({len(r["cases"]) for runs in results.values() for r in runs})
        lines += [
            f"**Test set**: {' or '.join(map(str, sizes))} held-out cases, scored under all 15 modality subsets. "
            "No site trains on them, and every number below is the final round's model (centralised: the last "
            "epoch's), so nothing is chosen on them.",
            "",
        ]
        if "centralised" in results:
            lines += [schedules(scenario), ""]
        reference = None
        if scenario.compare_with:
            reference, why = reference_runs(scenario, meta)
            if why:
                lines += [f"**Not compared with `{scenario.compare_with}`**: {why}.", ""]
        rows = compare(results, seeds_of, against(results, seeds_of, reference, scenario))
        if rows:
            write_csv(bench / "comparisons.csv", comparison_rows(rows))
        lines += comparison_sections(
            rows, bench, scenario.config.model, against_text(results, seeds_of, reference, scenario)
        )
        lines += [
            "## Overview",
            "",
            "Source: `summary.csv` (one row per arm and seed), `runs/<arm>/seed-<s>/done.json`.",
            "",
            "| Arm | seeds | mean Dice | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT | "
            "FeTS convergence score | MB per round | MB total | wall time (s) |",
            "|---|---:|" + "---:|" * 11,
        ]
        for name, runs in results.items():
            fed = ARMS[name].federated
            conv = fmt([r["convergence"] for r in runs], 1.0, 3) if fed else "–"
            per_round = f"{np.mean([r['bytes_per_round'] for r in runs]) / 1e6:.1f}" if fed else "0"
            total = f"{np.mean([r['bytes_total'] for r in runs]) / 1e6:.1f}" if fed else "0"
            lines.append(
                f"| {ARMS[name].label} | {len(runs)} | {fmt([r['mean_dice'] for r in runs], 100.0)} | "
                + " | ".join(fmt([r[f"{g}_dice"] for r in runs], 100.0) for g in REGIONS)
                + " | "
                + " | ".join(fmt([r[f"{g}_hd95"] for r in runs], 1.0, 2) for g in REGIONS)
                + f" | {conv} | {per_round} | {total} | {fmt([r['seconds'] for r in runs], 1.0, 0)} |"
            )
        lines += [
            "",
            "Dice in %, HD95 in mm, mean ± sd over seeds, on the held-out test cases, averaged over the 15 "
            "modality subsets (final round; centralised: last epoch). Bytes: both directions, all nodes "
            "(`metrics.jsonl`: `bytes_sent` + `bytes_received`). The FeTS convergence score is "
            "[(T_max − t) · best + AUC] / T_max over a simulated week (T_max = 604,800 s), with best = the best "
            "aggregated site-validation Dice so far of the model each round starts from (`metrics.jsonl`: "
            "`val.val-mean-dice` of the round before; the untrained model counts as 0) and simulated round "
            "times drawn from the FeTS example timing distributions (train 6.71 ± 0.87 s and validation "
            "23.1 ± 2.6 s per case, download 112.4 ± 14.5 s, upload 192.3 ± 21.5 s; seed 0xFEEDFACE, per round; "
            "the slowest site sets the round time). The challenge assigns each site one of 21 timing "
            "distributions; here every site uses the example one.",
            "",
        ]
        lines += robustness_section(results, seeds_of)
        lines += privacy_section(results)
        lines += collapse_section(results, seeds_of)
        ablation = ablation_table(results, tables)
        if ablation:
            lines += [
                "## Ablation (layout of the paper's Table 5)",
                "",
                "Averages over the 15 subsets, mean ± sd over seeds. Source: `tables/ablation.csv`.",
                "",
                ablation,
                "",
            ]
        validation_curves(results, bench)
        lines += [
            "## Validation Dice over rounds",
            "",
            "Aggregated site-validation Dice with all four modalities after each round (centralised: the "
            "pooled validation cases after each epoch, placed at epoch / local epochs), one panel per arm, "
            "mean ± sd over seeds; the dashed line is the full method's mean. Source: `curves.csv`.",
            "",
            "![validation Dice over rounds](curves.png)",
            "",
        ]
        lines += convergence_section(results, seeds_of)
        lines += validation_section(results, seeds_of)
        lines += [
            "## Paper layout (Tables 1-4)",
            "",
            "Means over seeds. The Mean rows average ET, TC and WT (in the Dice table their Avg. is the overview's "
            "mean Dice): they show in which modality subsets two arms differ. Source: `tables/<arm>.csv`.",
            "",
            "### Dice (%)",
            "",
            paper_table(results, "dice", 100.0, 1),
            "",
            "### HD95 (mm)",
            "",
            paper_table(results, "hd95", 1.0, 2),
            "",
        ]
        if site_rows:
            lines += [
                "## Per-site validation Dice (federated arms, final round)",
                "",
                "Mean Dice of the global model on each site's validation cases, all four modalities, mean over "
                "seeds. Sites are ordered by size. Source: `sites.csv`.",
                "",
                "| Arm | Site | train cases | val cases | val mean Dice |",
                "|---|---|---:|---:|---:|",
            ]
            for row in site_rows:
                dice = (
                    f"{100 * row['val_mean_dice']:.1f} ± {100 * row['sd']:.1f}"
                    if row["val_mean_dice"] is not None
                    else "–"
                )
                lines.append(
                    f"| {ARMS[row['arm']].label} | {row['site']} | {row['train_cases']} | {row['val_cases']} | {dice} |"
                )
            lines.append("")
        lines += ["## Per-arm tables", ""]
        for name, runs in results.items():
            lines += [
                f"### {ARMS[name].label} (`{name}`)",
                "",
                f"Source: `tables/{name}.csv`.",
                "",
                arm_table(ARMS[name], runs, tables),
                "",
            ]
        machines = sorted({r["machine"] for runs in results.values() for r in runs})
        commits = sorted({r["commit"] or "not recorded" for runs in results.values() for r in runs})
        lines += ["## Where it ran", "", *[f"- {m}" for m in machines], "", f"Code: {', '.join(commits)}.", ""]
    return write_text(bench / "REPORT.md", "\n".join(lines) + "\n")
