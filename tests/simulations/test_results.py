"""The published reference runs (simulations/results/*/): their reports follow from the raw per-run files kept
beside them. For every published folder that keeps its runs, the report is rebuilt from ``runs/`` alone and its
per-run numbers (``summary.csv``) and comparisons (``comparisons.csv``, which the report's tables print) must be
the published ones. A scenario with ``compare-with`` also reads that scenario's published runs: when those change,
its report must be rebuilt too (``--report-only``, simulations/README.md), or this test fails on its comparisons."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from simulations.published import run_spec
from simulations.report import write_report
from simulations.scenario import ARMS, load_scenario
from simulations.tables import CELLS

RESULTS = Path(__file__).resolve().parents[2] / "simulations" / "results"
KEPT = sorted(p for p in RESULTS.iterdir() if (p / "runs").is_dir() and (p / "summary.csv").is_file())


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _rebuild(published: Path, tmp: Path) -> Path:
    folder = tmp / published.name
    shutil.copytree(published / "runs", folder / "runs")
    for name in ("bench.json", "grad_scales.json"):
        if (published / name).is_file():
            shutil.copy2(published / name, folder / name)
    meta = json.loads((published / "bench.json").read_text())
    summary = _rows(published / "summary.csv")  # the arms and seeds the report covers (runs/ may hold more)
    arms = [ARMS[name] for name in dict.fromkeys(r["arm"] for r in summary)]
    seeds = sorted({int(r["seed"]) for r in summary})
    write_report(folder, load_scenario(meta["scenario"]), arms, seeds)
    return folder


@pytest.mark.parametrize("published", KEPT, ids=[p.name for p in KEPT])
def test_a_published_report_is_recomputed_from_its_raw_runs(published, tmp_path):
    rebuilt = _rebuild(published, tmp_path)
    key = ("arm", "seed")
    want = {tuple(r[k] for k in key): r for r in _rows(published / "summary.csv")}
    got = {tuple(r[k] for k in key): r for r in _rows(rebuilt / "summary.csv")}
    assert set(got) == set(want)
    for run, row in want.items():
        for column in ("mean_dice", *CELLS):
            assert float(got[run][column]) == pytest.approx(float(row[column]), rel=1e-9, abs=1e-12), (run, column)
    if (published / "comparisons.csv").is_file():
        want_cmp, got_cmp = _rows(published / "comparisons.csv"), _rows(rebuilt / "comparisons.csv")
        key = ("section", "first", "second", "subsets")  # a comparison of two scenarios has a row per subset group
        assert [tuple(r.get(k, "all") for k in key) for r in got_cmp] == [
            tuple(r.get(k, "all") for k in key) for r in want_cmp
        ]
        report = (published / "REPORT.md").read_text()
        for w, g in zip(want_cmp, got_cmp, strict=True):
            for column in ("delta_points", "ci_low", "ci_high", "p_holm"):
                want_value = pytest.approx(float(w[column]), rel=1e-9, abs=1e-12, nan_ok=True)  # n/a below 2 seeds
                assert float(g[column]) == want_value, (w["second"], g.get("subsets"), column)
            low, high = float(g["ci_low"]), float(g["ci_high"])
            interval = "n/a" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"
            assert f"{float(g['delta_points']):+.2f} | {interval}" in report


def test_the_reference_benchmark_keeps_its_raw_runs():
    """phantom-4 is the benchmark the README and docs/method.md quote: every run its report covers is kept, with the
    commit it ran at and the run it was (so a continued benchmark takes over only the same run)."""
    published = RESULTS / "phantom-4"
    assert published in KEPT
    scenario = load_scenario("phantom-4")
    for row in _rows(published / "summary.csv"):
        run = published / "runs" / row["arm"] / f"seed-{row['seed']}"
        done = json.loads((run / "done.json").read_text())
        assert done["commit"] and done["spec"], (row["arm"], row["seed"])
        # made as the scenario file of this commit says: the report does not mix in runs of another config
        assert done["spec"] == run_spec(scenario, ARMS[row["arm"]], int(row["seed"]), ""), (row["arm"], row["seed"])
        assert (run / done["table"]).is_file()


def test_a_scenario_is_compared_only_with_published_runs_on_its_own_test_cases(tmp_path, monkeypatch):
    from simulations import runs

    scenario = load_scenario("phantom-4-missing")
    record = json.loads((RESULTS / "phantom-4" / "bench.json").read_text())
    reference, why = runs.reference_runs(scenario, record)
    covered = {(r["arm"], int(r["seed"])) for r in _rows(RESULTS / "phantom-4" / "summary.csv")}
    assert why == "" and set(reference.runs) == {"mstkd", "student"}
    assert reference.folder == "simulations/results/phantom-4/"
    assert all((arm, s) in covered for arm, these in reference.seeds_of.items() for s in these)  # what it reports
    assert all(len(r["case_rows"]) == 15 * 32 for these in reference.runs.values() for r in these)

    elsewhere = {**record, "test_data_path": "/elsewhere/phantoms-4sites-32cases-other"}
    assert runs.reference_runs(scenario, elsewhere)[0] is None
    assert "made on other cases" in runs.reference_runs(scenario, elsewhere)[1]
    monkeypatch.setattr(runs, "RESULTS", tmp_path)  # nothing published
    assert "has no published report" in runs.reference_runs(scenario, record)[1]
    # a published run made with another config than its scenario's is not compared with
    shutil.copytree(RESULTS / "phantom-4" / "runs" / "mstkd", tmp_path / "phantom-4" / "runs" / "mstkd")
    shutil.copytree(RESULTS / "phantom-4" / "runs" / "student", tmp_path / "phantom-4" / "runs" / "student")
    for name in ("bench.json", "summary.csv"):
        shutil.copy2(RESULTS / "phantom-4" / name, tmp_path / "phantom-4" / name)
    assert runs.reference_runs(scenario, record)[1] == ""
    done = tmp_path / "phantom-4" / "runs" / "student" / "seed-0" / "done.json"
    changed = json.loads(done.read_text())
    changed["spec"]["run"]["lr"] = 0.01
    done.write_text(json.dumps(changed))
    assert "student seed 0 was made with another config" in runs.reference_runs(scenario, record)[1]
