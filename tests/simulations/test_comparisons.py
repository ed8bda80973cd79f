"""The report's comparison and convergence sections (simulations.comparisons), on hand-made run numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulations.comparisons import compare, comparison_sections, convergence, convergence_section


def _run(scores, curve):
    return {"cases": dict(enumerate(scores)), "curve": list(enumerate(curve, start=1))}


def _results():
    flat = [0.79, 0.81, 0.80, 0.78, 0.82, 0.80]  # levelled off: the last three's mean equals the three before
    rising = [0.50, 0.55, 0.60, 0.70, 0.72, 0.74]  # still rising: +17 points window to window
    return {
        "mstkd": [_run([0.6, 0.7, 0.8], flat), _run([0.62, 0.68, 0.8], flat)],
        "student": [_run([0.5, 0.6, 0.7], rising), _run([0.52, 0.58, 0.7], flat)],
        # identical to the full method on the test cases; its second run falls a little at the end (past its peak)
        "no-kl": [_run([0.6, 0.7, 0.8], flat), _run([0.62, 0.68, 0.8], [0.83, 0.83, 0.83, 0.81, 0.81, 0.81])],
    }


def test_comparisons_pair_by_seed_and_case_and_are_holm_corrected_as_one_family(tmp_path):
    results, seeds = _results(), {"mstkd": [0, 1], "student": [0, 1], "no-kl": [0, 1]}
    rows = compare(results, seeds)
    assert [(r["first"], r["second"], r["section"]) for r in rows] == [
        ("mstkd", "student", "headline"),
        ("mstkd", "no-kl", "term"),
    ]
    student, kl = rows[0]["paired"], rows[1]["paired"]
    assert student.mean == pytest.approx(10.0) and student.low == pytest.approx(10.0)  # every pair differs by 0.1
    assert student.significant and (student.seeds, student.cases) == (2, 3)
    assert kl.mean == 0.0 and kl.p == 1.0 and not kl.significant
    assert student.p_holm == pytest.approx(2 * student.p)  # the smaller of two p-values, times two

    (tmp_path / "grad_scales.json").write_text(json.dumps({"preset": "lite", "steps": 30, "after": {"kl": 0.024}}))
    assert "gradient scale" not in "\n".join(comparison_sections(rows, tmp_path, "paper"))  # measured on another
    text = "\n".join(comparison_sections(rows, tmp_path, "lite"))
    assert "after 30 training steps of `lite`" in text
    assert "### Headline comparisons" in text and "### One arm per loss term" in text
    assert "| MST-KDNet vs student-only baseline | 2 × 3 | +10.00 | [+10.00, +10.00] |" in text
    assert "| full method vs w/o KL | 2 × 3 | +0.00 | [+0.00, +0.00] | 1.000 | 1.000 | no | 0.024 |" in text
    single = compare({k: v[:1] for k, v in results.items()}, {k: [0] for k in seeds})  # one seed: no interval
    single_text = "\n".join(comparison_sections(single, tmp_path, "lite"))
    assert "| MST-KDNet vs student-only baseline | 1 × 3 | +10.00 | n/a | n/a | n/a | n/a |" in single_text
    # the family Holm corrects over is the comparisons that have a p, and the text says how many that is
    assert "Holm-corrected over the 2 of this report's 2 comparisons that have a p" in text
    assert "Holm-corrected over the 0 of this report's 2 comparisons that have a p" in single_text


def test_the_convergence_check_judges_each_arm_on_its_runs_mean_trend():
    assert convergence(list(enumerate([0.1, 0.5, 0.6, 0.7, 0.6, 0.62, 0.64]))) == pytest.approx(0.62 - 0.6)
    assert convergence([(1, 0.5), (2, None), (3, 0.7), (4, 0.7), (5, 0.7), (6, 0.7)]) is None  # fewer than six
    results, seeds = _results(), {"mstkd": [0, 1], "student": [0, 1], "no-kl": [0, 1]}
    # student: seed 0 rises +17 points window to window, seed 1 is flat, so the arm's trend is +8.5
    text = "\n".join(convergence_section(results, seeds))
    assert "| Federated student only (no teacher) | +8.50 | **no** | 0: +17.0, 1: +0.0 | 77.0 |" in text
    assert "**Not levelled off**: Federated student only (no teacher) (+8.500 points)." in text
    assert "| w/o KL | -1.00 | yes | 0: +0.0, 1: -2.0 |" in text  # falling is not rising: levelled off
    assert "Every arm meets the criterion." not in text
    # one run a little above the tolerance, the other below: the arm's mean decides
    results["student"][0]["curve"] = list(enumerate([0.79, 0.81, 0.80, 0.795, 0.83, 0.825], start=1))
    text = "\n".join(convergence_section(results, seeds))
    assert "| Federated student only (no teacher) | +0.83 | yes | 0: +1.7, 1: +0.0 |" in text
    assert "Every arm meets the criterion." in text
    # a run too short to judge (a skipped round leaves five points) is left out of its arm's mean, not read as 0;
    # an arm with no run long enough is said to be unjudged, not levelled off
    results["student"][1]["curve"] = [(1, 0.5), (2, None), (3, 0.7), (4, 0.7), (5, 0.7), (6, 0.7)]
    text = "\n".join(convergence_section(results, seeds))
    assert "| Federated student only (no teacher) | +1.67 | **no** | 0: +1.7, 1: – |" in text
    results["student"][0]["curve"] = results["student"][1]["curve"]
    text = "\n".join(convergence_section(results, seeds))
    assert "| Federated student only (no teacher) | – | – | 0: –, 1: – |" in text
    assert "**Too short to judge** (fewer than 6 validation points): Federated student only" in text
    assert "Every arm meets the criterion." not in text


def test_the_privacy_section_gives_epsilon_beside_the_dice_of_every_private_arm():
    from simulations.tables import privacy_section

    results = {
        "mstkd": [{"mean_dice": 0.55}],
        "dp-clip": [{"mean_dice": 0.45, "epsilon": None, "delta": None, "clip_last": 2.0}],
        "dp-adaptive": [
            {"mean_dice": 0.50, "epsilon": 1.5e6, "delta": 1e-5, "clip_last": 0.8},
            {"mean_dice": 0.52, "epsilon": 1.5e6, "delta": 1e-5, "clip_last": 1.0},
        ],
    }
    text = "\n".join(privacy_section(results))
    assert "| Federated MST-KDNet, updates clipped (DP without noise) | 45.0 | fixed from 2.0 | ∞ | – | 2 |" in text
    assert "adaptive clipping | 51.0 ± 1.4 | adaptive from 2.0 | 1.5e+06 | 1e-05 | 0.9 |" in text
    assert "FedAvg" not in text  # the arm without privacy has no row
    assert privacy_section({"mstkd": results["mstkd"]}) == []


def test_strategies_are_chosen_on_validation_paired_by_seed():
    from simulations.comparisons import validation_section

    def run(curve):
        return {"curve": list(enumerate(curve, start=1))}

    results = {
        "mstkd": [run([0.5, 0.7, 0.70, 0.72, 0.74]), run([0.5, 0.7, 0.71, 0.71, 0.71])],  # finals 72.0 and 71.0
        "fedprox": [run([0.5, 0.7, 0.72, 0.74, 0.76]), run([0.5, 0.7, 0.74, 0.74, 0.74])],  # 74.0 and 74.0
        "local-2": [run([0.6, 0.73, 0.73])],  # one seed: a difference but no interval
    }
    text = "\n".join(validation_section(results, {"mstkd": [0, 1], "fedprox": [0, 1], "local-2": [1]}))
    assert "| Federated MST-KDNet (FedProx) | 2 | 74.0 ± 0.0 | +2.50 | [-3.85, +8.85] |" in text
    assert "| Federated MST-KDNet (FedAvg, 2 local epochs per round) | 1 | 68.7 | -2.33 | – |" in text
    assert validation_section({"mstkd": results["mstkd"]}, {"mstkd": [0, 1]}) == []


def _scored(mstkd_gain, seed):
    """A run's numbers on three test cases: a seed and case offset, plus ``mstkd_gain(subset, seed, case)``
    (0 for student-only runs): the per-(case, subset) rows and the per-case scores."""
    from mstkd.modalities import SUBSETS
    from simulations.stats import case_scores

    rows = []
    for c in range(3):
        for s in SUBSETS:
            dice = 0.5 + 0.01 * seed + 0.02 * c + mstkd_gain(s.name, seed, c)
            rows.append({"case": f"c{c}", "subset": s.name, **dict.fromkeys(("ET_dice", "TC_dice", "WT_dice"), dice)})
    return {"case_rows": rows, "cases": case_scores(rows)}


def test_the_advantage_where_sites_lack_modalities_is_compared_with_the_full_federation_by_subset_group():
    from simulations.comparisons import Reference, against, against_text
    from simulations.scenario import load_scenario

    scenario = load_scenario("phantom-4-missing")  # site 2 lacks T1ce; site 3 T1ce and FLAIR
    sites = scenario.sites_training()
    assert sites["t1+t2"] == 4 and sites["flair+t2"] == 3 and sites["t1ce"] == 2 and sites["flair+t1+t1ce+t2"] == 2

    # In the full federation MST-KDNet gains 2 points over student-only in every subset, plus a per-seed and
    # per-case part; where sites lack modalities it gains 10 points in the subsets all four sites train, 5 in
    # those three train and 2 in the rest, plus the same per-seed and per-case part for the same seed and case.
    # A comparison that paired the wrong seeds or cases would not cancel that part.
    def noise(seed, case):
        return 0.01 * [0.0, 1.0, 3.0][seed] + 0.004 * [1.0, -1.0, 2.0][case] * (1 + seed)

    gain = {4: 0.10, 3: 0.05, 2: 0.02}

    def runs(mstkd_gain, seeds):
        return {
            "mstkd": [_scored(mstkd_gain, seed) for seed in seeds],
            "student": [_scored(lambda *_: 0.0, seed) for seed in seeds],
        }

    here_seeds = {"mstkd": [0, 1], "student": [0, 1]}
    here = runs(lambda s, seed, c: gain[sites[s]] + noise(seed, c), [0, 1])
    # the reference has its runs in another order and a seed more, which is not paired
    there_seeds = {"mstkd": [2, 1, 0], "student": [2, 1, 0]}
    there = Reference(
        "phantom-4",
        "simulations/results/phantom-4/",
        runs(lambda s, seed, c: 0.02 + noise(seed, c), [2, 1, 0]),
        there_seeds,
    )
    rows = against(here, here_seeds, there, scenario)
    by_group = {r["subsets"]: r["paired"] for r in rows}
    assert list(by_group) == ["all", "4-sites", "3-sites", "2-sites"]
    assert by_group["4-sites"].mean == pytest.approx(8.0) and by_group["3-sites"].mean == pytest.approx(3.0)
    assert by_group["2-sites"].mean == pytest.approx(0.0, abs=1e-9)
    assert by_group["all"].mean == pytest.approx((3 * 8.0 + 4 * 3.0) / 15)  # 3 + 4 + 8 subsets
    assert all((p.seeds, p.cases) == (2, 3) for p in by_group.values())
    assert by_group["4-sites"].high - by_group["4-sites"].low == pytest.approx(0.0, abs=1e-9)  # nothing left over
    assert {r["second"] for r in rows} == {"phantom-4:mstkd-student"}
    assert "the 3 subsets 4 of 4 sites train (T2, T1, T1+T2)" in rows[1]["text"]

    # they join the report's one Holm family; the section says what it paired and shows the per-subset table
    family = compare(here, here_seeds, rows)
    assert [r["section"] for r in family] == ["headline"] + ["against"] * 4
    text = "\n".join(comparison_sections(family, Path("."), "lite", against_text(here, here_seeds, there, scenario)))
    assert "### Does the advantage grow where sites lack modalities?" in text
    assert (
        "read from `simulations/results/phantom-4/` (seeds 0, 1, 2); this scenario has seeds 0, 1; paired: 0, 1."
        in text
    )
    assert "over those seeds and the 3 test cases" in text
    # per subset: here 10 + the mean noise, there 2 + the same, over seeds 0-1 and the three cases
    extra = 100 * np.mean([noise(seed, c) for seed in (0, 1) for c in range(3)])
    assert f"| T1+T2 | 4 | {10 + extra:+.2f} | {2 + extra:+.2f} | +8.00 |" in text
    assert f"| T1Gd | 2 | {2 + extra:+.2f} | {2 + extra:+.2f} | +0.00 |" in text
    assert "Holm-corrected over the 5 of this report's 5 comparisons that have a p" in text
    # without both arms in both scenarios, or without a reference, there is nothing to compare
    lacking = Reference("phantom-4", "", {"mstkd": there.runs["mstkd"]}, there_seeds)
    assert against(here, here_seeds, lacking, scenario) == [] and against_text(here, here_seeds, None, scenario) == (
        [],
        [],
    )


def test_an_attacked_robust_aggregator_is_compared_with_fedavg_under_the_same_attack():
    """What a robust aggregator buys is its score against FedAvg's under the same attack, paired by seed and case;
    the report compared each attacked arm only with FedAvg with no hostile site."""
    flat = [0.8] * 6
    results = {
        "mstkd": [_run([0.6, 0.7, 0.8], flat), _run([0.6, 0.7, 0.8], flat)],
        "mstkd+sign-flip": [_run([0.5, 0.6, 0.7], flat), _run([0.52, 0.6, 0.7], flat)],
        "fedmedian+sign-flip": [_run([0.4, 0.5, 0.6], flat), _run([0.4, 0.52, 0.6], flat)],
    }
    rows = compare(results, {arm: [0, 1] for arm in results})
    pairs = {(r["first"], r["second"]): r["paired"] for r in rows}
    assert set(pairs) == {
        ("mstkd+sign-flip", "mstkd"),
        ("fedmedian+sign-flip", "mstkd"),
        ("fedmedian+sign-flip", "mstkd+sign-flip"),
    }
    assert pairs["fedmedian+sign-flip", "mstkd+sign-flip"].mean == pytest.approx(-10.0)
