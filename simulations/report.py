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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mstkd.atomic import atomic_path, write_csv, write_text
from mstkd.data.labels import REGIONS
from mstkd.evaluate import find_collapse
from mstkd.modalities import SUBSETS
from simulations.scenario import ABLATIONS, ARMS, ATTACK_LABELS, HOSTILE, ROBUST_STRATEGIES, Arm, Scenario

T_MAX = 7 * 24 * 3600.0
"""The FeTS convergence score's time budget: one simulated week."""
FETS_TIME_SEED = 0xFEEDFACE
# (mean, sd) in seconds of the FeTS challenge's example timing distributions
TRAIN_PER_CASE, VAL_PER_CASE, DOWNLOAD, UPLOAD = (6.71, 0.87), (23.1, 2.6), (112.4, 14.5), (192.3, 21.5)

ROW_NAMES = [s.display_name for s in SUBSETS] + ["Average"]
CELLS = [f"{r}_dice" for r in REGIONS] + [f"{r}_hd95" for r in REGIONS]


# --------------------------------------------------------------------------- the FeTS convergence score


def simulated_round_times(
    train_cases: Sequence[int], val_cases: Sequence[int], rounds: int, epochs: float
) -> np.ndarray:
    """Simulated wall time of each round (FeTS Task 1): the slowest collaborator's download,
    validation, training and upload, each drawn per case from a normal distribution (clamped to
    >= 1 s), seeded by the round number. Every collaborator uses the FeTS example distributions."""
    times = []
    for r in range(1, rounds + 1):
        rng = np.random.default_rng([FETS_TIME_SEED, r])
        slowest = 0.0
        for n_train, n_val in zip(train_cases, val_cases, strict=True):
            t_train, t_val, down, up = (
                max(1.0, rng.normal(*d)) for d in (TRAIN_PER_CASE, VAL_PER_CASE, DOWNLOAD, UPLOAD)
            )
            slowest = max(slowest, down + 2 * n_val * t_val + epochs * n_train * t_train + up)
        times.append(slowest)
    return np.asarray(times)


def convergence_score(dice: Sequence[float], round_times: Sequence[float], t_max: float = T_MAX) -> float:
    """FeTS convergence score after the last round: ``[(T_max - t_r) best_r + AUC_r] / T_max``.

    ``dice[r]`` is the validation Dice of the model that round ``r + 1`` starts from (as in FeTS, where
    a round first validates the incoming model), ``best_r`` the best of them so far, ``AUC_r`` the sum of
    ``best_i x roundtime_i``. As in the FeTS experiment loop, the round that crosses ``T_max`` still
    counts and ends the experiment (``t_r`` is then capped at ``T_max``)."""
    best = auc = elapsed = 0.0
    for value, seconds in zip(dice, round_times, strict=True):
        best = max(best, float(value))
        auc += best * float(seconds)
        elapsed += float(seconds)
        if elapsed > t_max:
            break
    return ((t_max - min(elapsed, t_max)) * best + auc) / t_max


# --------------------------------------------------------------------------- reading the runs


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(bench: Path, arm: Arm, seeds: Sequence[int]) -> list[tuple[int, Path, dict]]:
    out = []
    for seed in seeds:
        folder = bench / arm.name / f"seed-{seed}"
        if (folder / "done.json").is_file():
            out.append((seed, folder, _json(folder / "done.json")))
    return out


def _run_numbers(arm: Arm, folder: Path, done: dict, local_epochs: float) -> dict[str, Any]:
    """Everything the report needs from one finished run."""
    table = _json(folder / done["table"])["table"]
    if [row["display"] for row in table] != ROW_NAMES:
        raise ValueError(f"{folder / done['table']}: expected the 15 subsets and the average")
    avg = table[-1]
    out: dict[str, Any] = {
        "table": table,
        "mean_dice": float(np.mean([avg[f"{r}_dice"] for r in REGIONS])),
        **_collapse_numbers(table),
        **{k: float(avg[k]) for k in CELLS},
        "seconds": float(done["seconds"]),
        "machine": done.get("machine", ""),
    }
    if arm.federated:
        records = [r for r in _jsonl(folder / done["log"]) if r["round"] >= 1]
        out["curve"] = [(r["round"], r.get("val", {}).get("val-mean-dice")) for r in records]
        out["bytes_per_round"] = float(np.mean([r["bytes_sent"] + r["bytes_received"] for r in records]))
        out["bytes_total"] = float(sum(r["bytes_sent"] + r["bytes_received"] for r in records))
        out["model_norm"] = records[-1].get("model_norm")  # the final global model's L2 norm (absent in old logs)
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
    return out


def _collapse_numbers(table: list[dict]) -> dict[str, Any]:
    """The largest share of the brain any region takes under any subset, and whether the run collapsed
    (:func:`mstkd.evaluate.find_collapse` at its default limits: a region over more than half the brain,
    or at more than ten times its reference volume, case means)."""
    rows = table[:-1]
    if not all(f"{r}_share" in row for row in rows for r in REGIONS):
        return {"max_share": None, "max_share_region": None, "collapsed": None}  # tables from older versions
    share, region = max((row[f"{r}_share"], r) for row in rows for r in REGIONS)
    return {"max_share": float(share), "max_share_region": region, "collapsed": bool(find_collapse(rows))}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, sd = _mean_sd([v * scale for v in values])
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


# --------------------------------------------------------------------------- writing


def _arm_table(arm: Arm, runs: list[dict], out: Path) -> str:
    """``tables/<arm>.*``: 15 subsets + average, mean and sd over seeds; returns the Markdown."""
    rows, lines = [], ["| Subset | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT |", "|---|" + "---:|" * 6]
    for i, name in enumerate(ROW_NAMES):
        row: dict[str, Any] = {"subset": name, "seeds": len(runs)}
        cells = []
        for key in CELLS:
            values = [run["table"][i][key] for run in runs]
            row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd(values)
            cells.append(_fmt(values, 100.0) if key.endswith("dice") else _fmt(values, 1.0, 2))
        rows.append(row)
        label = f"**{name}**" if name == "Average" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    write_csv(out / f"{arm.name}.csv", rows)
    write_text(out / f"{arm.name}.json", json.dumps({"arm": arm.name, "label": arm.label, "rows": rows}, indent=1))
    md = "\n".join(lines)
    write_text(out / f"{arm.name}.md", md + "\n")
    return md


def _paper_table(results: dict[str, list[dict]], metric: str, scale: float, digits: int) -> str:
    """Tables 1-4 layout: a row per region and arm, a column per subset, then the average."""
    head = "| Region | Arm | " + " | ".join(ROW_NAMES[:-1]) + " | Avg. |"
    lines = [head, "|---|---|" + "---:|" * len(ROW_NAMES)]
    for region in reversed(REGIONS):  # the paper lists WT, TC, ET
        for j, (name, runs) in enumerate(results.items()):
            cells = [
                f"{np.mean([run['table'][i][f'{region}_{metric}'] for run in runs]) * scale:.{digits}f}"
                for i in range(len(ROW_NAMES))
            ]
            lines.append(f"| {region if j == 0 else ''} | {ARMS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ablation_table(results: dict[str, list[dict]], out: Path) -> str | None:
    present = [a for a in ABLATIONS if a in results]
    if len(present) < 2:
        for stale in (out / "ablation.csv", out / "ablation.md"):  # from an earlier report with more arms
            stale.unlink(missing_ok=True)
        return None
    order = ["WT", "TC", "ET"]
    lines = ["| Method | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET |", "|---|" + "---:|" * 6]
    rows = []
    for name in present:
        runs = results[name]
        row: dict[str, Any] = {"arm": name, "label": "Ours (MST-KDNet)" if name == "mstkd" else ARMS[name].label}
        cells = []
        for metric, scale, digits in (("dice", 100.0, 1), ("hd95", 1.0, 2)):
            for region in order:
                values = [run[f"{region}_{metric}"] for run in runs]
                row[f"{region}_{metric}_mean"], row[f"{region}_{metric}_sd"] = _mean_sd(values)
                cells.append(_fmt(values, scale, digits))
        rows.append(row)
        label = f"**{row['label']}**" if name == "mstkd" else row["label"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    write_csv(out / "ablation.csv", rows)
    md = "\n".join(lines)
    write_text(out / "ablation.md", md + "\n")
    return md


def _curves(results: dict[str, list[dict]], bench: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        points: dict[float, list[float]] = {}
        for run in runs:
            for x, y in run["curve"]:
                if y is not None:
                    points.setdefault(float(x), []).append(float(y))
        xs = sorted(points)
        if not xs:
            continue
        mean = np.array([np.mean(points[x]) for x in xs])
        sd = np.array([np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in xs])
        rows += [
            {"arm": name, "round": x, "val_mean_dice": m, "sd": s, "seeds": len(points[x])}
            for x, m, s in zip(xs, mean, sd, strict=True)
        ]
        style = "--" if not ARMS[name].federated else "-"
        ax.plot(xs, mean, style, marker="o", label=ARMS[name].label)
        ax.fill_between(xs, mean - sd, mean + sd, alpha=0.15)
    ax.set_xlabel("round (centralised: epochs / local epochs)")
    ax.set_ylabel("validation Dice, all four modalities")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Validation Dice over rounds (mean ± sd over seeds)")
    fig.tight_layout()
    with atomic_path(bench / "curves.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    write_csv(bench / "curves.csv", rows or [{"arm": "", "round": "", "val_mean_dice": ""}])
    return bench / "curves.png"


def _headlines(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[str]:
    """Paired (same seed) differences in mean Dice, with their spread."""
    pairs = [("mstkd", "centralised", "federated vs centralised")]
    pairs += [("mstkd", "student", "MST-KDNet vs student-only baseline")]
    pairs += [("mstkd", a, f"full method vs {ARMS[a].label}") for a in ("no-mstkd", "no-dmld", "no-gsm")]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs FedAvg") for a in ("fedprox", "fedadam")]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs none") for a in ("dp-clip", "dp")]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs FedAvg with no hostile site") for a in results if ARMS[a].attack]
    lines = [
        "| Comparison | seeds | Δ mean Dice (points) | sd of Δ | every seed same sign | larger than the spread |",
        "|---|---:|---:|---:|:---:|:---:|",
    ]
    for a, b, text in pairs:
        if a not in results or b not in results:
            continue
        by_seed_a = dict(zip(seeds_of[a], (r["mean_dice"] for r in results[a]), strict=True))
        by_seed_b = dict(zip(seeds_of[b], (r["mean_dice"] for r in results[b]), strict=True))
        common = sorted(set(by_seed_a) & set(by_seed_b))
        if not common:
            continue
        delta = np.array([100 * (by_seed_a[s] - by_seed_b[s]) for s in common])
        mean, sd = _mean_sd(delta)
        same = bool(np.all(delta > 0) or np.all(delta < 0))
        larger = len(common) > 1 and abs(mean) > sd and same
        lines.append(
            f"| {text} | {len(common)} | {mean:+.2f} | {sd:.2f} | {'yes' if same else 'no'} | "
            f"{'yes' if larger else ('n/a (1 seed)' if len(common) == 1 else 'no')} |"
        )
    return lines


def _robustness_section(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[str]:
    """Per aggregator, the final mean Dice with no hostile site and with each attack, the damage paired by seed,
    and the final global model's norm (how far an attack pushed the weights)."""
    present = [
        name for name in ROBUST_STRATEGIES if any(a in results for a in (name, *(f"{name}+{k}" for k in ATTACK_LABELS)))
    ]
    attacks = [k for k in ATTACK_LABELS if any(ARMS[a].attack == k for a in results)]  # columns for the attacks run
    if not attacks or not present:
        return []
    lines = [
        "## Robustness: one hostile site",
        "",
        f"Site {HOSTILE + 1} (partition {HOSTILE}) sends a poisoned update in every round: "
        + "; ".join(f"`{k}`: {ATTACK_LABELS[k]}" for k in attacks)
        + " (`simulations/adversary.py`). Every poisoned reply is well-formed, so the server's checks pass it: only "
        "the aggregator stands between it and the global model. Mean Dice (%, 15 subsets, held-out test cases), "
        "mean ± sd over seeds; Δ = attacked minus the same aggregator without a hostile site, paired by seed; "
        "norm = L2 norm of the final global student + discriminator (`metrics.jsonl`: `model_norm`). "
        "Source: `summary.csv`.",
        "",
        "| Aggregator | no hostile site | " + " | ".join(f"{k}: Dice | {k}: Δ | {k}: norm" for k in attacks) + " |",
        "|---|---:|" + "---:|---:|---:|" * len(attacks),
    ]
    for name in present:
        label = ROBUST_STRATEGIES[name][0]
        honest = results.get(name)
        cells = [_fmt([r["mean_dice"] for r in honest], 100.0) if honest else "–"]
        for attack in attacks:
            runs = results.get(f"{name}+{attack}")
            if not runs:
                cells += ["–", "–", "–"]
                continue
            cells.append(_fmt([r["mean_dice"] for r in runs], 100.0))
            if honest:
                base = dict(zip(seeds_of[name], (r["mean_dice"] for r in honest), strict=True))
                pairs = [
                    (100 * (r["mean_dice"] - base[s]))
                    for s, r in zip(seeds_of[f"{name}+{attack}"], runs, strict=True)
                    if s in base
                ]
                cells.append(_fmt(pairs, 1.0) if pairs else "–")
            else:
                cells.append("–")
            norms = [r["model_norm"] for r in runs if r.get("model_norm") is not None]
            cells.append(f"{np.mean(norms):.3g}" if norms else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    norms = [r["model_norm"] for name in present if name in results for r in results[name] if r.get("model_norm")]
    if norms:
        lines += ["", f"Honest runs end with a model norm of {min(norms):.3g} to {max(norms):.3g}."]
    lines += [
        "",
        "Bulyan is not in the table: it needs at least 4 x f + 3 = 7 replies per round to tolerate one hostile "
        "site, and phantom-4 has four (`strategy='bulyan'` refuses to start with too few nodes).",
        "",
    ]
    return lines


def _collapse_section(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[str]:
    lines = [
        "## Collapse check",
        "",
        "A final model has collapsed when, under some modality subset, a region covers more than half of the "
        "brain or more than ten times its reference volume (means over the test cases). Largest share of the "
        "brain taken by any region under any subset, per seed. Source: `summary.csv` (`max_region_share`, "
        "`collapsed`).",
        "",
        "| Arm | largest region share per seed | collapsed runs |",
        "|---|---|---:|",
    ]
    for name, runs in results.items():
        shares = [
            f"seed {seed}: {100 * r['max_share']:.0f}% ({r['max_share_region']})" if r["max_share"] is not None else "–"
            for seed, r in zip(seeds_of[name], runs, strict=True)
        ]
        flagged = [seed for seed, r in zip(seeds_of[name], runs, strict=True) if r["collapsed"]]
        count = f"{len(flagged)} of {len(runs)}" + (f" (seeds {', '.join(map(str, flagged))})" if flagged else "")
        lines.append(f"| {ARMS[name].label} | {'; '.join(shares)} | {count} |")
    return lines + [""]


def write_report(bench: Path, scenario: Scenario, arms: Sequence[Arm], seeds: Sequence[int]) -> Path:
    """Rebuild every report file of ``bench`` from the finished runs; return the path of ``REPORT.md``."""
    tables = bench / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    local_epochs = float(scenario.run.get("local-epochs", 1.0))
    results: dict[str, list[dict]] = {}
    seeds_of: dict[str, list[int]] = {}
    for arm in arms:
        runs = _finished(bench, arm, seeds)
        if runs:
            results[arm.name] = [_run_numbers(arm, folder, done, local_epochs) for _, folder, done in runs]
            seeds_of[arm.name] = [seed for seed, _, _ in runs]
    meta = _json(bench / "bench.json") if (bench / "bench.json").is_file() else {}

    summary_rows = []
    for name, runs in results.items():
        for seed, run in zip(seeds_of[name], runs, strict=True):
            summary_rows.append(
                {
                    "arm": name,
                    "seed": seed,
                    "mean_dice": run["mean_dice"],
                    **{k: run[k] for k in CELLS},
                    "max_region_share": run["max_share"],
                    "collapsed": run["collapsed"],
                    "convergence_score": run.get("convergence"),
                    "simulated_hours": run.get("simulated_hours"),
                    "bytes_per_round": run["bytes_per_round"],
                    "bytes_total": run["bytes_total"],
                    "wall_seconds": run["seconds"],
                    "model_norm": run.get("model_norm"),
                    "skipped_rounds": run.get("skipped_rounds"),
                    "failed_replies": run.get("failed_replies"),
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
                    "sd": _mean_sd(values)[1] if values else None,
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
        lines += [
            "## Headline differences",
            "",
            "Paired by seed; Δ = first minus second, in Dice points (mean of ET, TC, WT over the 15 subsets). "
            "'Larger than the spread' means every seed agrees in sign and |mean Δ| exceeds the sd of Δ. "
            "Source: `summary.csv`.",
            "",
        ]
        lines += _headlines(results, seeds_of) + [""]
        lines += [
            "## Overview",
            "",
            "Source: `summary.csv` (one row per arm and seed), `<arm>/seed-<s>/done.json`.",
            "",
            "| Arm | seeds | mean Dice | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT | "
            "FeTS convergence score | MB per round | MB total | wall time (s) |",
            "|---|---:|" + "---:|" * 11,
        ]
        for name, runs in results.items():
            fed = ARMS[name].federated
            conv = _fmt([r["convergence"] for r in runs], 1.0, 3) if fed else "–"
            per_round = f"{np.mean([r['bytes_per_round'] for r in runs]) / 1e6:.1f}" if fed else "0"
            total = f"{np.mean([r['bytes_total'] for r in runs]) / 1e6:.1f}" if fed else "0"
            lines.append(
                f"| {ARMS[name].label} | {len(runs)} | {_fmt([r['mean_dice'] for r in runs], 100.0)} | "
                + " | ".join(_fmt([r[f"{g}_dice"] for r in runs], 100.0) for g in REGIONS)
                + " | "
                + " | ".join(_fmt([r[f"{g}_hd95"] for r in runs], 1.0, 2) for g in REGIONS)
                + f" | {conv} | {per_round} | {total} | {_fmt([r['seconds'] for r in runs], 1.0, 0)} |"
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
        lines += _robustness_section(results, seeds_of)
        lines += _collapse_section(results, seeds_of)
        ablation = _ablation_table(results, tables)
        if ablation:
            lines += [
                "## Ablation (layout of the paper's Table 5)",
                "",
                "Averages over the 15 subsets, mean ± sd over seeds. Source: `tables/ablation.csv`.",
                "",
                ablation,
                "",
            ]
        _curves(results, bench)
        lines += [
            "## Validation Dice over rounds",
            "",
            "Aggregated site-validation Dice with all four modalities after each round (centralised: the "
            "pooled validation cases after each epoch, placed at epoch / local epochs). Source: `curves.csv`.",
            "",
            "![validation Dice over rounds](curves.png)",
            "",
        ]
        lines += [
            "## Paper layout (Tables 1-4)",
            "",
            "Means over seeds. Source: `tables/<arm>.csv`.",
            "",
            "### Dice (%)",
            "",
            _paper_table(results, "dice", 100.0, 1),
            "",
            "### HD95 (mm)",
            "",
            _paper_table(results, "hd95", 1.0, 2),
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
                _arm_table(ARMS[name], runs, tables),
                "",
            ]
        machines = sorted({r["machine"] for runs in results.values() for r in runs})
        lines += ["## Where it ran", "", *[f"- {m}" for m in machines], ""]
    return write_text(bench / "REPORT.md", "\n".join(lines) + "\n")
