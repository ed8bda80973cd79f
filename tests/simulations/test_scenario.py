"""Benchmark scenarios and arms (simulations.scenario): every scenario loads, every arm is a valid config."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from mstkd.config import load_config
from mstkd.errors import InputError
from mstkd.runconfig import RunConfig, project_config
from simulations import bench
from simulations.scenario import (
    ARMS,
    LONGER_ARMS,
    SCENARIOS,
    TERM_ARMS,
    TERM_GROUPS,
    load_scenario,
    parse_arms,
    scenario_data,
)


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
    raw = OmegaConf.load(SCENARIOS / "phantom-4.yaml")
    del raw.run["local-epochs"]
    raw.pop("centralised", None)  # a ceiling trained longer on purpose is not this test's point
    OmegaConf.save(raw, tmp_path / "no-epochs.yaml")
    scenario = load_scenario(tmp_path / "no-epochs.yaml")
    federated = RunConfig.parse(scenario.arm_run_config(ARMS["mstkd"], seed=0))  # what flwr run is given
    assert federated.local_epochs == RunConfig().local_epochs == 5.0  # pyproject.toml's default
    epochs = [o for o in scenario.centralised_overrides(0, scenario.num_sites) if o.startswith("train.epochs=")]
    assert epochs == [f"train.epochs={round(federated.num_server_rounds * federated.local_epochs)}"]


def test_a_scenario_can_train_its_centralised_ceiling_longer(tmp_path):
    text = (SCENARIOS / "tiny-2.yaml").read_text()
    (tmp_path / "longer.yaml").write_text(text + "centralised:\n  epochs: 7\n")
    scenario = load_scenario(tmp_path / "longer.yaml")
    assert "train.epochs=7" in scenario.centralised_overrides(0, scenario.num_sites)
    assert scenario.arm_run_config(ARMS["mstkd"], 0) == load_scenario("tiny-2").arm_run_config(ARMS["mstkd"], 0)
    for bad, message in (
        ("epochs: 0", "positive whole number"),
        ("epochs: 2.5", "positive whole number"),
        ("epoch: 7", "unknown centralised keys epoch"),
    ):
        (tmp_path / "bad.yaml").write_text(text + f"centralised:\n  {bad}\n")
        with pytest.raises(InputError, match=message):
            load_scenario(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(text + "centralised: 40\n")
    with pytest.raises(InputError, match="centralised must be a mapping"):
        load_scenario(tmp_path / "bad.yaml")


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
    # one arm per loss term, each setting exactly one weight of the loss config to 0; the groups are made of them
    loss = load_config([]).loss
    for name, (_, key) in TERM_ARMS.items():
        assert ARMS[name].overrides == f"loss.{key}=0" and float(loss[key]) > 0, name
    assert sorted(a for group in TERM_GROUPS.values() for a in group) == sorted(set(TERM_ARMS) - {"no-content"})
    assert set(load_scenario("phantom-4").arms) >= {"centralised", "mstkd", "student", *TERM_ARMS, *TERM_GROUPS}


def test_more_local_epochs_per_round_means_fewer_rounds_and_the_same_epochs_in_all():
    scenario = load_scenario("phantom-4-strategies")
    shape = {a: RunConfig.parse(scenario.arm_run_config(ARMS[a], 0)) for a in scenario.arms}
    equal = {(c.num_server_rounds, c.local_epochs) for a, c in shape.items() if a not in LONGER_ARMS}
    assert equal == {(20, 1.0), (10, 2.0), (5, 4.0)}
    assert (shape["rounds-40"].num_server_rounds, shape["rounds-40"].local_epochs) == (40, 1.0)
    assert shape["fedyogi"].strategy == "fedyogi" and shape["local-4"].strategy == "fedavg"


def test_a_phantom_scenario_can_hold_out_a_test_set_of_the_same_sites(tmp_path):
    data = scenario_data(load_scenario("tiny-2"), tmp_path / "work")  # 12 cases, and 2 held out
    train = sorted(p.name for p in data.folder.iterdir() if p.is_dir())
    test = sorted(p.name for p in data.test.iterdir() if p.is_dir())
    assert len(train) == 12 and test == ["FeTS2022_90013", "FeTS2022_90014"]
    assert data.run_paths() == {
        "data-path": str(data.folder),
        "partitioning": str(data.folder / "partitioning.csv"),
        "test-data-path": str(data.test),
    }
    assert "held-out test set: 2 further cases" in data.description
    text = (SCENARIOS / "tiny-2.yaml").read_text()
    assert "  test_cases: 2\n" in text
    (tmp_path / "none.yaml").write_text(text.replace("  test_cases: 2\n", ""))
    assert scenario_data(load_scenario(tmp_path / "none.yaml"), tmp_path / "work").test is None
    (tmp_path / "typo.yaml").write_text(text.replace("test_cases", "test_case"))
    with pytest.raises(InputError, match="unknown phantom keys test_case"):
        load_scenario(tmp_path / "typo.yaml")


def test_compare_with_must_name_another_scenario(tmp_path):
    assert load_scenario("phantom-4-missing").compare_with == "phantom-4"
    assert load_scenario("phantom-4").compare_with is None
    for name, value in (("self.yaml", "self"), ("other.yaml", "phantom-40")):
        text = (SCENARIOS / "tiny-2.yaml").read_text() + f"\ncompare-with: {value}\n"
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=f"compare-with must name another scenario.*'{value}'") as info:
            load_scenario(tmp_path / name)
        assert "\n" not in str(info.value)
    # the two scenarios may differ only in which sites lack modalities
    missing = (SCENARIOS / "phantom-4-missing.yaml").read_text()
    (tmp_path / "longer.yaml").write_text(missing.replace("num-server-rounds: 40", "num-server-rounds: 60"))
    with pytest.raises(InputError, match="may differ only in drop-modalities, not in num-server-rounds"):
        load_scenario(tmp_path / "longer.yaml")


def test_drop_modalities_must_name_sites_the_scenario_has(tmp_path):
    missing = (SCENARIOS / "phantom-4-missing.yaml").read_text()
    (tmp_path / "site-0.yaml").write_text(missing.replace('"2:t1ce; 3:t1ce,flair"', '"0:t1ce"'))
    with pytest.raises(InputError, match="drop-modalities names site '0', but the sites are 1, 2, 3, 4"):
        load_scenario(tmp_path / "site-0.yaml")


def test_a_scenario_file_cannot_read_the_environment_or_run_code(tmp_path, monkeypatch):
    from mstkd.errors import InputError
    from simulations.scenario import load_scenario

    monkeypatch.setenv("MSTKD_SECRET", "hunter2")
    reads = tmp_path / "reads.yaml"
    reads.write_text('description: "secret is ${oc.env:MSTKD_SECRET}"\nsites: 2\n')
    with pytest.raises(InputError, match="interpolation is not allowed in a scenario"):
        load_scenario(reads)
    runs = tmp_path / "runs.yaml"
    runs.write_text("description: !!python/object/apply:os.system ['echo ran']\n")
    with pytest.raises(InputError, match=r"^.*runs\.yaml: not a readable scenario \(.*\)$"):
        load_scenario(runs)
    listing = tmp_path / "listing.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="not a mapping of scenario keys"):
        load_scenario(listing)


def test_a_scenario_names_its_partition_csv_only_under_simulations(tmp_path):
    from mstkd.errors import InputError
    from simulations.scenario import load_scenario

    outside = tmp_path / "elsewhere.csv"
    outside.write_text("Partition_ID,Subject_ID\n1,FeTS2022_00001\n")
    from simulations.scenario import HERE

    for named in (str(outside), os.path.relpath(outside, HERE)):  # absolute, and up out of simulations/ to it
        scenario = tmp_path / "s.yaml"
        scenario.write_text(f"description: d\nsites:\n  partitioning: {named}\n")
        with pytest.raises(InputError, match=r"sites\.partitioning must name a file under simulations/"):
            load_scenario(scenario)
    scenario.write_text("description: d\nsites:\n  partitioning: ../shared/data/fets/partitioning_1.csv\n")
    with pytest.raises(InputError, match="must name a file under simulations/"):
        load_scenario(scenario)
    shipped = load_scenario("fets-partitioning-1")  # the shipped scenarios' CSVs lie under simulations/fets/
    assert len(shipped.sizes) == 23
