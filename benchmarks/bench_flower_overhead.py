"""Flower overhead: wall time of ``flwr run`` (simulation) vs the same rounds run in one process.

Both runs use the same run config, phantom federation and seeds, so they do the same local
steps and the same evaluations; the in-process run calls the ServerApp and ClientApps directly
(no SuperLink, no Ray, no serialisation across processes). Prints both times and the ratio.

Usage: ``python benchmarks/bench_flower_overhead.py [--nodes 3] [--run-config "num-server-rounds=2"]``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.app import app as client_app  # noqa: E402
from server.app import app as server_app  # noqa: E402
from simulations.launch import flower_simulation  # noqa: E402
from tests.helpers import pyproject_run_config, run_inproc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--run-config", default="", help="overrides, TOML values, e.g. 'num-server-rounds=2'")
    args = parser.parse_args()
    extra = tomllib.loads("\n".join(shlex.split(args.run_config)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {**pyproject_run_config(), **extra, "min-nodes": args.nodes, "work-dir": str(tmp / "work")}
        # generate the phantoms outside both timings
        from mstkd.data.sites import data_source
        from mstkd.runconfig import RunConfig

        data_source(RunConfig.parse(base), args.nodes)
        start = time.perf_counter()
        run_inproc(
            server_app,
            client_app,
            {**base, "out-dir": str(tmp / "inproc")},
            [{"partition-id": i, "num-partitions": args.nodes} for i in range(args.nodes)],
        )
        inproc = time.perf_counter() - start
        flower = flower_simulation(
            {**base, "out-dir": str(tmp / "flwr")}, nodes=args.nodes, flwr_home=tmp / "flwr-home", log=tmp / "flwr.log"
        )
        if not flower.completed:
            raise SystemExit(f"flwr run ended as {flower.status}: {flower.details}")
    print(f"{args.nodes} nodes, run config {args.run_config or '(defaults)'}")
    print(f"in one process (no Flower runtime)   {inproc:8.1f} s")
    print(f"flwr run (simulation engine)         {flower.seconds:8.1f} s")
    print(f"overhead ratio                       {flower.seconds / inproc:8.2f}")


if __name__ == "__main__":
    main()
