"""Federated benchmark: every arm of a scenario, over several seeds, into one paper-ready report.

Usage::

    python -m simulations.bench phantom-4 --seeds 3
    python -m simulations.bench fets-partitioning-2 --data-path /data/MICCAI_FeTS2022_TrainingData \\
        --arms mstkd,student --seeds 1 --gpus-per-node 0.25

Each (arm, seed) trains in its own folder, ``<out>/<scenario>/<arm>/seed-<s>/``: federated
arms through Flower's simulation engine (``flwr run``), the centralised arm in this process.
An arm is finished once its ``done.json`` exists; a rerun skips finished arms and restarts
unfinished ones from scratch (their node state included), so an interrupted benchmark
resumes where it stopped. ``REPORT.md`` and its tables and plots are rewritten after every
arm (see :mod:`simulations.report`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from mstkd.atomic import write_text
from mstkd.errors import InputError
from mstkd.provenance import code_commit
from mstkd.runconfig import RunConfig
from simulations.adversary import hostile_app
from simulations.launch import ROOT, exit_on_sigterm, flower_simulation
from simulations.published import (
    DONE,
    adopt_published,
    finished,
    no_link,
    publish,
    read_meta,
    run_id,
    run_spec,
    same_data,
)
from simulations.report import write_report
from simulations.runs import run_folder
from simulations.scenario import HOSTILE, Arm, Scenario, ScenarioData, load_scenario, parse_arms, scenario_data


def machine() -> str:
    """One line about where this ran: CPU cores, accelerator, Python and torch."""
    import torch

    gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores{gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def progress_line(text: str) -> None:
    """One line of the benchmark's progress on stderr."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def run_federated(
    scenario: Scenario,
    arm: Arm,
    seed: int,
    folder: Path,
    *,
    data: ScenarioData,
    work_dir: Path,
    extra: str,
    cpus: float,
    gpus: float,
) -> dict:
    run_name = f"bench-{scenario.name}-{arm.name.replace('+', '-')}-seed{seed}"
    clear_node_state(work_dir, run_name)  # an interrupted try starts over
    run = {
        **scenario.arm_run_config(arm, seed),
        "out-dir": str(folder),
        "work-dir": str(work_dir),
        "run-name": run_name,
        **data.run_paths(),
        "eval-initial": False,
    }
    rounds = RunConfig.parse(run).num_server_rounds
    run.setdefault("eval-every", rounds)  # a benchmark scores the final model only
    app, env = hostile_app(work_dir / "apps" / run_name, {HOSTILE: arm.attack}) if arm.attack else (ROOT, {})
    try:
        result = flower_simulation(
            run,
            extra=extra,
            nodes=scenario.num_sites,
            flwr_home=work_dir / "flwr-home",
            log=folder / "flwr.log",
            cpus_per_node=cpus,
            gpus_per_node=gpus,
            timeout=24 * 3600,
            app=app,
            env=env,
        )
    finally:
        if app != ROOT:
            shutil.rmtree(app, ignore_errors=True)
    table = folder / "eval" / f"round_{rounds}.json"
    # under attack, a run that learned nothing (the server ends it as failed, after writing every file), skipped
    # rounds and refused replies are the result, not a reason to discard it
    damaged = arm.attack and result.status == "finished:failed" and table.is_file()
    if not result.completed and not damaged:
        raise RuntimeError(f"flwr run ended as {result.status} ({result.details}); see {result.log}")
    if not arm.attack:
        incomplete_rounds(folder / "metrics.jsonl")
    clear_node_state(work_dir, run_name)  # teachers are not part of the result
    return {"table": f"eval/round_{rounds}.json", "log": "metrics.jsonl", "flwr_run": result.run_id}


def clear_node_state(work_dir: Path, run_name: str) -> None:
    """Remove the node state of runs named ``run_name`` (each run keys its folder ``<run-name>.<token>``)."""
    for folder in (work_dir / "nodes").glob(f"{run_name}.*"):
        shutil.rmtree(folder, ignore_errors=True)


def incomplete_rounds(log: Path) -> None:
    """Refuse a run in which a round was skipped or a site failed (e.g. a worker killed for memory): its
    numbers would not be those of the scenario. Raises RuntimeError naming the first such round."""
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("skipped") or record.get("failures"):
            why = record.get("skipped") or record["failures"][0]["reason"]
            raise RuntimeError(f"round {record['round']} did not run on every site ({str(why)[:160]}); see {log}")


def run_centralised(scenario: Scenario, seed: int, folder: Path, *, data: ScenarioData, extra: str) -> dict:
    from mstkd.centralised import train_centralised
    from mstkd.checkpoint import load_checkpoint
    from mstkd.config import load_config
    from mstkd.data.sites import held_out_cases
    from mstkd.evaluate import evaluate_cases, parse_subsets

    if extra:
        raise InputError("--run-config applies to federated arms; put centralised settings in the scenario")
    cfg = load_config(scenario.centralised_overrides(seed, scenario.num_sites))
    train_centralised(data.folder, cfg, folder, partitioning=data.partitioning, progress=True)
    student, cfg, _ = load_checkpoint(folder / "last.pt")
    run = scenario.config.replace(
        data_path=str(data.folder), partitioning=str(data.partitioning or ""), test_data_path=str(data.test or "")
    )
    cases = held_out_cases(run, cfg, scenario.num_sites)
    subsets = parse_subsets(run.eval_subsets)
    result = evaluate_cases(student, cases, cfg, subsets=subsets, desc="test")
    result.write(folder / "eval", stem="final")
    return {"table": "eval/final.json", "log": "log.jsonl"}


def read_note(path: str | None) -> str | None:
    """The text of ``--note``; a missing file is refused."""
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InputError(f"--note: cannot read {path} ({exc.strerror})") from None


def stale_runs(bench: Path, scenario: Scenario, arms: list[Arm], seeds: list[int], extra: str) -> list[str]:
    """The finished runs of ``bench`` (their folders relative to it: ``arm/seed-s``, or ``runs/arm/seed-s`` in a
    published folder) that were made with another config than this benchmark would use: not results of this
    benchmark, so neither skipped nor reported."""
    stale = []
    for seed in seeds:
        for arm in arms:
            folder = run_folder(bench, arm.name, seed)
            if (folder / DONE).is_file() and not finished(folder, run_spec(scenario, arm, seed, extra)):
                stale.append(str(folder.relative_to(bench)))
    return stale


RECORDED_OPTIONS = (
    "first_seed",
    "data_path",
    "partitioning",
    "cpus_per_node",
    "gpus_per_node",
    "run_config",
    "note",
    "publish",
)
"""The options ``bench.json``'s command names when they are away from their defaults."""


def report_command(
    args: argparse.Namespace, parser: argparse.ArgumentParser, scenario: Scenario, arms: list[Arm]
) -> str:
    """The command that makes this report's runs, built from its scope rather than from the command line: the
    arms (named only when they are not all of the scenario's), the seeds and every other option away from its
    default (the parser's), without this machine's folders (--out, --work-dir) or how this call was asked
    (--report-only, --rerun-stale)."""
    parts = ["python", "-m", "simulations.bench", args.scenario]
    if [arm.name for arm in arms] != list(scenario.arms):
        parts += ["--arms", ",".join(arm.name for arm in arms)]
    parts += ["--seeds", str(args.seeds)]
    for option in RECORDED_OPTIONS:
        value = getattr(args, option)
        if value != parser.get_default(option):
            parts += ["--" + option.replace("_", "-"), str(value)]
    return shlex.join(parts)


def bench_meta(scenario: Scenario, data: ScenarioData, command: str, note: str | None) -> dict:
    """``bench.json``: what the benchmark ran on, the command that makes it, the code's commit and the machine."""
    return {
        "scenario": scenario.name,
        "scenario_file": str(scenario.source),
        "data": data.description,
        "data_path": str(data.folder),
        "partitioning": str(data.partitioning or ""),
        "test_data_path": str(data.test or ""),
        "command": command,
        "commit": code_commit(),
        "machine": machine(),
        **({"note": note} if note is not None else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenario", help="a name in simulations/scenarios (phantom-4, fets-partitioning-1, ...) or a path"
    )
    parser.add_argument("--arms", default="all", help="comma-separated arms (default: the scenario's)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (default 0)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="parent of the benchmark folder")
    parser.add_argument("--work-dir", default=str(ROOT / ".cache" / "mstkd"), help="phantoms, caches, node state")
    parser.add_argument("--data-path", default=None, help="real data folder (default: the scenario's phantoms)")
    parser.add_argument("--partitioning", default=None, help="partition CSV for --data-path (default: the scenario's)")
    parser.add_argument("--cpus-per-node", type=float, default=2, help="Ray CPUs per simulated node (default 2)")
    parser.add_argument("--gpus-per-node", type=float, default=0.0, help="GPU share per simulated node (e.g. 0.25)")
    parser.add_argument(
        "--run-config", default="", help="extra run config for federated arms, e.g. \"transport='float32'\""
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished arms only")
    parser.add_argument(
        "--rerun-stale",
        action="store_true",
        help="remove finished runs made with another config (the scenario or --run-config changed) and make them again",
    )
    parser.add_argument("--publish", default=None, help="also copy the report files (no checkpoints) to this folder")
    parser.add_argument("--note", default=None, help="a Markdown file whose text the report shows as 'What changed'")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # kill <pid> stops the Flower processes too, as Ctrl-C does

    try:
        scenario = load_scenario(args.scenario)
        arms = parse_arms(args.arms, scenario)
        if args.seeds < 1:
            raise InputError("--seeds must be at least 1")
        fixed = [k for k in ("num-server-rounds", "seed", "out-dir", "run-name") if f"{k}=" in args.run_config]
        if fixed:
            raise InputError(f"--run-config cannot set {fixed[0]}: the scenario and --seeds decide it")
        if "eval-subsets=" in args.run_config or scenario.config.eval_subsets != "all":
            raise InputError("a benchmark scores every arm under all 15 subsets: leave eval-subsets at 'all'")
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        bench = Path(args.out).resolve() / scenario.name
        work_dir = Path(args.work_dir).resolve()
        data_path = Path(args.data_path).expanduser() if args.data_path else None
        partitioning = Path(args.partitioning).expanduser().resolve() if args.partitioning else None
        note = read_note(args.note)
        command = report_command(args, parser, scenario, arms)
        data = scenario_data(scenario, work_dir, data_path, partitioning)
        if args.publish:
            published = Path(args.publish).resolve()
            taken, other = adopt_published(bench, published, scenario, data, arms, seeds, args.run_config)
            if taken:
                progress_line(f"{len(taken)} runs finished earlier taken from {args.publish}: {', '.join(taken)}")
            if other:
                progress_line(f"not taken from {args.publish} (another config or other data): {', '.join(other)}")
        stale = stale_runs(bench, scenario, arms, seeds, args.run_config)
        if stale and not args.rerun_stale:
            raise InputError(
                f"{len(stale)} finished runs in {bench} were made with another config ({', '.join(stale)}): "
                "run with the config they were made with, or pass --rerun-stale to remove and remake them"
            )
        for run in stale:
            shutil.rmtree(no_link(bench, run))  # never through a link: it would remove a folder elsewhere
            progress_line(f"{run}: made with another config, removed to be made again")
        if args.report_only:
            # this folder's record, else the published benchmark's (same cases), else a new one (a folder of runs
            # taken over only); the command is always this report's, since an earlier call may have made a subset
            meta = read_meta(bench)
            if "data_path" not in meta and args.publish:
                record = read_meta(published)
                if same_data(record, data):
                    meta = {**record, **meta}
            if "data_path" not in meta:
                meta = bench_meta(scenario, data, command, meta.get("note"))
            meta["command"] = command
            if note is not None:
                meta["note"] = note
            bench.mkdir(parents=True, exist_ok=True)
            write_text(bench / "bench.json", json.dumps(meta, indent=1))
            write_report(bench, scenario, arms, seeds)
            if args.publish:
                progress_line(f"report files copied to {publish(bench, published, arms, seeds)}")
            progress_line(f"report: {bench / 'REPORT.md'}")
            return 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    bench.mkdir(parents=True, exist_ok=True)
    if note is None:  # a resumed benchmark keeps its note
        note = read_meta(bench).get("note")
    meta = bench_meta(scenario, data, command, note)
    write_text(bench / "bench.json", json.dumps(meta, indent=1))
    progress_line(f"{scenario.name}: {data.description}; {len(arms)} arms x {len(seeds)} seeds into {bench}")
    failed = []
    for seed in seeds:  # seed-major: an interrupted benchmark already has every arm for the first seeds
        for arm in arms:
            folder = no_link(bench, run_id(arm.name, seed))  # never read, removed or written through a link
            spec = run_spec(scenario, arm, seed, args.run_config)
            if finished(folder, spec):
                progress_line(f"{arm.name} seed {seed}: finished earlier, skipped")
                continue
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            progress_line(f"{arm.name} seed {seed}: {arm.label} ...")
            commit = code_commit()  # each run packs the tree as it is now, which may differ from the benchmark's start
            start = time.perf_counter()
            try:
                if arm.federated:
                    files = run_federated(
                        scenario,
                        arm,
                        seed,
                        folder,
                        data=data,
                        work_dir=work_dir,
                        extra=args.run_config,
                        cpus=args.cpus_per_node,
                        gpus=args.gpus_per_node,
                    )
                else:
                    files = run_centralised(scenario, seed, folder, data=data, extra=args.run_config)
            except (RuntimeError, InputError) as exc:
                progress_line(f"{arm.name} seed {seed}: FAILED: {exc}")
                failed.append(run_id(arm.name, seed))
                continue
            seconds = time.perf_counter() - start
            done = {
                "arm": arm.name,
                "seed": seed,
                "seconds": seconds,
                "machine": machine(),
                "commit": commit,
                "spec": spec,
                **files,
            }
            write_text(folder / DONE, json.dumps(done, indent=1))
            progress_line(f"{arm.name} seed {seed}: done in {seconds:.0f} s")
            try:  # a report that cannot be built must not stop a long benchmark: the runs are kept either way
                write_report(bench, scenario, arms, seeds)
                if args.publish:  # after every run: an interrupted benchmark has published what it finished
                    publish(bench, Path(args.publish), arms, seeds)
            except (OSError, ValueError, KeyError) as exc:
                progress_line(f"the report could not be rebuilt ({exc}); the runs are kept, see --report-only")
    report = write_report(bench, scenario, arms, seeds)
    if args.publish:
        progress_line(f"report files copied to {publish(bench, Path(args.publish), arms, seeds)}")
    if failed:
        progress_line(f"{len(failed)} runs failed ({', '.join(failed)}); rerun the same command to retry them")
        return 1
    progress_line(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
