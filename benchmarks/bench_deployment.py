"""Deployment vs simulation: the same tiny federation deployed (SuperLink + SuperNodes, TLS and node
authentication, all on 127.0.0.1) and simulated (``flwr run`` on Ray), with where a message's time goes.

Each node gets the same CPU share in both: one CPU per simulated node, one thread per SuperNode.

Both runs train the same sites on the same phantom cases (each deployed node's folder links the
cases of one simulated site) and score the same held-out cases, with the same run config. A
deployed SuperNode starts a fresh ``flwr-clientapp`` process for every message, which hands the
work to the node's warm worker (:mod:`client.worker`); every reply carries the seconds of each
phase of that message (``train-time-*`` and ``val-time-*``: process start-up, hand-off to the
worker, config, site data, networks, node state, loader, training or evaluation, state save,
reply), and this script prints their means per message for both runs, the wall times and their
ratio.

Usage: ``python benchmarks/bench_deployment.py [--nodes 3] [--rounds 2] [--model tiny] [--keep DIR]``.
Every process started is stopped by its process group, also on failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.credentials import make_ca, make_node_key, make_server  # noqa: E402
from deploy.processes import flwr_cli, start_local_federation, stop_group  # noqa: E402
from mstkd.phantoms import write_federation  # noqa: E402
from simulations.bench import incomplete_rounds  # noqa: E402
from simulations.launch import flower_simulation, free_port, toml_value  # noqa: E402

SHAPES = {"tiny": (48, 48, 32), "lite": (96, 96, 64), "paper": (160, 192, 128)}  # phantom size per preset
CPUS_PER_NODE = 1


def make_data(tmp: Path, nodes: int, shape: tuple[int, int, int]) -> tuple[Path, Path, list[Path]]:
    """A phantom federation (for the simulation), one folder per site linking its cases (for the nodes),
    and a held-out test folder (for both)."""
    csv_path = write_federation(tmp / "federation", cases=4 * nodes, sites=nodes, shape=shape, seed=10, progress=False)
    by_site: dict[str, list[str]] = defaultdict(list)
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            by_site[row["Partition_ID"]].append(row["Subject_ID"])
    folders = []
    for i, site in enumerate(sorted(by_site, key=int)):
        folder = tmp / "nodes-data" / f"hospital-{i + 1}"
        folder.mkdir(parents=True)
        for case in by_site[site]:
            (folder / case).symlink_to(tmp / "federation" / case, target_is_directory=True)
        folders.append(folder)
    test = tmp / "test"
    write_federation(test, cases=2, sites=1, shape=shape, seed=99, progress=False)
    return csv_path, test, folders


def deployed(tmp: Path, run_config: dict, folders: list[Path], extra: str = "") -> float:
    """Wall seconds of ``flwr run`` against a TLS + authenticated SuperLink with one SuperNode per folder."""
    creds = tmp / "creds"
    make_ca(creds)
    make_server(creds, [])
    keys = {f.name: make_node_key(creds, f.name)[0] for f in folders}
    nodes = {
        f.name: (keys[f.name], {"data-path": str(f), "site-name": f.name, "state-dir": str(tmp / "state" / f.name)})
        for f in folders
    }
    procs: list = []
    try:
        cli = start_local_federation(
            procs,
            tmp,
            creds,
            nodes,
            port=free_port(),
            node_ports=[free_port() for _ in folders],
            connection="bench",
            threads=CPUS_PER_NODE,  # as each simulated node gets one CPU (Ray sets one thread per actor)
        )
        overrides = " ".join([*(f"{k}={toml_value(v)}" for k, v in run_config.items()), extra])
        start = time.perf_counter()
        run = flwr_cli(["run", ".", "bench", "--stream", "--run-config", overrides], cli, timeout=1800, cwd=ROOT)
        seconds = time.perf_counter() - start
        runs = json.loads(flwr_cli(["ls", "bench", "--format", "json"], cli).stdout).get("runs", [])
        if not runs or runs[0]["status"] != "finished:completed":
            raise RuntimeError(f"deployed run did not complete: {run.stdout[-2000:]}{run.stderr[-2000:]}")
        return seconds
    finally:
        for proc in reversed(procs):
            stop_group(proc)


def phase_means(metrics_jsonl: Path) -> dict[str, float]:
    """Mean seconds per message of every ``*-time-*`` phase over all sites and rounds of a run."""
    sums: dict[str, list[float]] = defaultdict(list)
    for line in metrics_jsonl.read_text().splitlines():
        for site in json.loads(line).get("sites", {}).values():
            for key, value in site.items():
                if "-time-" in key:
                    sums[key].append(float(value))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="tiny", choices=tuple(SHAPES), help="preset (default: tiny)")
    parser.add_argument("--run-config", default="", help="more run config, as flwr run --run-config takes it")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = (args.keep or Path(scratch)).resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        csv_path, test, folders = make_data(tmp, args.nodes, SHAPES[args.model])
        common = {
            "model": args.model,
            "num-server-rounds": args.rounds,
            "local-steps": 2,
            "eval-subsets": "full",
            "min-nodes": args.nodes,
            "test-data-path": str(test),
            "overrides": "train.amp=false data.split.test_fraction=0",
        }
        dep = {**common, "work-dir": str(tmp / "dep-work"), "out-dir": str(tmp / "dep-run")}
        t_dep = deployed(tmp, dep, folders, args.run_config)
        sim = {
            **common,
            "data-path": str(tmp / "federation"),
            "partitioning": str(csv_path),
            "work-dir": str(tmp / "sim-work"),
            "out-dir": str(tmp / "sim-run"),
        }
        result = flower_simulation(
            sim,
            extra=args.run_config,
            nodes=args.nodes,
            cpus_per_node=CPUS_PER_NODE,
            flwr_home=tmp / "sim-flwr",
            log=tmp / "sim.log",
            timeout=1800,
        )
        if not result.completed:
            raise SystemExit(f"simulation did not complete ({result.status}); see {result.log}")
        t_sim = result.seconds

        for run in (dep, sim):  # a round in which a site failed would time less than the same work
            incomplete_rounds(Path(run["out-dir"]) / "metrics.jsonl")
        dep_phases = phase_means(tmp / "dep-run" / "metrics.jsonl")
        sim_phases = phase_means(tmp / "sim-run" / "metrics.jsonl")
        print(f"{args.nodes} nodes x {args.rounds} rounds, {args.model}; --run-config: {args.run_config or '(none)'}")
        print(f"deployed (TLS + node authentication): {t_dep:7.1f} s")
        print(f"simulated (Ray):                      {t_sim:7.1f} s")
        print(f"deployed / simulated:                 {t_dep / t_sim:7.2f}")
        print(f"\n{'phase (s per message)':28}{'deployed':>10}{'simulated':>11}")
        for key in sorted(set(dep_phases) | set(sim_phases)):
            print(f"{key:28}{dep_phases.get(key, 0.0):10.2f}{sim_phases.get(key, 0.0):11.2f}")


if __name__ == "__main__":
    main()
