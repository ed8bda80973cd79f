"""Paired comparisons (simulations.stats): per-case scores, the crossed random-effects interval and Holm's
correction."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.stats import case_scores, format_p, holm, paired_interval


def _row(case, subset, et, tc, wt):
    return {"case": case, "subset": subset, "ET_dice": et, "TC_dice": tc, "WT_dice": wt}


def test_a_case_scores_its_dice_averaged_over_regions_and_subsets():
    rows = [_row("a", "flair", 0.3, 0.6, 0.9), _row("a", "t1", 0.0, 0.0, 0.3), _row("b", "flair", 1, 1, 1)]
    rows.append(_row("b", "t1", 0.5, 0.5, 0.5))
    assert case_scores(rows) == pytest.approx({"a": (0.6 + 0.1) / 2, "b": 0.75})
    with pytest.raises(ValueError, match="different numbers of subsets"):
        case_scores(rows[:3])


def test_a_constant_difference_has_a_point_interval():
    first = {s: {c: 0.6 for c in "abcd"} for s in range(3)}
    second = {s: {c: 0.5 for c in "abcd"} for s in range(3)}
    paired = paired_interval(first, second)
    assert (paired.seeds, paired.cases) == (3, 4)
    assert (
        paired.mean == pytest.approx(10.0) and paired.low == pytest.approx(10.0) and paired.high == pytest.approx(10.0)
    )
    assert paired.p == 0.0 and format_p(paired.p) == "< 0.0001"


def test_with_three_seeds_the_interval_is_as_wide_as_the_seeds_disagree():
    # seeds that all favour the first arm, by 0.1, 3 and 6 points, each the same on every one of 32 cases:
    # the cases add nothing, and the interval is the t-interval over three seed means (t(2) = 4.303)
    seeds = {0: 0.001, 1: 0.03, 2: 0.06}
    first = {s: {f"c{i}": 0.5 + d for i in range(32)} for s, d in seeds.items()}
    second = {s: {f"c{i}": 0.5 for i in range(32)} for s in seeds}
    paired = paired_interval(first, second)
    means = np.array([0.1, 3.0, 6.0])
    half = 4.302652729911275 * means.std(ddof=1) / np.sqrt(3)
    assert paired.mean == pytest.approx(means.mean())
    assert (paired.low, paired.high) == pytest.approx((means.mean() - half, means.mean() + half))
    assert paired.low < 0 < paired.high and paired.p > 0.1  # every seed the same sign is not enough


def test_a_difference_of_pure_case_noise_has_an_interval_around_zero_as_wide_as_the_noise():
    rng = np.random.default_rng(0)
    first = {s: {f"c{i}": float(rng.normal(0.5, 0.1)) for i in range(40)} for s in range(5)}
    second = {s: {c: float(rng.normal(0.5, 0.1)) for c in first[s]} for s in range(5)}
    paired = paired_interval(first, second)
    assert paired.low < 0 < paired.high and paired.p > 0.05
    # sd of a case difference 0.1 * sqrt(2) / sqrt(5 seeds x 40 cases) = 1 point; the conservative estimate counts
    # the residual twice (seed and case mean squares), so about 1.4 points: a 95 % width of 4 to 8 points
    assert 4.0 < paired.high - paired.low < 8.0


def test_one_seed_or_one_case_gives_no_interval_and_no_test():
    one_seed = paired_interval({0: {"a": 0.9, "b": 0.8}}, {0: {"a": 0.5, "b": 0.5}})
    assert one_seed.mean == pytest.approx(35.0) and np.isnan(one_seed.low) and np.isnan(one_seed.p)
    assert not one_seed.significant and format_p(one_seed.p) == "n/a"
    one_case = paired_interval({0: {"a": 0.9}, 1: {"a": 0.8}}, {0: {"a": 0.5}, 1: {"a": 0.5}})
    assert np.isnan(one_case.p)


def test_only_seeds_and_cases_that_both_arms_have_are_paired():
    first = {0: {"a": 0.9, "b": 0.9, "c": 0.1}, 1: {"a": 0.9, "b": 0.9}}
    second = {0: {"a": 0.5, "b": 0.5}, 1: {"a": 0.5, "b": 0.5}, 2: {"a": 0.0, "b": 0.0}}
    paired = paired_interval(first, second)
    assert (paired.seeds, paired.cases) == (2, 2) and paired.mean == pytest.approx(40.0)
    assert paired_interval(first, {5: {"a": 0.1}}) is None


def test_holm_adjusts_as_worked_out_by_hand():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    adjusted = holm([0.01, float("nan"), 0.04])  # a comparison without a test is not in the family
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
