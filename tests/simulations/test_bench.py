"""The benchmark driver (simulations.bench, simulations.published): a run with a skipped round or a failed site is
not a result; a published run is taken over only by a benchmark that would make the same run."""

from __future__ import annotations

import json

import pytest

from simulations import bench
from simulations import published as published_
from simulations.scenario import ARMS, ScenarioData, load_scenario


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


def test_a_published_run_is_taken_over_only_by_a_benchmark_that_would_make_the_same_run(tmp_path):
    scenario = load_scenario("tiny-2")
    arms = [ARMS["mstkd"], ARMS["centralised"]]
    published = tmp_path / "published"
    for arm in arms:
        run = published / "runs" / arm.name / "seed-0"
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "final.json").write_text("{}")
        (run / "log.jsonl").write_text("")
        spec = published_.run_spec(scenario, arm, 0, "")
        done = {"arm": arm.name, "seed": 0, "spec": spec, "table": "eval/final.json", "log": "log.jsonl"}
        (run / "done.json").write_text(json.dumps(done))
    (published / "grad_scales.json").write_text("{}")
    data = ScenarioData(tmp_path / "phantoms-a", tmp_path / "phantoms-a" / "partitioning.csv", tmp_path / "test-b", "")
    meta = {"data_path": "/elsewhere/phantoms-a", "test_data_path": "/elsewhere/test-b"}  # another clone, same data
    (published / "bench.json").write_text(json.dumps(meta))
    taken, other = published_.adopt_published(tmp_path / "bench", published, scenario, data, arms, [0, 1], "")
    assert taken == ["mstkd/seed-0", "centralised/seed-0"] and other == []
    assert (tmp_path / "bench" / "mstkd" / "seed-0" / "eval" / "final.json").is_file()
    assert (tmp_path / "bench" / "grad_scales.json").is_file()
    # another --run-config, or a scenario changed since: the published runs are someone else's
    taken, other = published_.adopt_published(
        tmp_path / "other", published, scenario, data, arms, [0], "transport='float32'"
    )
    assert taken == ["centralised/seed-0"] and other == ["mstkd/seed-0"]
    assert not (tmp_path / "other" / "mstkd").exists()
    # other cases (another phantom federation, another test set): nothing is taken
    (published / "bench.json").write_text(json.dumps({**meta, "test_data_path": "/elsewhere/test-c"}))
    taken, other = published_.adopt_published(tmp_path / "third", published, scenario, data, arms, [0], "")
    assert taken == [] and other[0].startswith("all (the published runs used other data")


def _finished_run(folder, spec):
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "final.json").write_text("{}")
    (folder / "log.jsonl").write_text("")
    done = {"spec": spec, "table": "eval/final.json", "log": "log.jsonl"}
    (folder / "done.json").write_text(json.dumps(done))


def test_a_run_of_another_config_gives_way_to_the_run_this_benchmark_makes(tmp_path):
    scenario = load_scenario("tiny-2")
    arm = ARMS["centralised"]
    spec = published_.run_spec(scenario, arm, 0, "")
    stale = {"centralised": [*spec["centralised"], "train.epochs=999"]}
    bench_dir, published = tmp_path / "bench", tmp_path / "published"
    _finished_run(bench_dir / "centralised" / "seed-0", stale)
    (bench_dir / "centralised" / "seed-0" / "last.pt").write_text("old weights")
    assert not published_.finished(bench_dir / "centralised" / "seed-0", spec)
    _finished_run(published / "runs" / "centralised" / "seed-0", spec)
    data = ScenarioData(tmp_path / "phantoms", None, None, "")
    taken, other = published_.adopt_published(bench_dir, published, scenario, data, [arm], [0], "")
    assert taken == ["centralised/seed-0"] and other == []
    assert published_.finished(bench_dir / "centralised" / "seed-0", spec)
    assert not (bench_dir / "centralised" / "seed-0" / "last.pt").exists()  # nothing of the other run is left
    # publishing never deletes a published run; one of another config is replaced when its replacement is copied
    (bench_dir / "tables").mkdir()
    _finished_run(published / "runs" / "centralised" / "seed-1", stale)
    (published / "runs" / "centralised" / "seed-1" / "extra.csv").write_text("of the old run")
    published_.publish(bench_dir, published, [arm], [0, 1])
    assert not published_.finished(published / "runs" / "centralised" / "seed-1", spec)  # not made yet: kept
    _finished_run(bench_dir / "centralised" / "seed-1", spec)
    published_.publish(bench_dir, published, [arm], [0, 1])
    assert published_.finished(published / "runs" / "centralised" / "seed-1", spec)
    assert not (published / "runs" / "centralised" / "seed-1" / "extra.csv").exists()
    (bench_dir / "centralised" / "seed-1" / "done.json").write_text('{"spec": ')  # half written: not finished
    assert not published_.finished(bench_dir / "centralised" / "seed-1", spec)


def test_a_benchmark_with_runs_of_another_config_stops_unless_told_to_remake_them(tmp_path, capsys):
    scenario = load_scenario("tiny-2")
    spec = published_.run_spec(scenario, ARMS["mstkd"], 0, "")
    run = tmp_path / "out" / "tiny-2" / "mstkd" / "seed-0"
    _finished_run(run, {**spec, "extra": "transport='float32'"})
    args = ["tiny-2", "--arms", "mstkd", "--seeds", "1", "--out", str(tmp_path / "out"), "--report-only"]
    args += ["--work-dir", str(tmp_path / "work")]
    assert bench.main(args) == 2
    message = capsys.readouterr().err
    assert "1 finished runs" in message and "mstkd/seed-0" in message and "--rerun-stale" in message
    assert (run / "done.json").is_file()  # nothing removed without being told
    assert bench.main([*args, "--rerun-stale"]) == 0
    assert not run.exists()
    assert bench.main(args) == 0  # nothing stale is left


def test_a_report_only_benchmark_records_the_benchmark_that_makes_its_runs(tmp_path):
    """A folder of taken-over runs gets a full bench.json (data, command, commit), so a later benchmark that
    continues from the published folder takes its runs over instead of refusing them as other data."""
    published = tmp_path / "published"
    args = ["tiny-2", "--arms", "mstkd", "--seeds", "1", "--out", str(tmp_path / "out")]
    args += ["--work-dir", str(tmp_path / "work"), "--publish", str(published)]
    assert bench.main([*args, "--report-only"]) == 0
    meta = json.loads((published / "bench.json").read_text())
    # the command that makes the runs: their scope, without this machine's folders or --report-only
    assert meta["command"] == f"python -m simulations.bench tiny-2 --arms mstkd --seeds 1 --publish {published}"
    assert meta["commit"] and meta["machine"] and meta["scenario"] == "tiny-2"
    data = bench.scenario_data(load_scenario("tiny-2"), tmp_path / "work", None, None)
    assert published_.same_data(meta, data)
    # a report rewritten elsewhere (a fresh clone, another --out) keeps the published record: commit, command, note
    (published / "bench.json").write_text(json.dumps({**meta, "commit": "abc123", "note": "why"}))
    assert bench.main([*args[:6], str(tmp_path / "elsewhere"), *args[7:], "--report-only"]) == 0
    kept = json.loads((published / "bench.json").read_text())
    assert kept["commit"] == "abc123" and kept["note"] == "why" and kept["command"] == meta["command"]
    # a report over every arm, after a call that made one arm, names the command for every arm
    assert bench.main([*args[:1], *args[3:6], str(tmp_path / "elsewhere"), *args[7:], "--report-only"]) == 0
    whole = json.loads((published / "bench.json").read_text())
    assert whole["commit"] == "abc123" and "--arms" not in whole["command"]
    assert whole["command"] == f"python -m simulations.bench tiny-2 --seeds 1 --publish {published}"
