"""Memory and disk of a federated simulation with many sites: one round of a scenario through ``flwr run``.

Usage::

    python benchmarks/bench_federation_memory.py fets-partitioning-2            # 33 phantom sites, lite
    python benchmarks/bench_federation_memory.py fets-partitioning-1 --preset tiny

While the run goes, the script samples every 0.5 s the machine's used memory (above what was
used before the start) and the resident memory of each process of the run (SuperLink,
simulation engine, Ray node actors, ServerApp). It prints the peaks, the node state on disk
(teachers and optimiser states of all sites) and the wall time. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulations.launch import flower_simulation  # noqa: E402
from simulations.scenario import ARMS, load_scenario, scenario_data  # noqa: E402

KINDS = {
    "ClientAppActor": "node actor (Ray)",
    "flwr-simulation": "simulation engine (ServerApp)",
    "flower-superlink": "SuperLink",
    "raylet": "Ray runtime",
}


def _used_bytes() -> int:
    """Memory in use on the machine: MemTotal - MemAvailable (``/proc/meminfo``)."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def _processes() -> dict[str, int]:
    """Largest resident memory per kind of process of a run, in bytes."""
    out: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            continue
        kind = next((k for needle, k in KINDS.items() if needle in text), None)
        if kind is None and "flwr-serverapp" in text:
            kind = "ServerApp"
        rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        if kind is not None:
            out[kind] = max(out.get(kind, 0), rss)
    return out


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
    data = scenario_data(scenario, work)
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
        **data.run_paths(),
    }
    print(f"{scenario.name}: {scenario.num_sites} sites, {data.description}; preset {args.preset}", file=sys.stderr)

    baseline = _used_bytes()
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
        peak_total = max(peak_total, _used_bytes() - baseline)
        for kind, rss in _processes().items():
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
