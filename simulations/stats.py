"""Paired comparisons of two arms over seeds x test cases: a two-way bootstrap and Holm's correction.

Each finished run scores the same held-out cases, so two arms can be paired on (seed, case): Δ[s, c] is the
difference of the two runs of seed ``s`` on case ``c``, each case's score being its Dice averaged over the
three regions and the 15 modality subsets (the mean of those per-case scores is the run's mean Dice).

The interval resamples both sources of variation at once: seeds with replacement and, independently, cases
with replacement, and takes the mean of Δ over the drawn seeds x drawn cases (a two-way, or "pigeonhole",
bootstrap; Owen 2007). Percentile interval; the two-sided p-value is twice the smaller share of resampled
means on either side of 0. With few seeds the seed component is estimated coarsely (three seeds have ten
distinct resamples), so the interval is, if anything, too narrow in that direction; the report states the
number of seeds beside every interval.

Holm's step-down correction (Holm 1979) controls the family-wise error rate over all comparisons of a report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mstkd.data.labels import REGIONS

RESAMPLES = 10_000
SEED = 20240917  # fixed, so a report rebuilt from the same files prints the same intervals


def case_scores(cases: Sequence[Mapping]) -> dict[str, float]:
    """Per case, the Dice averaged over regions and subsets, from an evaluation's per-(case, subset) rows."""
    sums: dict[str, list[float]] = {}
    for row in cases:
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
    low: float
    high: float
    p: float
    p_holm: float = float("nan")

    @property
    def significant(self) -> bool:
        """Whether the difference holds after Holm's correction at the 5 % level."""
        return bool(self.p_holm < 0.05)


def paired_bootstrap(
    first: Mapping[int, Mapping[str, float]],
    second: Mapping[int, Mapping[str, float]],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Paired | None:
    """The two-way bootstrap of the mean paired difference (``{seed: {case: score}}`` for each arm), in points;
    ``None`` when the arms share no seed. Only cases scored in both runs of a seed are paired, and only cases
    every shared seed has."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    cases = sorted(set.intersection(*(set(first[s]) & set(second[s]) for s in seeds)))
    if not cases:
        return None
    delta = 100.0 * np.array([[first[s][c] - second[s][c] for c in cases] for s in seeds])
    rng = np.random.default_rng(seed)
    n_s, n_c = delta.shape
    w_s = rng.multinomial(n_s, np.full(n_s, 1.0 / n_s), size=resamples)  # how often each seed is drawn
    w_c = rng.multinomial(n_c, np.full(n_c, 1.0 / n_c), size=resamples)
    means = np.einsum("rs,sc,rc->r", w_s, delta, w_c) / (n_s * n_c)
    low, high = np.percentile(means, [2.5, 97.5])
    p = min(1.0, 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return Paired(n_s, n_c, float(delta.mean()), float(low), float(high), max(p, 1.0 / resamples))


def holm(ps: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    m = len(ps)
    order = np.argsort(ps, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(ps[i])))
        adjusted[i] = running
    return adjusted.tolist()


def format_p(p: float, resamples: int = RESAMPLES) -> str:
    return f"< {1.0 / resamples:g}" if p <= 1.0 / resamples else (f"{p:.4f}" if p < 0.01 else f"{p:.3f}")
