"""Training and inference cost of a preset: MST-KDNet step vs student-only step, peak memory, predict time.

Usage: ``python benchmarks/bench_train.py [--preset lite] [--crop 64] [--steps 6] [--skip-predict]``.
Each measurement runs in its own process so that peak memory (CPU: peak RSS; CUDA: peak
allocated) belongs to it alone. Prints seconds and the ratio measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_step(preset: str, mode: str, crop: tuple[int, int, int], steps: int) -> dict:
    """Median seconds of one training step (after one warm-up step) in ``train.mode=mode``."""
    import torch

    from mstkd.config import load_config
    from mstkd.model import build_networks
    from mstkd.train import Networks, make_optimizers, pick_device, train_local

    cfg = load_config([f"model={preset}", f"train.mode={mode}"])
    device = pick_device()
    torch.manual_seed(0)
    nets = Networks(*build_networks(cfg.model)).to(device)
    opt = make_optimizers(nets, cfg.train)
    x = torch.randn(1, 4, *crop)
    y = (torch.rand(1, 3, *crop) > 0.9).float()
    batch = [{"image": x, "label": y}]
    train_local(nets, opt, batch, cfg, steps=1, device=device, progress=False)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(train_local(nets, opt, batch, cfg, steps=1, device=device, progress=False)["seconds"])
    return {"seconds": float(np.median(times)), "peak_bytes": _peak_bytes(device), "device": str(device)}


def measure_predict(preset: str) -> dict:
    """Seconds and peak memory of ``predict`` on one 240x240x155 phantom case with an untrained student."""
    import torch

    from mstkd.checkpoint import save_checkpoint
    from mstkd.config import load_config
    from mstkd.infer import predict_case
    from mstkd.model import build_networks
    from mstkd.phantoms import write_federation

    cfg = load_config([f"model={preset}"])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_federation(data, cases=1, sites=1, shape=(240, 240, 155), seed=0, progress=False)
        case = next(p for p in data.iterdir() if p.is_dir())
        ckpt = save_checkpoint(Path(tmp) / "s.pt", build_networks(cfg.model)[1], cfg)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = predict_case(ckpt, case, Path(tmp) / "seg.nii.gz")
        seconds = time.perf_counter() - start
    from mstkd.train import pick_device

    return {"seconds": seconds, "inner_seconds": summary["seconds"], "peak_bytes": _peak_bytes(pick_device())}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--crop", type=int, nargs="+", default=[64], help="edge, or X Y Z (paper: 160 192 128)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "step":
            crop = tuple(int(v) for v in rest[2].split("x"))
            result = measure_step(rest[0], rest[1], crop, int(rest[3]))  # type: ignore[arg-type]
        else:
            result = measure_predict(rest[0])
        print(json.dumps(result))
        return

    crop = args.crop * 3 if len(args.crop) == 1 else args.crop
    shape = "x".join(str(v) for v in crop)
    full = _child(["step", args.preset, "mstkd", shape, str(args.steps)])
    student = _child(["step", args.preset, "student", shape, str(args.steps)])
    gib = 1024**3
    print(f"preset {args.preset}, crop {shape}, device {full['device']}, median of {args.steps} steps")
    print(
        f"MST-KDNet step (teacher+student+discriminator, all losses)  {full['seconds']:7.3f} s   "
        f"peak {full['peak_bytes'] / gib:.2f} GiB"
    )
    print(
        f"student-only step (segmentation loss)                         {student['seconds']:7.3f} s   "
        f"peak {student['peak_bytes'] / gib:.2f} GiB"
    )
    print(
        f"ratio MST-KDNet / student-only                                {full['seconds'] / student['seconds']:7.2f}"
        f"   (target <= 2.3)"
    )
    if not args.skip_predict:
        pred = _child(["predict", args.preset])
        print(
            f"predict 240x240x155 (all four modalities, load+infer+write)   {pred['seconds']:7.1f} s   "
            f"peak {pred['peak_bytes'] / gib:.2f} GiB"
        )


if __name__ == "__main__":
    main()
