"""The main job: the default federated demo, end to end, with ``flwr run``.

A phantom federation of three non-IID sites is generated once (under ``--work-dir``), then
Flower's simulation runs the app's default run config: each site trains an MST-KDNet
teacher-student pair (``lite`` preset) on its own cases, the server averages the students and
style discriminators, and scores the global student on held-out cases under all 15 modality
subsets. The run folder gets ``REPORT.md``, ``metrics.csv``, ``dice.png``, checkpoints and
the 15-subset tables.

Usage: ``python -m simulations.demo [--out runs/demo] [--nodes 3] [--run-config "num-server-rounds=3"]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from server.phases import FILE, phases_line
from simulations.launch import ROOT, exit_on_sigterm, flower_simulation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="parent of the run folder")
    parser.add_argument("--work-dir", default=str(ROOT / ".cache" / "mstkd"), help="phantoms, caches, node state")
    parser.add_argument("--nodes", type=int, default=3, help="simulated sites (default 3)")
    parser.add_argument("--run-config", default="", help='extra run config, e.g. "num-server-rounds=3 model=tiny"')
    args = parser.parse_args(argv)
    exit_on_sigterm()  # kill <pid> stops the Flower processes too, as Ctrl-C does

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (Path(args.out) / stamp).resolve()
    run_config = {"out-dir": str(out), "work-dir": str(Path(args.work_dir).resolve()), "min-nodes": args.nodes}
    print(f"federated demo: {args.nodes} phantom sites, run folder {out}", file=sys.stderr)
    result = flower_simulation(
        run_config,
        extra=args.run_config,
        nodes=args.nodes,
        flwr_home=Path(args.work_dir) / "flwr-home",
        log=out / "flwr.log",
        echo=True,
    )
    if not result.completed:
        print(f"error: the run ended as {result.status} ({result.details}); see {result.log}", file=sys.stderr)
        return 1
    phases = out / FILE
    if phases.is_file():  # the server app's phases, and what came before it (flwr run, Ray, starting the app)
        spent = json.loads(phases.read_text())
        before = max(result.seconds - spent["total"], 0.0)
        print(f"start-up before the server app {before:.0f} s; {phases_line(spent)}")
    print(f"\ndone in {result.seconds:.0f} s (flwr run {result.run_id}). Report: {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
