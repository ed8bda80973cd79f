"""How much each loss term pulls on the student, relative to its segmentation loss, per preset.

For each preset, on phantom crops of the preset's input size, the script builds a teacher and a
student (seeded), and measures for every weighted term of :class:`~mstkd.losses.MSTKDLoss` the L2
norm of its gradient over the student's parameters, divided by that of the student's segmentation
term; at initialisation and again after ``--steps`` training steps. It also reports two facts about
the DMLD KL: its gradient on the student's logits relative to the segmentation loss's, and the
share of its squared gradient carried by the top 0.025 % of voxels (a few voxels dominating it
means noise is being amplified). The consistency term is measured at its full weight (after the
ramp), the others at their configured weights. Numbers are means over ``--batches`` crops.

Usage::

    python benchmarks/grad_scales.py --presets tiny,lite --steps 30 --lr 1e-3
    python benchmarks/grad_scales.py --presets paper --batches 2 --steps 3 --cases 2   # about 14 GB, 10 min on CPU
    python benchmarks/grad_scales.py --presets lite loss.attention_norm=raw loss.attention=1e8   # official form
    python benchmarks/grad_scales.py --presets lite --json simulations/results/phantom-4/grad_scales.json

``--json`` also writes the numbers of the first preset (``{"init": {term: scale}, "after": {...}}``); the
benchmark report reads them beside its per-term arms.

Extra arguments of the form ``key=value`` are config overrides (e.g. ``loss.kl_std_floor=0``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mstkd.atomic import write_text
from mstkd.config import load_config
from mstkd.data.dataset import make_loader, prepare_federation
from mstkd.losses import TERMS, MSTKDLoss, class_targets
from mstkd.modalities import SUBSETS, zero_fill
from mstkd.model import build_networks
from mstkd.phantoms import write_federation
from mstkd.train import Networks, make_optimizers, seed_everything, train_local

PHANTOM_SHAPES = {"tiny": (48, 48, 40), "lite": (96, 96, 64), "paper": (200, 224, 155)}
TOP_SHARE = 0.00025


def phantom_loader(cfg, root: Path, shape: tuple[int, ...], cases: int):
    data = root / f"phantoms-{'x'.join(map(str, shape))}-{cases}"
    if not (data / "partitioning.csv").is_file():
        write_federation(data, cases=cases, sites=1, shape=shape, seed=7, progress=False)
    fed = prepare_federation(data, cfg.data, progress=False)
    entries = [e for s in fed.sites for split in ("train", "val") for e in fed.site_cases(s, split)]
    return make_loader(entries, cfg.data, train=True, patch=cfg.data.patch_size or cfg.model.input_size)


def _norm(grads) -> float:
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def measure(nets: Networks, cfg, batches: list[dict], rng: np.random.Generator) -> dict[str, float]:
    """Mean over ``batches`` of each term's student-gradient norm / the student segmentation term's."""
    loss = MSTKDLoss(cfg.loss, epochs=float(cfg.train.epochs))
    params = [p for p in nets.student.parameters() if p.requires_grad]
    ratios: dict[str, list[float]] = {}
    for batch in batches:
        x, y = batch["image"], class_targets(batch["label"])
        subset = SUBSETS[int(rng.integers(len(SUBSETS)))]
        out_t, out_s = nets.teacher(x), nets.student(zero_fill(x, subset))
        # the consistency term at its full weight: after the ramp, whatever the run length
        terms = loss(out_t, out_s, y, epoch=1e9, discriminator=nets.discriminator)
        norms = {}
        for name, value in terms.items():
            if name == "seg_teacher":
                continue
            norms[name] = _norm(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True))
        seg_logits = torch.autograd.grad(terms["seg_student"], out_s.logits, retain_graph=True)[0]
        if "kl" in terms:
            kl_logits = torch.autograd.grad(terms["kl"], out_s.logits, retain_graph=True)[0]
            per_voxel = (kl_logits.float() ** 2).sum(1).flatten()
            top = max(1, int(TOP_SHARE * per_voxel.numel()))
            norms["kl_on_logits"] = float(kl_logits.norm() / seg_logits.norm().clamp_min(1e-30)) * norms["seg_student"]
            ratios.setdefault("kl_top_share", []).append(float(per_voxel.topk(top).values.sum() / per_voxel.sum()))
        for name, value in norms.items():
            ratios.setdefault(name, []).append(value / max(norms["seg_student"], 1e-30))
        ratios.setdefault("seg_student_norm", []).append(norms["seg_student"])
    return {k: float(np.mean(v)) for k, v in ratios.items()}


def run_preset(preset: str, args, overrides: list[str], root: Path) -> list[tuple[str, dict]]:
    lr = [f"train.lr={args.lr}"] if args.lr is not None else []
    cfg = load_config([f"model={preset}", "train.amp=false", *lr, *overrides])
    seed_everything(args.seed)
    shape = tuple(args.phantom_shape or PHANTOM_SHAPES[preset])
    loader = phantom_loader(cfg, root, shape, args.cases)
    batches = [b for _, b in zip(range(args.batches), loader, strict=False)]
    nets = Networks(*build_networks(cfg.model))
    rng = np.random.default_rng(args.seed)
    rows = [("init", measure(nets, cfg, batches, rng))]
    if args.steps:
        opt = make_optimizers(nets, cfg.train)
        train_local(nets, opt, loader, cfg, steps=args.steps, epoch=0.0, rng=rng, progress=True, desc=preset)
        del opt  # the Adam moments of two `paper` networks are 3.7 GB the measurement does not need
        rows.append((f"after {args.steps} steps", measure(nets, cfg, batches, rng)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,lite", help="comma-separated presets (default tiny,lite)")
    parser.add_argument("--batches", type=int, default=4, help="crops to average over (default 4)")
    parser.add_argument("--steps", type=int, default=30, help="training steps before the second measurement")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases to draw crops from")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of those steps (default: train.lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=None, help="phantom grid (default per preset)")
    parser.add_argument("--work-dir", default=None, help="where phantoms go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the first preset's numbers to this JSON file")
    args, overrides = parser.parse_known_args(argv)
    torch.set_grad_enabled(True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work_dir or tmp)
        for preset in args.presets.split(","):
            start = time.perf_counter()
            rows = run_preset(preset, args, overrides, root)
            names = [t for t in TERMS if t != "seg_teacher" and t in rows[0][1]]
            print(f"\n### {preset} (gradient norm on the student / student segmentation's)\n")
            print("| when | " + " | ".join(names) + " | KL on logits | KL top-0.025% share | seg norm |")
            print("|---" * (len(names) + 4) + "|")
            for when, r in rows:
                cells = " | ".join(f"{r[n]:.3g}" for n in names)
                extra = f"{r.get('kl_on_logits', float('nan')):.3g} | {r.get('kl_top_share', float('nan')):.2f}"
                print(f"| {when} | {cells} | {extra} | {r['seg_student_norm']:.3g} |")
            print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            if args.json and preset == args.presets.split(",")[0]:
                record = {
                    "preset": preset,
                    "steps": args.steps,
                    "batches": args.batches,
                    "overrides": overrides,
                    "command": " ".join(
                        ["python benchmarks/grad_scales.py", *(argv if argv is not None else sys.argv[1:])]
                    ),
                    "init": rows[0][1],
                    "after": rows[-1][1],
                }
                write_text(Path(args.json), json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
