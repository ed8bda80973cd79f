"""The report's tables and the sections of ``REPORT.md`` that compare arms, built from the per-run
numbers :mod:`simulations.runs` reads (one dict per finished run: its 15-subset table, averages and logs).

- ``tables/<arm>.csv|json|md``: the 15 subsets + average, mean and standard deviation over seeds;
- the layout of the paper's Tables 1-4 and, in ``tables/ablation.csv|md``, of its Table 5;
- the headline differences, the robustness and the collapse sections of ``REPORT.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mstkd.atomic import write_csv, write_text
from mstkd.data.labels import REGIONS
from mstkd.modalities import SUBSETS
from mstkd.runconfig import DPMode, RunConfig
from simulations.scenario import ABLATIONS, ARMS, ATTACK_LABELS, HOSTILE, ROBUST_STRATEGIES, Arm

ROW_NAMES = [s.display_name for s in SUBSETS] + ["Average"]
CELLS = [f"{r}_dice" for r in REGIONS] + [f"{r}_hd95" for r in REGIONS]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, sd = mean_sd([v * scale for v in values])
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def arm_table(arm: Arm, runs: list[dict], out: Path) -> str:
    """``tables/<arm>.*``: 15 subsets + average, mean and sd over seeds; returns the Markdown."""
    rows, lines = [], ["| Subset | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT |", "|---|" + "---:|" * 6]
    for i, name in enumerate(ROW_NAMES):
        row: dict[str, Any] = {"subset": name, "seeds": len(runs)}
        cells = []
        for key in CELLS:
            values = [result["table"][i][key] for result in runs]
            row[f"{key}_mean"], row[f"{key}_sd"] = mean_sd(values)
            cells.append(fmt(values, 100.0) if key.endswith("dice") else fmt(values, 1.0, 2))
        rows.append(row)
        label = f"**{name}**" if name == "Average" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    write_csv(out / f"{arm.name}.csv", rows)
    write_text(out / f"{arm.name}.json", json.dumps({"arm": arm.name, "label": arm.label, "rows": rows}, indent=1))
    md = "\n".join(lines)
    write_text(out / f"{arm.name}.md", md + "\n")
    return md


def paper_table(results: dict[str, list[dict]], metric: str, scale: float, digits: int) -> str:
    """Tables 1-4 layout: a row per region and arm, a column per subset, then the average; last, the mean of the
    three regions (its average is the overview's mean), which shows in which subsets two arms differ."""
    head = "| Region | Arm | " + " | ".join(ROW_NAMES[:-1]) + " | Avg. |"
    lines = [head, "|---|---|" + "---:|" * len(ROW_NAMES)]
    for region in [*reversed(REGIONS), "Mean"]:  # the paper lists WT, TC, ET
        keys = [f"{r}_{metric}" for r in (REGIONS if region == "Mean" else [region])]
        for j, (name, runs) in enumerate(results.items()):
            cells = [
                f"{np.mean([result['table'][i][k] for result in runs for k in keys]) * scale:.{digits}f}"
                for i in range(len(ROW_NAMES))
            ]
            lines.append(f"| {region if j == 0 else ''} | {ARMS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(results: dict[str, list[dict]], out: Path) -> str | None:
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
                values = [result[f"{region}_{metric}"] for result in runs]
                row[f"{region}_{metric}_mean"], row[f"{region}_{metric}_sd"] = mean_sd(values)
                cells.append(fmt(values, scale, digits))
        rows.append(row)
        label = f"**{row['label']}**" if name == "mstkd" else row["label"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    write_csv(out / "ablation.csv", rows)
    md = "\n".join(lines)
    write_text(out / "ablation.md", md + "\n")
    return md


def robustness_section(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[str]:
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
        cells = [fmt([r["mean_dice"] for r in honest], 100.0) if honest else "–"]
        for attack in attacks:
            runs = results.get(f"{name}+{attack}")
            if not runs:
                cells += ["–", "–", "–"]
                continue
            cells.append(fmt([r["mean_dice"] for r in runs], 100.0))
            if honest:
                base = dict(zip(seeds_of[name], (r["mean_dice"] for r in honest), strict=True))
                pairs = [
                    (100 * (r["mean_dice"] - base[s]))
                    for s, r in zip(seeds_of[f"{name}+{attack}"], runs, strict=True)
                    if s in base
                ]
                cells.append(fmt(pairs, 1.0) if pairs else "–")
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


def privacy_section(results: dict[str, list[dict]]) -> list[str]:
    """Per differentially private arm: its Dice, the privacy spent (epsilon at delta, Flower's RDP accountant) and
    the clipping norm it ended with."""
    configs = {name: RunConfig.parse(ARMS[name].run) for name in results}
    private = [name for name in results if configs[name].dp != DPMode.OFF]
    if not private:
        return []
    lines = [
        "## Differential privacy",
        "",
        "Mean Dice (%, 15 subsets, held-out test cases) and the privacy spent by the final release: epsilon at the "
        "run's delta (client level, Flower's RDP accountant; ∞ without noise), and the clipping norm of the last "
        "round (adaptive clipping moves it toward the chosen quantile of the update norms). An epsilon above about "
        "10 gives no meaningful formal guarantee: such an arm measures what clipping and noise cost, not a private "
        "configuration. Source: `summary.csv`, `runs/<arm>/seed-<s>/metrics.jsonl` (`privacy`).",
        "",
        "| Arm | mean Dice | clipping | epsilon | delta | last clipping norm |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name in private:
        runs, config = results[name], configs[name]
        eps = [r["epsilon"] for r in runs if r.get("epsilon") is not None]
        clips = [r["clip_last"] for r in runs if r.get("clip_last") is not None]
        delta = next((r["delta"] for r in runs if r.get("delta") is not None), None)
        lines.append(
            f"| {ARMS[name].label} | {fmt([r['mean_dice'] for r in runs], 100.0)} | "
            f"{config.dp_clipping} from {config.dp_clip} | {f'{np.mean(eps):.3g}' if eps else '∞'} | "
            f"{f'{delta:g}' if delta is not None else '–'} | {f'{np.mean(clips):.3g}' if clips else '–'} |"
        )
    return lines + [""]


def collapse_section(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[str]:
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
