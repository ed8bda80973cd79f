"""Flower ClientApp: one node = one institution, a thin adapter over ``mstkd.train`` and ``mstkd.evaluate``.

``train``: load the global student and discriminator, restore the site's teacher, optimisers
and subset generator from the node's state folder (on disk, so a federation of many simulated
sites does not hold every teacher in memory, and a restarted node resumes), train locally,
save the local state, and reply with the student + discriminator only.
``evaluate``: score the global student on the site's validation cases.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mstkd.data.dataset import make_loader
from mstkd.data.labels import REGIONS
from mstkd.evaluate import evaluate_cases, parse_subsets
from mstkd.federated import SiteState, config_from_run, default_home, federated_arrays, load_federated_arrays, site_data
from mstkd.losses import TERMS
from mstkd.model import MSTKDNet, build_discriminator
from mstkd.train import Networks, make_optimizers, pick_device, seed_everything, train_local

TRAIN_METRICS = ("loss", *TERMS, "disc_loss", "proximal")
"""Every train reply carries all of these (0.0 when a term is off), so all sites send the same keys."""

log = logging.getLogger("mstkd.client")
app = ClientApp()


def _state_folder(context: Context, site_name: str) -> Path:
    """``<state-dir or work-dir or ~/.mstkd>/nodes/<run-name or run id>/<site>``: one folder per run and site."""
    base = context.node_config.get("state-dir") or context.run_config.get("work-dir") or default_home()
    run_name = str(context.run_config.get("run-name", "") or f"run-{context.run_id}")
    return Path(str(base)).expanduser() / "nodes" / run_name / site_name


def _setup(msg: Message, context: Context):
    """Run config, project config, site data, device, seed, and the student + discriminator holding the global
    weights."""
    run = dict(context.run_config)
    cfg = config_from_run(run)
    data = site_data(run, context.node_config, cfg)
    device = pick_device()
    # distinct per site and per round: a node must not redraw the same crops every round
    seed = int(cfg.train.seed) + 1000 * int(context.node_config.get("partition-id", 0))
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    seed_everything(seed + int(config.get("server-round", 0)))
    student, disc = MSTKDNet(cfg.model), build_discriminator(cfg.model)
    load_federated_arrays(student, disc, {k: v.numpy() for k, v in msg.content["arrays"].items()})
    return run, cfg, data, device, seed, student, disc


def _reply_arrays(nets: Networks, transport: str) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in federated_arrays(nets.student, nets.discriminator, transport).items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    run, cfg, data, device, seed, student, disc = _setup(msg, context)
    nets = Networks(MSTKDNet(cfg.model), student, disc).to(device)
    config = msg.content["config"]
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(seed)
    state = SiteState(_state_folder(context, data.name))
    info = {"rounds": 0, "epoch": 0.0}
    if state.exists():
        info = state.load(nets, optimizers, rng)
    if not data.train:
        raise RuntimeError(f"{data.name}: no training cases")
    loader = make_loader(
        data.train,
        cfg.data,
        train=True,
        patch=cfg.data.patch_size or cfg.model.input_size,
        batch_size=int(cfg.train.batch_size),
    )
    local_epochs = float(run.get("local-epochs", 1))
    steps = int(run.get("local-steps", 0)) or max(1, round(local_epochs * len(loader)))
    epoch = float(config.get("epoch", info["epoch"]))
    log.info(
        "%s: training %d steps on %d cases (device %s, round %s)",
        data.name,
        steps,
        len(data.train),
        device,
        config.get("server-round"),
    )
    metrics = train_local(
        nets,
        optimizers,
        loader,
        cfg,
        steps=steps,
        epoch=epoch,
        rng=rng,
        device=device,
        subsets=data.subsets,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        progress=False,
        desc=data.name,
    )
    info = {"rounds": info["rounds"] + 1, "epoch": metrics["epoch"]}
    state.save(nets, optimizers, rng, info)
    reply = {
        "num-examples": len(data.train),
        **{f"train-{k}": float(metrics.get(k, 0.0)) for k in TRAIN_METRICS},
        "train-steps": steps,
        "train-seconds": float(metrics["seconds"]),
        "client-seconds": time.perf_counter() - start,
    }
    content = RecordDict(
        {
            "arrays": _reply_arrays(nets, str(run.get("transport", "float16"))),
            "metrics": MetricRecord(reply),
            "site": ConfigRecord({"name": data.name, "device": str(device), "modalities": data.available.name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    run, cfg, data, device, _, student, _ = _setup(msg, context)
    # "full" means everything this site has; subsets it cannot form are skipped
    wanted = parse_subsets(str(run.get("site-eval-subsets", "full")))
    subsets = [s for s in wanted if s.issubset(data.available)] or [data.available]
    metrics: dict[str, float | int] = {"num-examples": len(data.val)}
    if data.val:
        result = evaluate_cases(student, data.val, cfg, subsets=subsets, device=device, progress=False)
        summary = result.summary()
        metrics.update({f"val-dice-{r}": float(summary[f"{r}_dice"]) for r in REGIONS})
        metrics["val-mean-dice"] = float(summary["mean_dice"])
    else:
        metrics.update({f"val-dice-{r}": 0.0 for r in REGIONS} | {"val-mean-dice": 0.0})
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": data.name})})
    return Message(content=content, reply_to=msg)
