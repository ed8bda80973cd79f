"""Size of a site's node state (``local.pt``) per preset: as the default stores it, with the student's
Adam moments kept, and in half precision.

Usage: ``python benchmarks/bench_node_state.py [--presets tiny,lite,paper] [--sites 33]``.
A site keeps its teacher, the Adam moments of teacher and student (one optimiser over both),
the discriminator's Adam moments and its subset generator; with ``train.student_moments=reset``
(the default) the student's moments are dropped before saving, since the next round resets
them, and ``train.state_precision=half`` stores the teacher in float16 and every moment in bfloat16.
``local.prev.pt`` doubles the figure once a second round has run. Prints MB per site and
GB / GiB for a federation of ``--sites`` sites with both files.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def state_bytes(preset: str, *, keep_student_moments: bool, precision: str = "full") -> int:
    from client.state import SiteState
    from mstkd.config import load_config
    from mstkd.model import build_networks
    from mstkd.train import Networks, make_optimizers, reset_optimizer_state

    cfg = load_config([f"model={preset}"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    for opt, modules in (
        (optimizers.main, (nets.teacher, nets.student)),
        (optimizers.discriminator, (nets.discriminator,)),
    ):
        for m in modules:  # one zero-gradient step gives every parameter its Adam moments
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
        opt.step()
    if not keep_student_moments:
        reset_optimizer_state(optimizers.main, nets.student)
    with tempfile.TemporaryDirectory() as tmp:
        state = SiteState(tmp, precision)
        state.save(nets, optimizers, np.random.default_rng(0), {"round": 1, "rounds": 1, "epoch": 1.0})
        return (Path(tmp) / "local.pt").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,lite,paper")
    parser.add_argument("--sites", type=int, default=33)
    args = parser.parse_args()
    n = args.sites
    print(
        f"{'preset':8}{'kept MB':>10}{'default MB':>12}{'half MB':>10}{'ratio':>7}"
        f"{f'{n} sites x2, default':>24}{f'{n} sites x2, half':>24}"
    )
    for preset in args.presets.split(","):
        kept = state_bytes(preset, keep_student_moments=True)
        reset = state_bytes(preset, keep_student_moments=False)
        lean = state_bytes(preset, keep_student_moments=False, precision="half")
        totals = [f"{2 * n * b / 1e9:.1f} GB = {2 * n * b / 2**30:.1f} GiB" for b in (reset, lean)]
        print(
            f"{preset:8}{kept / 1e6:10.1f}{reset / 1e6:12.1f}{lean / 1e6:10.1f}{lean / reset:7.2f}"
            f"{totals[0]:>24}{totals[1]:>24}"
        )


if __name__ == "__main__":
    main()
