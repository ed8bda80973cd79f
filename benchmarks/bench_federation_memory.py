"""Memory and disk of a federated simulation with many sites: one round of a scenario through ``flwr run``.

Usage::

    python benchmarks/bench_federation_memory.py fets-partitioning-2            # 33 phantom sites, lite
    python benchmarks/bench_federation_memory.py fets-partitioning-1 --preset tiny

While the run goes, the script samples every 0.5 s the machine's used memory (above what was
used before the start) and the resident memory of each process of the run (SuperLink,
simulation engine, Ray node actors, ServerApp). It prints the peaks, the node state on disk
(teachers and optimiser states of all sites) and the wall time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulations.launch import flower_simulation  # noqa: E402
from simulations.scenario import ARMS, load_scenario, scenario_data  # noqa: E402

KINDS = {"ClientAppActor": "node actor", "flwr-simulation": "simulation engine", "flower-superlink": "SuperLink"}


def _kind(proc: psutil.Process) -> str | None:
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except (psutil.Error, OSError):
        return None
    for needle, kind in KINDS.items():
        if needle in text:
            return kind
    if "flwr-serverapp" in text or "serverapp" in text.lower():
        return "ServerApp"
    if "ray" in text and "raylet" in text:
        return "Ray runtime"
    return None


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", help="e.g. fets-partitioning-2")
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--eval-cases", type=int, default=4, help="held-out cases the server scores (all four only)")
    parser.add_argument("--work-dir", default=str(ROOT / ".cache" / "mstkd"))
    args = parser.parse_args()

    scenario = load_scenario(args.scenario)
    work = Path(args.work_dir).resolve()
    data, csv, description = scenario_data(scenario, work)
    out = ROOT / "runs" / "memory" / f"{scenario.name}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_name = f"memory-{scenario.name}-{args.preset}"
    run = {
        **scenario.arm_run_config(ARMS["mstkd"], seed=0),
        "model": args.preset,
        "num-server-rounds": args.rounds,
        "eval-cases": args.eval_cases,
        "eval-subsets": "full",
        "eval-initial": False,
        "out-dir": str(out),
        "work-dir": str(work),
        "run-name": run_name,
        "data-path": str(data),
        "partitioning": str(csv or ""),
    }
    print(f"{scenario.name}: {scenario.num_sites} sites, {description}; preset {args.preset}", file=sys.stderr)

    baseline = psutil.virtual_memory().used
    peaks: dict[str, int] = {}
    peak_total = 0
    done = threading.Event()
    result = {}

    def go() -> None:
        try:
            result["run"] = flower_simulation(
                run, nodes=scenario.num_sites, flwr_home=work / "flwr-home", log=out / "flwr.log", timeout=3 * 3600
            )
        finally:
            done.set()

    shutil.rmtree(work / "nodes" / run_name, ignore_errors=True)  # count this run's node state only

    worker = threading.Thread(target=go)
    start = time.perf_counter()
    worker.start()
    while not done.wait(0.5):
        peak_total = max(peak_total, psutil.virtual_memory().used - baseline)
        by_kind: dict[str, int] = {}
        for proc in psutil.process_iter():
            kind = _kind(proc)
            if kind is None:
                continue
            try:
                rss = proc.memory_info().rss
            except (psutil.Error, OSError):
                continue
            by_kind[kind] = max(by_kind.get(kind, 0), rss)
        for kind, rss in by_kind.items():
            peaks[kind] = max(peaks.get(kind, 0), rss)
    worker.join()
    seconds = time.perf_counter() - start
    if "run" not in result:
        return 1
    flower = result["run"]
    state = _folder_bytes(work / "nodes" / run_name)
    sites = len(list((work / "nodes" / run_name).glob("*"))) if state else 0
    print(f"\nflwr run: {flower.status} in {seconds:.0f} s ({args.rounds} round(s), {scenario.num_sites} sites)")
    print(f"peak machine memory above baseline: {peak_total / 2**30:.2f} GiB")
    for kind, rss in sorted(peaks.items()):
        print(f"  peak RSS, largest {kind} process: {rss / 2**30:.2f} GiB")
    if sites:
        print(
            f"node state on disk: {state / 2**20:.1f} MiB for {sites} sites ({state / sites / 2**20:.1f} MiB per site)"
        )
    return 0 if flower.completed else 1


if __name__ == "__main__":
    sys.exit(main())
