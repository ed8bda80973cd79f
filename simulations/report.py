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

This module writes the files from the numbers :mod:`simulations.runs` reads off the finished runs; the
tables and the sections that compare arms are built in :mod:`simulations.tables`, the FeTS convergence
score in :mod:`simulations.convergence`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mstkd.atomic import write_csv, write_text
from mstkd.data.labels import REGIONS
from mstkd.runconfig import RunConfig
from server.report import code, plain
from simulations.comparisons import (
    against,
    against_text,
    compare,
    comparison_rows,
    comparison_sections,
    convergence_section,
    validation_section,
)
from simulations.plots import validation_curves
from simulations.published import read_meta
from simulations.runs import finished_runs, reference_runs, run_numbers
from simulations.scenario import ARMS, Arm, Scenario
from simulations.tables import (
    CELLS,
    ablation_table,
    arm_table,
    collapse_section,
    fmt,
    mean_sd,
    paper_table,
    privacy_section,
    robustness_section,
)

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
    results, seeds_of = _finished(bench, scenario, arms, seeds)
    meta = read_meta(bench)
    summary = _summary_rows(results, seeds_of)
    if summary:
        write_csv(bench / "summary.csv", summary)
    write_text(bench / "summary.json", json.dumps({"scenario": scenario.name, "runs": summary}, indent=1))
    sites = _site_rows(results)
    if sites:
        write_csv(bench / "sites.csv", sites, outside=("site",))  # the names the sites gave

    lines = _header(scenario, meta, arms, seeds, seeds_of)
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
        lines += _overview(results)
        lines += robustness_section(results, seeds_of)
        lines += privacy_section(results)
        lines += collapse_section(results, seeds_of)
        lines += _ablation(results, tables)
        validation_curves(results, bench)
        lines += _curves()
        lines += convergence_section(results, seeds_of)
        lines += validation_section(results, seeds_of)
        lines += _paper_layout(results)
        lines += _per_site(sites)
        lines += _per_arm(results, tables)
        lines += _where_it_ran(results)
    return write_text(bench / "REPORT.md", "\n".join(lines) + "\n")


def _finished(
    bench: Path, scenario: Scenario, arms: Sequence[Arm], seeds: Sequence[int]
) -> tuple[dict[str, list[dict]], dict[str, list[int]]]:
    """The numbers of each arm's finished runs (:func:`run_numbers`), and their seeds, by arm name."""
    results: dict[str, list[dict]] = {}
    seeds_of: dict[str, list[int]] = {}
    for arm in arms:
        done_runs = finished_runs(bench, arm, seeds)
        if done_runs:
            epochs = (
                RunConfig.parse(scenario.arm_run_config(arm, 0)).local_epochs
                if arm.federated
                else scenario.config.local_epochs
            )
            results[arm.name] = [run_numbers(arm, folder, done, epochs) for _, folder, done in done_runs]
            seeds_of[arm.name] = [seed for seed, _, _ in done_runs]
    return results, seeds_of


def _summary_rows(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[dict]:
    """``summary.csv``: one row per arm and seed, the numbers of every other section."""
    rows = []
    for name, runs in results.items():
        for seed, result in zip(seeds_of[name], runs, strict=True):
            rows.append(
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
    return rows


def _site_rows(results: dict[str, list[dict]]) -> list[dict]:
    """``sites.csv``: each federated arm's final validation Dice per site, mean and sd over seeds, largest site
    first."""
    rows = []
    for name, runs in results.items():
        if not ARMS[name].federated:
            continue
        for site in sorted(runs[0]["sites"], key=lambda s: -runs[0]["sites"][s]["train"]):
            values = [
                r["sites"][site]["dice"] for r in runs if site in r["sites"] and r["sites"][site]["dice"] is not None
            ]
            first = runs[0]["sites"][site]
            rows.append(
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
    return rows


def _header(
    scenario: Scenario, meta: dict, arms: Sequence[Arm], seeds: Sequence[int], seeds_of: dict[str, list[int]]
) -> list[str]:
    """The title, what ran where (``bench.json``, which may come from elsewhere: shown as text), the note, and the
    runs not finished yet."""
    lines = [f"# Benchmark: {scenario.name}", "", scenario.description, ""]
    if meta:
        lines += [
            f"- Data: {plain(meta.get('data', ''))}.",
            f"- Command: {code(meta.get('command', ''))}",
            f"- Code: commit {code(meta.get('commit') or 'not recorded')}.",
            f"- Machine: {plain(meta.get('machine', ''))}.",
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
    return lines


def _overview(results: dict[str, list[dict]]) -> list[str]:
    """Each arm's averages over the 15 subsets, convergence score, bytes and wall time."""
    lines = [
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
    return [
        *lines,
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


def _ablation(results: dict[str, list[dict]], tables: Path) -> list[str]:
    """The layout of the paper's Table 5, when the arms hold an ablation (``tables/ablation.csv``)."""
    ablation = ablation_table(results, tables)
    if not ablation:
        return []
    return [
        "## Ablation (layout of the paper's Table 5)",
        "",
        "Averages over the 15 subsets, mean ± sd over seeds. Source: `tables/ablation.csv`.",
        "",
        ablation,
        "",
    ]


def _curves() -> list[str]:
    """The section showing ``curves.png`` (:func:`validation_curves` draws it)."""
    return [
        "## Validation Dice over rounds",
        "",
        "Aggregated site-validation Dice with all four modalities after each round (centralised: the "
        "pooled validation cases after each epoch, placed at epoch / local epochs), one panel per arm, "
        "mean ± sd over seeds; the dashed line is the full method's mean. Source: `curves.csv`.",
        "",
        "![validation Dice over rounds](curves.png)",
        "",
    ]


def _paper_layout(results: dict[str, list[dict]]) -> list[str]:
    """Dice and HD95 per region, arm and subset, as the paper's Tables 1-4 lay them out."""
    return [
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


def _per_site(sites: list[dict]) -> list[str]:
    """Each federated arm's final validation Dice per site (``sites.csv``); the names the sites gave, as text."""
    if not sites:
        return []
    lines = [
        "## Per-site validation Dice (federated arms, final round)",
        "",
        "Mean Dice of the global model on each site's validation cases, all four modalities, mean over "
        "seeds. Sites are ordered by size. Source: `sites.csv`.",
        "",
        "| Arm | Site | train cases | val cases | val mean Dice |",
        "|---|---|---:|---:|---:|",
    ]
    for row in sites:
        dice = f"{100 * row['val_mean_dice']:.1f} ± {100 * row['sd']:.1f}" if row["val_mean_dice"] is not None else "–"
        lines.append(
            f"| {ARMS[row['arm']].label} | {plain(row['site'])} | {row['train_cases']} | {row['val_cases']} | {dice} |"
        )
    return [*lines, ""]


def _per_arm(results: dict[str, list[dict]], tables: Path) -> list[str]:
    """Each arm's 15-subset table (``tables/<arm>.csv``)."""
    lines = ["## Per-arm tables", ""]
    for name, runs in results.items():
        label = ARMS[name].label
        lines += [
            f"### {label} (`{name}`)",
            "",
            f"Source: `tables/{name}.csv`.",
            "",
            arm_table(ARMS[name], runs, tables),
            "",
        ]
    return lines


def _where_it_ran(results: dict[str, list[dict]]) -> list[str]:
    """The machines and commits of the runs (``done.json`` may come from elsewhere: shown as text)."""
    machines = sorted({r["machine"] for runs in results.values() for r in runs})
    commits = sorted({r["commit"] or "not recorded" for runs in results.values() for r in runs})
    shown = [plain(c) for c in commits]
    return ["## Where it ran", "", *[f"- {plain(m)}" for m in machines], "", f"Code: {', '.join(shown)}.", ""]
