"""Paired comparisons of two arms over seeds x test cases: a crossed random-effects interval and Holm's correction.

Each finished run scores the same held-out cases, so two arms can be paired on (seed, case): Δ[s, c] is the
difference of the two runs of seed ``s`` on case ``c``, each case's score being its Dice averaged over the
three regions and the 15 modality subsets (the mean of those per-case scores is the run's mean Dice).

The interval treats seeds and test cases as two crossed random samples, Δ[s, c] = μ + a_s + b_c + e_sc, and
estimates the variance of the mean of Δ from the two-way analysis of variance: with S seeds, C cases and the mean
squares MS_seed, MS_case of the seed and case means, Var(mean) <= (MS_seed + MS_case) / (S C). The residual mean
square is not subtracted, which makes the estimate conservative (too wide by at most σ_e² / (S C)) and never
negative. The interval is mean ± t · sqrt(Var) with Satterthwaite's degrees of freedom, and p is the two-sided
t-test of mean = 0. With three seeds the seed term usually dominates and has two degrees of freedom: the
interval is then about as wide as a t-interval over the seeds' mean differences, as it should be; the test cases
narrow it only where the seeds agree. Fewer than two seeds or two cases give no interval.

Holm's step-down correction (Holm 1979) controls the family-wise error rate over all comparisons of a report.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mstkd.data.labels import REGIONS


def case_scores(cases: Sequence[Mapping], subsets: Collection[str] | None = None) -> dict[str, float]:
    """Per case, the Dice averaged over regions and subsets (all, or those named in ``subsets``), from an
    evaluation's per-(case, subset) rows."""
    sums: dict[str, list[float]] = {}
    for row in cases:
        if subsets is not None and row["subset"] not in subsets:
            continue
        sums.setdefault(str(row["case"]), []).append(float(np.mean([row[f"{r}_dice"] for r in REGIONS])))
    counts = {len(v) for v in sums.values()}
    if len(counts) > 1:
        raise ValueError(f"cases were scored under different numbers of subsets: {sorted(counts)}")
    return {case: float(np.mean(v)) for case, v in sums.items()}


@dataclass(frozen=True)
class Paired:
    """One paired comparison, in Dice points (first minus second)."""

    seeds: int
    cases: int
    mean: float
    low: float  # NaN: too few seeds or cases for an interval
    high: float
    p: float
    p_holm: float = float("nan")

    @property
    def significant(self) -> bool:
        """Whether the difference holds after Holm's correction at the 5 % level (never without an interval)."""
        return bool(self.p_holm < 0.05)


def shared_cells(
    first: Mapping[int, Mapping[str, float]], second: Mapping[int, Mapping[str, float]]
) -> tuple[list[int], list[str]]:
    """The seeds both arms have, and the cases every one of those runs scored: what a comparison pairs."""
    seeds = sorted(set(first) & set(second))
    cases = sorted(set.intersection(*(set(first[s]) & set(second[s]) for s in seeds))) if seeds else []
    return seeds, cases


def paired_interval(
    first: Mapping[int, Mapping[str, float]], second: Mapping[int, Mapping[str, float]], level: float = 0.95
) -> Paired | None:
    """The mean paired difference (``{seed: {case: score}}`` for each arm), in points, with its crossed
    random-effects interval and p-value (NaN below two seeds or two cases); ``None`` when the arms share no seed
    or no case. Only seeds both arms have, and cases every one of those runs scored, are paired."""
    from scipy import stats

    seeds, cases = shared_cells(first, second)
    if not seeds or not cases:
        return None
    delta = 100.0 * np.array([[first[s][c] - second[s][c] for c in cases] for s in seeds])
    n_s, n_c = delta.shape
    mean = float(delta.mean())
    if n_s < 2 or n_c < 2:
        return Paired(n_s, n_c, mean, float("nan"), float("nan"), float("nan"))
    ms_seed = n_c * float(np.var(delta.mean(axis=1), ddof=1))
    ms_case = n_s * float(np.var(delta.mean(axis=0), ddof=1))
    var = (ms_seed + ms_case) / (n_s * n_c)
    if var <= 0:  # every seed and every case differ by the same amount
        p = 1.0 if mean == 0 else 0.0
        return Paired(n_s, n_c, mean, mean, mean, p)
    df = (ms_seed + ms_case) ** 2 / (ms_seed**2 / (n_s - 1) + ms_case**2 / (n_c - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * var**0.5
    p = float(2 * stats.t.sf(abs(mean) / var**0.5, df))
    return Paired(n_s, n_c, mean, mean - half, mean + half, p)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given; a NaN (no test) stays NaN and does not count in the family."""
    tested = [i for i, p in enumerate(ps) if not math.isnan(p)]
    adjusted = [float("nan")] * len(ps)
    running = 0.0
    for rank, i in enumerate(sorted(tested, key=lambda i: ps[i])):
        running = max(running, min(1.0, (len(tested) - rank) * float(ps[i])))
        adjusted[i] = running
    return adjusted


def format_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.0001" if p < 1e-4 else (f"{p:.4f}" if p < 0.01 else f"{p:.3f}")
