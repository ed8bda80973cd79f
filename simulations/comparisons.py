"""The report's sections that compare arms with intervals, and the convergence check every arm must meet.

Every comparison pairs two arms on (seed, test case) and gives the mean difference in Dice points, a 95 %
crossed random-effects interval over seeds and cases and a p-value, Holm-corrected over every comparison of the
report that has one (:mod:`simulations.stats`). The sections:

- **headline**: federated vs centralised, MST-KDNet vs its student-only baseline;
- **per term**: the full method against each arm that removes one loss term, with the term's measured
  gradient scale where the benchmark folder holds ``grad_scales.json`` (``benchmarks/grad_scales.py --json``);
- **mechanism groups**: the paper's Table 5 groups (MS-TKD, DMLD, GSM);
- **other**: strategies, privacy and hostile sites against plain FedAvg;
- **against**: where sites lack modalities (``compare-with``), MST-KDNet's advantage over student-only here minus
  the same advantage in the scenario whose sites have every modality, on the same test cases: over all subsets, and
  over the subsets that as many sites can train.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mstkd.modalities import SUBSETS
from simulations.scenario import (
    ARMS,
    LONGER_ARMS,
    ROBUST_STRATEGIES,
    STRATEGY_ARMS,
    TERM_ARMS,
    TERM_GROUPS,
    Scenario,
)
from simulations.stats import case_scores, format_p, holm, paired_interval, shared_cells
from simulations.tables import fmt

CONVERGENCE_WINDOW = 3
"""Rounds (centralised: validation points) per window of the convergence check."""
CONVERGENCE_TOLERANCE = 0.01
"""Largest rise of the windowed mean validation Dice for a run to count as levelled off."""

SECTIONS = {
    "headline": "Headline comparisons",
    "term": "One arm per loss term",
    "group": "Mechanism groups (the paper's Table 5)",
    "other": "Other comparisons",
    "against": "Does the advantage grow where sites lack modalities?",
}
ADVANTAGE = ("mstkd", "student")
"""The pair whose difference the ``against`` section compares between two scenarios."""


def _pairs(results: dict[str, list[dict]]) -> list[tuple[str, str, str, str]]:
    """``(first, second, text, section)`` for every comparison whose arms have finished runs."""
    pairs = [
        ("mstkd", "centralised", "federated vs centralised", "headline"),
        ("mstkd", "student", "MST-KDNet vs student-only baseline", "headline"),
    ]
    pairs += [("mstkd", a, f"full method vs {ARMS[a].label}", "term") for a in TERM_ARMS]
    pairs += [("mstkd", a, f"full method vs {ARMS[a].label}", "group") for a in TERM_GROUPS]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs FedAvg", "other") for a in STRATEGY_ARMS]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs 20 rounds", "other") for a in LONGER_ARMS]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs none", "other") for a in ("dp-clip", "dp", "dp-adaptive")]
    pairs += [("dp-adaptive", "dp", "adaptive vs fixed clipping (DP)", "other")]
    attacked = [a for a in results if ARMS[a].attack]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs FedAvg with no hostile site", "other") for a in attacked]
    same = [(a, f"mstkd+{ARMS[a].attack}") for a in attacked if not a.startswith("mstkd+")]  # what an aggregator buys
    pairs += [(a, b, f"{ARMS[a].label} vs FedAvg under the same attack", "other") for a, b in same]
    robust = [a for a in ROBUST_STRATEGIES if a != "mstkd"]
    pairs += [(a, "mstkd", f"{ARMS[a].label} vs FedAvg, every site honest", "other") for a in robust]
    return [p for p in pairs if p[0] in results and p[1] in results]


def compare(results: dict[str, list[dict]], seeds_of: dict[str, list[int]], more: Sequence[dict] = ()) -> list[dict]:
    """Every comparison the report makes, with its interval and its Holm-adjusted p-value (one family, which
    includes the comparisons of ``more``: :func:`against`'s)."""
    rows = []
    for a, b, text, section in _pairs(results):
        by_seed = [
            {seed: result["cases"] for seed, result in zip(seeds_of[arm], results[arm], strict=True)} for arm in (a, b)
        ]
        paired = paired_interval(*by_seed)
        if paired is not None:
            rows.append({"first": a, "second": b, "text": text, "section": section, "paired": paired})
    rows += more
    for row, p in zip(rows, holm([r["paired"].p for r in rows]), strict=True):
        row["paired"] = replace(row["paired"], p_holm=p)
    return rows


@dataclass(frozen=True)
class Reference:
    """The scenario an ``against`` section compares with: its published runs of the :data:`ADVANTAGE` arms
    (``{arm: [{"case_rows": ...}]}``) and their seeds."""

    name: str
    folder: str  # where its runs were read, as the report names it
    runs: dict[str, list[dict]]
    seeds_of: dict[str, list[int]]


def _advantage(results: dict[str, list[dict]], seeds_of: dict[str, list[int]], subsets=None) -> dict:
    """``{seed: {case: first - second}}`` for the :data:`ADVANTAGE` pair, over ``subsets`` (None: all 15)."""
    first, second = (
        {s: case_scores(r["case_rows"], subsets) for s, r in zip(seeds_of[a], results[a], strict=True)}
        for a in ADVANTAGE
    )
    return {s: {c: first[s][c] - second[s][c] for c in first[s] if c in second[s]} for s in first if s in second}


def subset_groups(scenario: Scenario) -> list[tuple[str, str, list[str]]]:
    """``(key, text, subset names)``: all 15 subsets, then, where sites lack modalities, the subsets that each
    number of the scenario's sites can train (most sites first)."""
    training = scenario.sites_training()
    groups = [("all", "all 15 subsets", list(training))]
    counts = sorted(set(training.values()), reverse=True)
    if len(counts) > 1:
        for k in counts:
            names = [n for n, v in training.items() if v == k]
            shown = ", ".join(s.display_name for s in SUBSETS if s.name in names)
            text = f"the {len(names)} subsets {k} of {scenario.num_sites} sites train ({shown})"
            groups.append((f"{k}-sites", text, names))
    return groups


def _both(results: dict[str, list[dict]], reference: Reference | None) -> bool:
    return reference is not None and all(a in results and a in reference.runs for a in ADVANTAGE)


def against(
    results: dict[str, list[dict]], seeds_of: dict[str, list[int]], reference: Reference | None, scenario: Scenario
) -> list[dict]:
    """MST-KDNet minus student-only here minus the same difference in ``reference``, paired by seed and test
    case, over each group of :func:`subset_groups`; none unless both scenarios have both arms."""
    if not _both(results, reference):
        return []
    pair = "-".join(ADVANTAGE)
    rows = []
    for key, text, names in subset_groups(scenario):
        here = _advantage(results, seeds_of, names)
        paired = paired_interval(here, _advantage(reference.runs, reference.seeds_of, names))
        if paired is not None:
            rows.append(
                {
                    "first": pair,
                    "second": f"{reference.name}:{pair}",
                    "subsets": key,
                    "text": f"MST-KDNet − student here vs in `{reference.name}`: {text}",
                    "section": "against",
                    "paired": paired,
                }
            )
    return rows


def against_text(
    results: dict[str, list[dict]], seeds_of: dict[str, list[int]], reference: Reference | None, scenario: Scenario
) -> tuple[list[str], list[str]]:
    """Markdown around the :func:`against` rows: what they pair (above them), and per subset MST-KDNet's advantage
    over student-only here, in the reference and their difference (below them; means over the same seeds and
    cases as the rows, without an interval)."""
    if not _both(results, reference):
        return [], []
    here_all, there_all = _advantage(results, seeds_of), _advantage(reference.runs, reference.seeds_of)
    seeds, cases = shared_cells(here_all, there_all)
    here_seeds, there_seeds = sorted(here_all), sorted(there_all)  # the seeds each scenario has both arms of
    above = [
        f"Δ = MST-KDNet − student-only here, minus the same difference in `{reference.name}`, whose sites have "
        "every modality, paired by seed and by test case (the same held-out cases): positive where the "
        "distillation gains more when sites lack modalities. Each row averages a case's Dice over the subsets it "
        f"names; the rows are in the family Holm corrects over. `{reference.name}`'s runs are read from "
        f"`{reference.folder}` (seeds {_seeds(there_seeds)}); this scenario has seeds {_seeds(here_seeds)}; "
        f"paired: {_seeds(seeds)}.",
        "",
    ]
    training = scenario.sites_training()
    below = [
        f"Per subset: the mean of MST-KDNet − student-only over those seeds and the {len(cases)} test cases, here "
        f"and in `{reference.name}`, in Dice points (mean of ET, TC and WT), and how many of the "
        f"{scenario.num_sites} sites here can train the subset. No interval per subset: the table shows where "
        "the difference lies; the rows above test it.",
        "",
        f"| Subset | sites that train it | here | in `{reference.name}` | difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for subset in SUBSETS:
        here = _advantage(results, seeds_of, [subset.name])
        there = _advantage(reference.runs, reference.seeds_of, [subset.name])
        mean_here, mean_there = (100 * float(np.mean([d[s][c] for s in seeds for c in cases])) for d in (here, there))
        below.append(
            f"| {subset.display_name} | {training[subset.name]} | {mean_here:+.2f} | {mean_there:+.2f} | "
            f"{mean_here - mean_there:+.2f} |"
        )
    return above, below + [""]


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds)) or "none"


def comparison_rows(rows: list[dict]) -> list[dict]:
    """The comparisons as flat records (``comparisons.csv``)."""
    return [
        {
            "section": r["section"],
            "first": r["first"],
            "second": r["second"],
            "subsets": r.get("subsets", "all"),
            "seeds": r["paired"].seeds,
            "cases": r["paired"].cases,
            "delta_points": r["paired"].mean,
            "ci_low": r["paired"].low,
            "ci_high": r["paired"].high,
            "p": r["paired"].p,
            "p_holm": r["paired"].p_holm,
            "significant": r["paired"].significant,
        }
        for r in rows
    ]


def _grad_scales(bench: Path, model: str) -> tuple[dict[str, float], int]:
    """The per-term gradient scales of ``grad_scales.json`` after its training steps, if measured on ``model``."""
    path = bench / "grad_scales.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    return (record.get("after", {}), int(record.get("steps", 0))) if record.get("preset") == model else ({}, 0)


def _interval(p) -> str:
    return "n/a" if np.isnan(p.low) else f"[{p.low:+.2f}, {p.high:+.2f}]"


def comparison_sections(
    rows: list[dict], bench: Path, model: str, against_lines: tuple[list[str], list[str]] = ([], [])
) -> list[str]:
    """Markdown for every section that has comparisons (``model``: the preset the arms trained, for the
    gradient scales; ``against_lines``: :func:`against_text`'s, shown above and below the ``against`` rows)."""
    if not rows:
        return []
    tested = sum(not np.isnan(r["paired"].p) for r in rows)
    lines = [
        "## Comparisons",
        "",
        "Δ = first minus second, in Dice points (per test case: the mean of ET, TC and WT over the 15 subsets), "
        "paired by seed and test case. 95 % CI: seeds and test cases as two crossed random samples; the variance "
        "of the mean difference from the two-way analysis of variance (seed and case mean squares, residual not "
        "subtracted: conservative), Satterthwaite's degrees of freedom, t-interval (`simulations/stats.py`). With "
        "few seeds the seed term dominates: the interval is about as wide as one over the seeds' mean "
        f"differences. p: the two-sided t-test; p (Holm): Holm-corrected over the {tested} of this report's "
        f"{len(rows)} comparisons that have a p. A difference holds when p (Holm) < 0.05; n/a: fewer than two "
        "seeds or two test cases. Source: `comparisons.csv`, built from each run's per-case scores "
        "(`runs/<arm>/seed-<s>/eval/*.json`).",
        "",
    ]
    scales, steps = _grad_scales(bench, model)
    term_of = {arm: key for arm, (_, key) in TERM_ARMS.items()}
    for section, title in SECTIONS.items():
        these = [r for r in rows if r["section"] == section]
        if not these:
            continue
        extra = section == "term" and bool(scales)
        lines += [f"### {title}", ""]
        if extra:
            lines += [
                "Gradient scale: the L2 norm of the term's gradient on the student over that of the student's "
                f"segmentation loss, after {steps} training steps of `{model}`, at the term's configured weight "
                "(`grad_scales.json`, from `benchmarks/grad_scales.py`). A term whose scale is far below 10⁻² "
                "barely moves the student at this weight; its arm measures little more than the seed.",
                "",
            ]
        if section == "against":
            lines += against_lines[0]
        head = "| Comparison | seeds × cases | Δ (points) | 95 % CI | p | p (Holm) | holds |"
        lines += [head + " gradient scale |" if extra else head, "|---|---:|---:|---|---:|---:|:---:|"]
        lines[-1] += "---:|" if extra else ""
        for r in these:
            p = r["paired"]
            holds = "n/a" if np.isnan(p.p) else ("yes" if p.significant else "no")
            cells = (
                f"| {r['text']} | {p.seeds} × {p.cases} | {p.mean:+.2f} | {_interval(p)} | "
                f"{format_p(p.p)} | {format_p(p.p_holm)} | {holds} |"
            )
            if extra:
                key = {"consistency_max": "consistency"}.get(term_of[r["second"]], term_of[r["second"]])
                scale = scales.get(key)
                cells += f" {scale:.2g} |" if scale is not None else " – |"
            lines.append(cells)
        lines.append("")
        if section == "against":
            lines += against_lines[1]
    return lines


def _values(curve: list[tuple[float, float | None]]) -> list[float]:
    return [v for _, v in curve if v is not None]


def convergence(curve: list[tuple[float, float | None]]) -> float | None:
    """The trend at a curve's end: the mean validation Dice of its last :data:`CONVERGENCE_WINDOW` points minus that
    of the window before (positive: still rising). Windows, not single rounds, because a site-validation Dice over a
    few cases moves by a point or two from one round to the next even where the model has stopped improving."""
    values = _values(curve)
    if len(values) < 2 * CONVERGENCE_WINDOW:
        return None
    last, before = values[-CONVERGENCE_WINDOW:], values[-2 * CONVERGENCE_WINDOW : -CONVERGENCE_WINDOW]
    return float(np.mean(last) - np.mean(before))


def convergence_section(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[str]:
    n = CONVERGENCE_WINDOW
    lines = [
        "## Convergence",
        "",
        f"An arm has levelled off when the mean over its seeds of each run's trend is at most "
        f"{100 * CONVERGENCE_TOLERANCE:.0f} point, a run's trend being the mean of its aggregated site-validation "
        f"Dice (all four modalities) over its last {n} rounds minus that over the {n} rounds before (centralised: its "
        f"last {2 * n} validation points): it is no longer rising, so a difference between arms is not one of speed. "
        "A falling end counts as levelled off: it is past its peak, not still rising. Windows and the mean over "
        "seeds, not single rounds or single runs: a validation Dice over a few cases moves by a point or two from "
        "round to round even once the model has stopped improving, so one run's trend has a spread of about the "
        "tolerance itself, and the mean over n seeds cuts it by √n. The check is coarse for the same reason: it "
        "catches an arm still rising by a few points per window, not a slow drift. Each run's own trend is shown "
        "beside it. Source: `curves.csv`, `summary.csv` (`val_trend_last`: a run's trend, positive when still "
        "rising).",
        "",
        "| Arm | arm's trend (points) | levelled off | trend per seed (points) | final validation Dice |",
        "|---|---:|:---:|---|---:|",
    ]
    failing, unjudged = [], []
    for name, runs in results.items():
        trends = [convergence(r["curve"]) for r in runs]
        judged = [t for t in trends if t is not None]
        trend = float(np.mean(judged)) if judged else None
        finals = [values[-1] for values in (_values(r["curve"]) for r in runs) if values]
        if trend is None:
            verdict = "–"
            unjudged.append(ARMS[name].label)
        elif trend <= CONVERGENCE_TOLERANCE:
            verdict = "yes"
        else:
            verdict = "**no**"
            failing.append(f"{ARMS[name].label} ({100 * trend:+.3f} points)")  # 3 decimals: +1.004 reads past 1
        per_seed = ", ".join(
            f"{seed}: " + ("–" if t is None else f"{100 * t:+.1f}")
            for seed, t in zip(seeds_of[name], trends, strict=True)
        )
        final = f"{100 * np.mean(finals):.1f}" if finals else "–"
        shown = "–" if trend is None else f"{100 * trend:+.2f}"
        lines.append(f"| {ARMS[name].label} | {shown} | {verdict} | {per_seed} | {final} |")
    lines.append("")
    if failing:
        lines.append(f"**Not levelled off**: {'; '.join(failing)}. Their comparisons may reflect speed, not a ceiling.")
    if unjudged:
        lines.append(f"**Too short to judge** (fewer than {2 * n} validation points): {'; '.join(unjudged)}.")
    if not failing and not unjudged:
        lines.append("Every arm meets the criterion.")
    return lines + [""]


def _final_validation(result: dict) -> float | None:
    values = _values(result["curve"])[-CONVERGENCE_WINDOW:]
    return float(np.mean(values)) if values else None


def validation_section(results: dict[str, list[dict]], seeds_of: dict[str, list[int]]) -> list[str]:
    """How the strategies and local-epoch counts compare on the sites' validation cases, which is what one of them
    is chosen on (the test comparisons above are for reporting)."""
    from scipy import stats

    present = [a for a in ("mstkd", *STRATEGY_ARMS, *LONGER_ARMS) if a in results]
    if "mstkd" not in present or len(present) < 2:
        return []
    base = {s: _final_validation(r) for s, r in zip(seeds_of["mstkd"], results["mstkd"], strict=True)}
    lines = [
        "## Choosing on validation",
        "",
        f"Final validation Dice: the mean aggregated site-validation Dice (all four modalities) over the last "
        f"{CONVERGENCE_WINDOW} rounds, mean ± sd over seeds; Δ against FedAvg with one local epoch per round, paired "
        "by seed, with a t-interval over seeds. Every arm trains the same local epochs in all, except where its label "
        "says it trains longer. The choice is made here, on validation; the held-out comparisons above report it. "
        "Source: `curves.csv`.",
        "",
        "| Arm | seeds | final validation Dice | Δ vs FedAvg (points) | 95 % CI |",
        "|---|---:|---:|---:|---|",
    ]
    for name in present:
        finals = {s: _final_validation(r) for s, r in zip(seeds_of[name], results[name], strict=True)}
        values = [v for v in finals.values() if v is not None]
        cells = [fmt(values, 100.0) if values else "–", "–", "–"]
        deltas = [100 * (finals[s] - base[s]) for s in finals if base.get(s) is not None and finals[s] is not None]
        if name != "mstkd" and deltas:
            mean = float(np.mean(deltas))
            cells[1] = f"{mean:+.2f}"
            if len(deltas) > 1:
                half = float(stats.t.ppf(0.975, len(deltas) - 1)) * float(np.std(deltas, ddof=1)) / len(deltas) ** 0.5
                cells[2] = f"[{mean - half:+.2f}, {mean + half:+.2f}]"
        lines.append(f"| {ARMS[name].label} | {len(values)} | " + " | ".join(cells) + " |")
    return lines + [""]
