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


def test_a_published_folder_cannot_read_or_write_outside_its_runs(tmp_path, capsys):
    """A published folder comes from elsewhere (a pull request, a colleague's clone): the files a done.json names
    are the benchmark's own names, and a link anywhere on the way is refused, so taking its runs over neither
    writes outside the benchmark folder nor copies a file of this machine into it."""
    from mstkd.errors import InputError

    scenario = load_scenario("tiny-2")
    arm = ARMS["centralised"]
    spec = published_.run_spec(scenario, arm, 0, "")
    data = ScenarioData(tmp_path / "phantoms", None, None, "")
    published, bench_dir = tmp_path / "published", tmp_path / "bench"
    run = published / "runs" / "centralised" / "seed-0"
    _finished_run(run, spec)
    (run / "escaped.txt").write_text("the sender's content")
    for name in ("../../../../escaped.txt", "/etc/passwd", "eval/../../escaped.txt"):
        (run / "done.json").write_text(json.dumps({"spec": spec, "table": "eval/final.json", "log": name}))
        with pytest.raises(InputError, match="its log is not a file the benchmark writes"):
            published_.adopt_published(bench_dir, published, scenario, data, [arm], [0], "")
    assert not (tmp_path / "escaped.txt").exists()

    private = tmp_path / "private"
    private.mkdir()
    (private / "final.json").write_text('{"secret": 1}')
    _finished_run(run.parent / "seed-9", spec)  # a fresh, well-formed run folder ...
    run = run.parent / "seed-9"
    (run / "eval" / "final.json").unlink()
    (run / "eval").rmdir()
    (run / "eval").symlink_to(private, target_is_directory=True)  # ... whose table lies behind a link
    with pytest.raises(InputError, match="eval: a link; a benchmark.s and a published folder hold plain files only"):
        published_.read_done(published, "runs/centralised/seed-9")
    (published / "grad_scales.json").symlink_to(private / "final.json")
    (published / "runs" / "centralised" / "seed-0" / "done.json").write_text(
        json.dumps({"spec": spec, "table": "eval/final.json", "log": "log.jsonl"})
    )
    with pytest.raises(InputError, match="grad_scales.json: a link"):
        published_.adopt_published(bench_dir, published, scenario, data, [arm], [0], "")
    assert not (bench_dir / "grad_scales.json").exists()

    # publishing into a folder from elsewhere never writes through a link it holds
    mine = tmp_path / "mine.txt"
    mine.write_text("a file of this machine")
    (published / "grad_scales.json").unlink()
    (published / "REPORT.md").symlink_to(mine)
    (bench_dir / "REPORT.md").write_text("the report")
    (bench_dir / "tables").mkdir(exist_ok=True)
    with pytest.raises(InputError, match="REPORT.md: a link"):
        published_.publish(bench_dir, published, [arm], [0])
    (published / "REPORT.md").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (published / "runs" / "centralised" / "seed-0").rename(tmp_path / "moved")
    (published / "runs" / "centralised" / "seed-0").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InputError, match="seed-0: a link"):
        published_.publish(bench_dir, published, [arm], [0])
    assert mine.read_text() == "a file of this machine" and not any(elsewhere.iterdir())

    # a link above a run (its arm's folder, or runs/ itself) is no way in either, nor a way to remove a folder
    from simulations.runs import finished_runs

    victim = tmp_path / "victim"
    _finished_run(victim / "seed-0", {"spec": "someone else's"})
    (published / "runs" / "centralised").rename(tmp_path / "moved-arm")
    (published / "runs" / "centralised").symlink_to(victim, target_is_directory=True)
    with pytest.raises(InputError, match="centralised: a link"):
        finished_runs(published, arm, [0])
    out = tmp_path / "out" / "tiny-2"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "centralised").symlink_to(victim, target_is_directory=True)
    args = ["tiny-2", "--arms", "centralised", "--seeds", "1", "--out", str(tmp_path / "out"), "--report-only"]
    capsys.readouterr()
    assert bench.main([*args, "--work-dir", str(tmp_path / "work"), "--rerun-stale"]) == 2
    assert "centralised: a link" in capsys.readouterr().err
    assert (victim / "seed-0" / "done.json").is_file()  # not removed through the link
    (published / "bench.json").write_text("[]")
    with pytest.raises(InputError, match="bench.json: not a JSON object"):
        published_.read_meta(published)


def test_runs_laid_out_as_a_published_folder_are_checked_for_their_config_too(tmp_path, capsys):
    scenario = load_scenario("tiny-2")
    spec = published_.run_spec(scenario, ARMS["mstkd"], 0, "")
    run = tmp_path / "out" / "tiny-2" / "runs" / "mstkd" / "seed-0"
    _finished_run(run, {**spec, "extra": "transport='float32'"})
    args = ["tiny-2", "--arms", "mstkd", "--seeds", "1", "--out", str(tmp_path / "out"), "--report-only"]
    assert bench.main([*args, "--work-dir", str(tmp_path / "work")]) == 2
    message = capsys.readouterr().err
    assert "1 finished runs" in message and "runs/mstkd/seed-0" in message


def test_a_run_folder_from_elsewhere_is_read_as_numbers_or_refused_in_one_line(tmp_path):
    from mstkd.data.labels import REGIONS
    from mstkd.errors import InputError
    from simulations.runs import run_numbers
    from simulations.tables import ROW_NAMES

    run = tmp_path / "run"
    _finished_run(run, {})
    done = published_.read_done(tmp_path, "run")
    scores = {**{f"{r}_dice": 0.5 for r in REGIONS}, **{f"{r}_hd95": 3.0 for r in REGIONS}}
    table = [{"display": name, **scores} for name in ROW_NAMES]
    for bad, word in (
        ({"ET_dice": float("nan")}, "ET Dice nan"),
        ({"TC_dice": 7.5}, "TC Dice 7.5"),
        ({"WT_hd95": -3.0}, "HD95 -3"),
    ):
        rows = [table[0] | bad, *table[1:]]
        (run / "eval" / "final.json").write_text(json.dumps({"table": rows, "cases": []}))
        with pytest.raises(InputError, match=word):
            run_numbers(ARMS["centralised"], run, done | {"seconds": 1.0}, 1.0)
    (run / "eval" / "final.json").write_text(json.dumps({"table": table, "cases": []}))
    (run / "log.jsonl").write_text("".join(json.dumps({"round": r, "sites": {}}) + "\n" for r in range(1, 1002)))
    with pytest.raises(InputError, match="1001 rounds of 0 sites: more than a benchmark runs"):  # minutes of CPU
        run_numbers(ARMS["mstkd"], run, done | {"seconds": 1.0}, 1.0)
    (run / "eval" / "final.json").write_text(json.dumps({"cases": []}))  # no table at all
    with pytest.raises(InputError, match=r"not a finished run's files \(KeyError"):
        run_numbers(ARMS["centralised"], run, done | {"seconds": 1.0}, 1.0)
    (run / "done.json").write_text(json.dumps({**done, "seconds": "twelve"}))
    with pytest.raises(InputError, match="its seconds is not a number of seconds"):
        published_.read_done(tmp_path, "run")
    (run / "done.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        published_.read_done(tmp_path, "run")


def test_what_a_bench_json_from_elsewhere_says_is_shown_as_text_in_the_report(tmp_path):
    out = tmp_path / "out"
    args = ["tiny-2", "--arms", "mstkd", "--seeds", "1", "--out", str(out), "--report-only"]
    args += ["--work-dir", str(tmp_path / "work")]
    assert bench.main(args) == 0
    record = out / "tiny-2" / "bench.json"
    meta = json.loads(record.read_text())
    meta |= {"data": "phantom ![t](http://x.example/t.png)", "machine": "<script>x</script>", "commit": "`a`\n# Hi"}
    record.write_text(json.dumps(meta))
    assert bench.main(args) == 0
    report = (out / "tiny-2" / "REPORT.md").read_text()
    assert "![t](" not in report and "<script>" not in report and "\n# Hi" not in report
    assert r"phantom \!\[t\](http\[:\]//x.example/t.png)" in report and "commit `'a' # Hi`" in report
