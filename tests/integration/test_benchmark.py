"""A whole (tiny) federated benchmark: every arm, the report, resume, and a robustness arm."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from mstkd.modalities import SUBSETS
from simulations import bench, published
from simulations.scenario import load_scenario


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_and_resume(tmp_path, capsys):
    args = ["tiny-2", "--seeds", "1", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    note = tmp_path / "note.md"
    note.write_text("The head now predicts four exclusive classes.\n")
    assert bench.main([*args, "--publish", str(tmp_path / "published"), "--note", str(note)]) == 0
    folder = tmp_path / "out" / "tiny-2"
    arms = load_scenario("tiny-2").arms
    assert len(arms) == 7

    for name in (n for n in published.REPORT_FILES if n != "grad_scales.json"):  # no gradient scales were measured
        assert (folder / name).is_file(), name
        assert (tmp_path / "published" / name).is_file(), name
    expected = [s.display_name for s in SUBSETS] + ["Average"]
    for arm in arms:
        rows = _rows(folder / "tables" / f"{arm}.csv")
        assert [r["subset"] for r in rows] == expected  # 15 subsets in the paper's order + the average
        assert all(0.0 <= float(r["WT_dice_mean"]) <= 1.0 for r in rows)
        assert (folder / "tables" / f"{arm}.md").read_text().count("\n") == 18  # header, rule, 15 + average
        assert (folder / arm / "seed-0" / "done.json").is_file()
        kept = tmp_path / "published" / "runs" / arm / "seed-0"  # the raw files the report is built from
        done = json.loads((kept / "done.json").read_text())
        assert (kept / done["log"]).is_file() and done["commit"]
        assert {c["case"] for c in json.loads((kept / done["table"]).read_text())["cases"]} == {
            "FeTS2022_90013",
            "FeTS2022_90014",
        }  # the held-out phantom test set, scored by every arm
    assert json.loads((folder / "bench.json").read_text())["commit"]
    ablation = _rows(folder / "tables" / "ablation.csv")
    assert [r["arm"] for r in ablation] == ["no-mstkd", "no-gsm", "no-dmld", "mstkd"]

    summary = {r["arm"]: r for r in _rows(folder / "summary.csv")}
    assert set(summary) == set(arms)
    assert float(summary["centralised"]["bytes_total"]) == 0.0
    assert float(summary["mstkd"]["bytes_total"]) > 0 and float(summary["mstkd"]["convergence_score"]) >= 0
    assert all(r["test_cases"] == "2" for r in summary.values())
    compared = {(r["first"], r["second"]): r for r in _rows(folder / "comparisons.csv")}
    assert {("mstkd", "centralised"), ("mstkd", "student"), ("mstkd", "no-kl"), ("mstkd", "no-gsm")} <= set(compared)
    for row in compared.values():  # one seed: a difference, but no interval and no test (those need two seeds)
        assert math.isfinite(float(row["delta_points"]))
        assert all(math.isnan(float(row[k])) for k in ("ci_low", "ci_high", "p", "p_holm"))
    assert all(
        0.0 <= float(r["max_region_share"]) <= 1.0 and r["collapsed"] in ("True", "False") for r in summary.values()
    )
    sites = _rows(folder / "sites.csv")
    assert {r["site"] for r in sites if r["arm"] == "mstkd"} == {"site-1", "site-2"}

    report = (folder / "REPORT.md").read_text()
    for section in (
        "What changed",
        "Test set**: 2 held-out cases",
        "Comparisons",
        "One arm per loss term",
        "Mechanism groups",
        "Convergence",
        "Collapse check",
        "Ablation",
        "Validation Dice over rounds",
        "Paper layout",
        "Per-site",
    ):
        assert section in report
    assert "four exclusive classes" in report
    assert "not comparable" in report and "Machine:" in report

    # resume: finished arms are skipped; an interrupted one starts over from an empty folder
    done = {a: (folder / a / "seed-0" / "done.json").stat().st_mtime_ns for a in arms}
    (folder / "centralised" / "seed-0" / "done.json").unlink()
    (folder / "centralised" / "seed-0" / "leftover.tmp").write_text("half-written")
    capsys.readouterr()
    assert bench.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier, skipped") == 6
    assert "four exclusive classes" in (folder / "REPORT.md").read_text()  # a resumed benchmark keeps its note
    assert not (folder / "centralised" / "seed-0" / "leftover.tmp").exists()
    assert json.loads((folder / "centralised" / "seed-0" / "done.json").read_text())["arm"] == "centralised"
    assert all((folder / a / "seed-0" / "done.json").stat().st_mtime_ns == done[a] for a in arms if a != "centralised")

    # continued elsewhere (a fresh clone): runs the published folder holds are taken from it, not trained again
    shutil.rmtree(folder)
    capsys.readouterr()
    assert bench.main([*args, "--publish", str(tmp_path / "published")]) == 0
    err = capsys.readouterr().err
    assert f"{len(arms)} runs finished earlier taken from" in err and "Federated MST-KDNet (FedAvg) ..." not in err
    assert _rows(folder / "comparisons.csv") == _rows(tmp_path / "published" / "comparisons.csv")


@pytest.mark.slow
def test_a_robustness_arm_makes_one_site_hostile_and_the_report_shows_the_damage(tmp_path):
    """tiny-2 with its second site scaling its update x100 (FedAvg), beside the honest run: the hostile app is a
    copy that is removed afterwards, the poisoned replies pass the server's checks (they are well-formed), and the
    report's robustness table shows the damage and the model's norm."""
    from simulations.scenario import HOSTILE

    args = ["tiny-2", "--seeds", "1", "--arms", "mstkd,mstkd+scale", "--out", str(tmp_path / "out")]
    assert bench.main([*args, "--work-dir", str(tmp_path / "work")]) == 0
    folder = tmp_path / "out" / "tiny-2"
    summary = {r["arm"]: r for r in _rows(folder / "summary.csv")}
    assert float(summary["mstkd+scale"]["model_norm"]) > float(summary["mstkd"]["model_norm"])
    logs = {
        arm: [json.loads(line) for line in (folder / arm / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        for arm in ("mstkd", "mstkd+scale")
    }
    assert all(not r["failures"] for r in logs["mstkd+scale"])  # well-formed poison: only an aggregator can stop it
    # FedAvg takes the hostile site's share of a x100 update: the global model moves many times further
    assert logs["mstkd+scale"][1]["step_norm"] > 10 * logs["mstkd"][1]["step_norm"]
    report = (folder / "REPORT.md").read_text()
    assert "## Robustness: one hostile site" in report and f"Site {HOSTILE + 1}" in report
    assert "| FedAvg |" in report
    assert "site 2 hostile (update x100) vs FedAvg with no hostile site | 1 × 2 |" in report  # paired by seed, case
    assert not list((tmp_path / "work" / "apps").iterdir())  # the hostile copy of the app is gone
