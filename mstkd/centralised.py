"""Centralised MST-KDNet training: every site's training cases pooled on one machine (the non-federated reference).

Writes into the run folder: ``config.yaml`` (resolved), ``log.jsonl`` (one line per epoch:
loss terms, the share of crop voxels the student put in each class, lr, seconds, validation
scores and any collapse flagged on them, when run), ``last.pt`` and ``best.pt`` (one-file
checkpoints of the student; best by mean validation Dice over ``train.eval_subsets``), and
``val_epoch<N>.md`` tables.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from mstkd.atomic import copy_file
from mstkd.checkpoint import save_checkpoint
from mstkd.config import save_config
from mstkd.data.dataset import Federation, make_loader, prepare_federation
from mstkd.evaluate import describe_collapse, evaluate_cases, parse_subsets
from mstkd.modalities import SUBSETS
from mstkd.model import build_networks
from mstkd.train import Networks, make_optimizers, pick_device, seed_everything, train_local


def _convention(federation: Federation) -> str:
    names = {e.meta["convention"] for e in federation.entries.values()}
    return names.pop() if len(names) == 1 else "fets"


def train_centralised(
    data_dir: str | Path,
    cfg: DictConfig,
    out_dir: str | Path,
    *,
    partitioning: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Train on all sites' training cases pooled; validate on their validation cases; return the run folder."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    seed_everything(int(cfg.train.seed))
    device = pick_device()
    print(f"device: {device}", file=sys.stderr)

    federation = prepare_federation(data_dir, cfg.data, partitioning=partitioning, progress=progress)
    train_cases = [e for s in federation.sites for e in federation.site_cases(s, "train")]
    val_cases = [e for s in federation.sites for e in federation.site_cases(s, "val")]
    loader = make_loader(
        train_cases,
        cfg.data,
        train=True,
        patch=cfg.data.patch_size or cfg.model.input_size,
        batch_size=int(cfg.train.batch_size),
    )
    steps = cfg.train.steps_per_epoch
    steps = int(steps) if steps else len(loader)

    nets = Networks(*build_networks(cfg.model)).to(device)
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(int(cfg.train.seed))
    subsets = parse_subsets(cfg.train.eval_subsets)
    convention = _convention(federation)
    best = -1.0
    log = out / "log.jsonl"
    log.unlink(missing_ok=True)
    for epoch in range(int(cfg.train.epochs)):
        start = time.perf_counter()
        metrics = train_local(
            nets,
            optimizers,
            loader,
            cfg,
            steps=steps,
            epoch=float(epoch),
            rng=rng,
            device=device,
            subsets=SUBSETS,
            progress=progress,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        )
        record = {"epoch": epoch + 1, **metrics}
        last_epoch = epoch + 1 == int(cfg.train.epochs)
        if val_cases and ((epoch + 1) % int(cfg.train.eval_every) == 0 or last_epoch):
            result = evaluate_cases(
                nets.student, val_cases, cfg, subsets=subsets, device=device, progress=progress, desc="validate"
            )
            result.write(out, stem=f"val_epoch{epoch + 1}")
            record["val"] = result.summary()
            record["collapse"] = [describe_collapse(hit) for hit in result.collapse()]
            for what in record["collapse"]:
                print(f"WARNING epoch {epoch + 1}: collapse on the validation cases: {what}", file=sys.stderr)
            if result.mean_dice() > best:
                best = result.mean_dice()
                save_checkpoint(
                    out / "best.pt",
                    nets.student,
                    cfg,
                    convention=convention,
                    extra={"epoch": epoch + 1, "val_mean_dice": best},
                )
        save_checkpoint(out / "last.pt", nets.student, cfg, convention=convention, extra={"epoch": epoch + 1})
        record["wall_seconds"] = time.perf_counter() - start
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        val = f", val mean Dice {record['val']['mean_dice']:.3f}" if "val" in record else ""
        print(f"epoch {epoch + 1}: loss {metrics['loss']:.3f}{val} ({record['wall_seconds']:.0f} s)", file=sys.stderr)
    if not (out / "best.pt").exists():
        copy_file(out / "last.pt", out / "best.pt")
    return out
