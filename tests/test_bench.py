"""The federated benchmark: scenarios, arms, the FeTS convergence score, and a whole (tiny) benchmark."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from mstkd.config import load_config
from mstkd.errors import InputError
from mstkd.modalities import SUBSETS
from mstkd.runconfig import RunConfig, project_config
from simulations import bench
from simulations.convergence import convergence_score, simulated_round_times
from simulations.scenario import ARMS, SCENARIOS, load_scenario, parse_arms


def test_every_scenario_loads_and_every_arm_is_a_valid_config():
    names = sorted(p.stem for p in SCENARIOS.glob("*.yaml"))
    assert {"phantom-4", "phantom-8", "fets-partitioning-1", "fets-partitioning-2", "tiny-2"} <= set(names)
    for name in names:
        scenario = load_scenario(name)
        for arm in ARMS.values():
            given = scenario.arm_run_config(arm, seed=1)
            config = RunConfig.parse(given)  # every key known, typed and in range
            assert config.min_nodes == scenario.num_sites and config.seed == 1
            project_config(config)  # the project config refuses an unknown override key
        assert scenario.config == RunConfig.parse(scenario.run)
        load_config(scenario.centralised_overrides(seed=0, num_sites=scenario.num_sites))


def test_a_misspelt_scenario_key_is_refused_in_one_line_naming_it(tmp_path):
    text = (SCENARIOS / "tiny-2.yaml").read_text().replace("num-server-rounds:", "num-server-round:")
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(InputError) as info:
        load_scenario(tmp_path / "typo.yaml")
    message = str(info.value)
    assert "\n" not in message and "'num-server-round'" in message and "did you mean num-server-rounds" in message
    assert "typo.yaml" in message


def test_a_scenario_without_local_epochs_trains_its_centralised_arm_as_long_as_its_federated_arms(tmp_path):
    text = (SCENARIOS / "phantom-4.yaml").read_text().replace("  local-epochs: 1.0\n", "")
    (tmp_path / "no-epochs.yaml").write_text(text)
    scenario = load_scenario(tmp_path / "no-epochs.yaml")
    federated = RunConfig.parse(scenario.arm_run_config(ARMS["mstkd"], seed=0))  # what flwr run is given
    assert federated.local_epochs == RunConfig().local_epochs == 5.0  # pyproject.toml's default
    epochs = [o for o in scenario.centralised_overrides(0, scenario.num_sites) if o.startswith("train.epochs=")]
    assert epochs == [f"train.epochs={round(federated.num_server_rounds * federated.local_epochs)}"]


def test_fets_scenarios_keep_the_institution_sizes():
    p1, p2 = load_scenario("fets-partitioning-1"), load_scenario("fets-partitioning-2")
    assert p1.num_sites == 23 and sum(p1.sizes) == 1251 and max(p1.sizes) == 511 and min(p1.sizes) == 4
    assert p2.num_sites == 33 and sum(p2.sizes) == 1251 and p2.sizes[:3] == [170, 170, 171]


def test_arms_and_scenarios_are_refused_with_one_line():
    with pytest.raises(InputError, match="unknown arm 'nope'"):
        parse_arms("mstkd,nope", load_scenario("tiny-2"))
    with pytest.raises(InputError, match="unknown scenario"):
        load_scenario("no-such-scenario")
    assert bench.main(["tiny-2", "--arms", "nope"]) == 2
    assert bench.main(["tiny-2", "--note", "/no/such/note.md"]) == 2


def test_the_arms_change_what_the_paper_ablates():
    assert "train.mode=student" in ARMS["student"].overrides
    assert [ARMS[a].overrides for a in ("no-mstkd", "no-dmld", "no-gsm")] == [
        "loss.mstkd=false",
        "loss.dmld=false",
        "loss.gsm=false",
    ]
    assert not ARMS["centralised"].federated


def test_convergence_score_by_hand():
    # two rounds of 1 h: best 0.5 then 0.7; T_max = 10 h
    hour = 3600.0
    auc = 0.5 * hour + 0.7 * hour
    expected = ((10 * hour - 2 * hour) * 0.7 + auc) / (10 * hour)
    assert convergence_score([0.5, 0.7], [hour, hour], t_max=10 * hour) == pytest.approx(expected)
    # a worse later round does not lower best-so-far
    assert convergence_score([0.7, 0.2], [hour, hour], t_max=10 * hour) == pytest.approx(
        ((8 * hour) * 0.7 + 1.4 * hour) / (10 * hour)
    )
    # the round that crosses the budget still counts, and ends the experiment
    assert convergence_score([0.5, 0.9, 1.0], [6 * hour, 6 * hour, 6 * hour], t_max=10 * hour) == pytest.approx(
        (0.5 * 6 * hour + 0.9 * 6 * hour) / (10 * hour)
    )


def test_simulated_round_times_follow_the_slowest_site():
    small = simulated_round_times([2], [1], rounds=3, epochs=1.0)
    both = simulated_round_times([2, 200], [1, 20], rounds=3, epochs=1.0)
    assert small.shape == (3,) and np.all(both > small)
    # download + upload alone average about 305 s; 200 cases x 6.7 s add about 1,340 s more
    assert 250 < small.mean() < 600 and both.mean() > 1500
    assert np.array_equal(both, simulated_round_times([2, 200], [1, 20], rounds=3, epochs=1.0))  # seeded


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
    assert len(arms) == 6

    for name in ("REPORT.md", "summary.csv", "summary.json", "sites.csv", "curves.csv", "curves.png", "bench.json"):
        assert (folder / name).is_file(), name
        assert (tmp_path / "published" / name).is_file(), name
    expected = [s.display_name for s in SUBSETS] + ["Average"]
    for arm in arms:
        rows = _rows(folder / "tables" / f"{arm}.csv")
        assert [r["subset"] for r in rows] == expected  # 15 subsets in the paper's order + the average
        assert all(0.0 <= float(r["WT_dice_mean"]) <= 1.0 for r in rows)
        assert (folder / "tables" / f"{arm}.md").read_text().count("\n") == 18  # header, rule, 15 + average
        assert (folder / arm / "seed-0" / "done.json").is_file()
    ablation = _rows(folder / "tables" / "ablation.csv")
    assert [r["arm"] for r in ablation] == ["no-mstkd", "no-gsm", "no-dmld", "mstkd"]

    summary = {r["arm"]: r for r in _rows(folder / "summary.csv")}
    assert set(summary) == set(arms)
    assert float(summary["centralised"]["bytes_total"]) == 0.0
    assert float(summary["mstkd"]["bytes_total"]) > 0 and float(summary["mstkd"]["convergence_score"]) >= 0
    assert all(
        0.0 <= float(r["max_region_share"]) <= 1.0 and r["collapsed"] in ("True", "False") for r in summary.values()
    )
    sites = _rows(folder / "sites.csv")
    assert {r["site"] for r in sites if r["arm"] == "mstkd"} == {"site-1", "site-2"}

    report = (folder / "REPORT.md").read_text()
    for section in (
        "What changed",
        "Headline differences",
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
    assert err.count("finished earlier, skipped") == 5
    assert "four exclusive classes" in (folder / "REPORT.md").read_text()  # a resumed benchmark keeps its note
    assert not (folder / "centralised" / "seed-0" / "leftover.tmp").exists()
    assert json.loads((folder / "centralised" / "seed-0" / "done.json").read_text())["arm"] == "centralised"
    assert all((folder / a / "seed-0" / "done.json").stat().st_mtime_ns == done[a] for a in arms if a != "centralised")


def test_a_run_with_a_skipped_round_or_a_failed_site_is_not_a_result(tmp_path):
    log = tmp_path / "metrics.jsonl"
    good = [{"round": r, "failures": []} for r in range(3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in good))
    bench.incomplete_rounds(log)  # every site in every round: accepted
    failed = {"round": 2, "failures": [{"stage": "train", "node": 7, "reason": "OutOfMemoryError: worker killed"}]}
    log.write_text("".join(json.dumps(r) + "\n" for r in [*good[:2], failed]))
    with pytest.raises(RuntimeError, match="round 2 did not run on every site.*OutOfMemoryError"):
        bench.incomplete_rounds(log)
    log.write_text(json.dumps({"round": 1, "failures": [], "skipped": "0 of 4 nodes replied"}) + "\n")
    with pytest.raises(RuntimeError, match="round 1 did not run on every site"):
        bench.incomplete_rounds(log)


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
    assert "site 2 hostile (update x100) vs FedAvg with no hostile site | 1 |" in report  # the headline pairs it
    assert not list((tmp_path / "work" / "apps").iterdir())  # the hostile copy of the app is gone
