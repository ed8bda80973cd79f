"""Paired comparisons (simulations.stats): per-case scores, the two-way bootstrap and Holm's correction."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.stats import case_scores, format_p, holm, paired_bootstrap


def _row(case, subset, et, tc, wt):
    return {"case": case, "subset": subset, "ET_dice": et, "TC_dice": tc, "WT_dice": wt}


def test_a_case_scores_its_dice_averaged_over_regions_and_subsets():
    rows = [_row("a", "flair", 0.3, 0.6, 0.9), _row("a", "t1", 0.0, 0.0, 0.3), _row("b", "flair", 1, 1, 1)]
    rows.append(_row("b", "t1", 0.5, 0.5, 0.5))
    assert case_scores(rows) == pytest.approx({"a": (0.6 + 0.1) / 2, "b": 0.75})
    with pytest.raises(ValueError, match="different numbers of subsets"):
        case_scores(rows[:3])


def test_a_constant_difference_has_a_point_interval_and_the_smallest_p():
    first = {s: {c: 0.6 for c in "abcd"} for s in range(3)}
    second = {s: {c: 0.5 for c in "abcd"} for s in range(3)}
    paired = paired_bootstrap(first, second, resamples=2000)
    assert (paired.seeds, paired.cases) == (3, 4)
    assert (
        paired.mean == pytest.approx(10.0) and paired.low == pytest.approx(10.0) and paired.high == pytest.approx(10.0)
    )
    assert paired.p == pytest.approx(1 / 2000) and format_p(paired.p, 2000) == "< 0.0005"


def test_a_difference_of_pure_noise_has_an_interval_around_zero():
    rng = np.random.default_rng(0)
    first = {s: {f"c{i}": float(rng.normal(0.5, 0.1)) for i in range(40)} for s in range(5)}
    second = {s: {c: float(rng.normal(0.5, 0.1)) for c in first[s]} for s in range(5)}
    paired = paired_bootstrap(first, second)
    assert paired.low < 0 < paired.high and paired.p > 0.05
    # the interval is symmetric-ish around the observed mean and as wide as the case noise predicts:
    # sd of a case difference 0.1 * sqrt(2) / sqrt(5 seeds x 40 cases) = 1 point -> 95 % width about 4 points
    assert 2.0 < paired.high - paired.low < 6.0
    assert paired.low < paired.mean < paired.high


def test_only_seeds_and_cases_that_both_arms_have_are_paired():
    first = {0: {"a": 0.9, "b": 0.9, "c": 0.1}, 1: {"a": 0.9, "b": 0.9}}
    second = {0: {"a": 0.5, "b": 0.5}, 1: {"a": 0.5, "b": 0.5}, 2: {"a": 0.0, "b": 0.0}}
    paired = paired_bootstrap(first, second)
    assert (paired.seeds, paired.cases) == (2, 2) and paired.mean == pytest.approx(40.0)
    assert paired_bootstrap(first, {5: {"a": 0.1}}) is None


def test_holm_adjusts_as_worked_out_by_hand():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
