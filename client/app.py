"""Flower ClientApp: one node = one institution, a thin adapter over ``mstkd.train`` and ``mstkd.evaluate``.

``train``: load the global student and discriminator, restore the site's teacher, optimisers
and subset generator from the node's state folder (on disk, so a federation of many simulated
sites does not hold every teacher in memory, and a restarted node resumes), train locally,
save the local state, and reply with the student + discriminator only.
``evaluate``: score the global student on the site's validation cases.

Mods: ``secagg_mod`` runs Flower's SecAgg+ protocol when the server asks for secure aggregation
(``secagg=true``; :mod:`client.secagg`), ``clip_updates`` clips the update for client-side
differential privacy (``dp='client'``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # the key fixedclipping_mod reads

from client.secagg import is_secagg_fit, secagg_mod, secagg_train
from mstkd.data.dataset import make_loader
from mstkd.data.labels import CLASSES, REGIONS
from mstkd.errors import InputError
from mstkd.evaluate import describe_collapse, evaluate_cases, parse_subsets
from mstkd.federated import (
    TRANSPORT_DTYPES,
    SiteState,
    config_from_run,
    default_home,
    federated_arrays,
    load_federated_arrays,
    site_data,
)
from mstkd.losses import TERMS
from mstkd.model import MSTKDNet, build_discriminator
from mstkd.train import (
    Networks,
    make_optimizers,
    pick_device,
    reset_optimizer_state,
    seed_everything,
    train_local,
)

TRAIN_METRICS = ("loss", *TERMS, "disc_loss", "proximal", *(f"fg_{c}" for c in CLASSES))
"""Every train reply carries all of these as ``train-<name>`` (0.0 when a term is off), so all sites send the same
keys; ``fg_<class>`` is the share of training-crop voxels the student put in each class."""

log = logging.getLogger("mstkd.client")

LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(node_config: Mapping[str, Any]) -> None:
    """Site logs on stderr: INFO in deployment (a node started with a ``data-path``), WARNING in
    simulation, where many sites share one terminal; the node config ``log-level`` overrides both."""
    default = "info" if "data-path" in node_config and "partition-id" not in node_config else "warning"
    level = str(node_config.get("log-level", default)).lower()
    if level not in LOG_LEVELS:
        raise InputError(f"node config log-level={level!r}: choose one of {', '.join(LOG_LEVELS)}")
    root = logging.getLogger("mstkd")
    root.setLevel(level.upper())
    if not any(getattr(h, "mstkd_site", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.mstkd_site = True  # one handler however many messages this process serves
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)


def clip_updates(msg: Message, context: Context, call_next) -> Message:
    """Client-side differential privacy: clip this site's update (Flower's ``fixedclipping_mod``) on train
    messages that carry a clipping norm, i.e. when the server runs ``dp='client'``; pass everything else."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secagg_mod, clip_updates])


def _state_folder(context: Context, site_name: str, key: str = "") -> Path:
    """``<state-dir or work-dir or ~/.mstkd>/nodes/<key>/<site>``: one folder per run and site.

    ``key`` comes from the server (``state-key``: the run name or the first run's id, kept when a run
    is resumed under a new run id); without it, the run name or this run's id."""
    base = context.node_config.get("state-dir") or context.run_config.get("work-dir") or default_home()
    key = key or str(context.run_config.get("run-name", "") or f"run-{context.run_id}")
    return Path(str(base)).expanduser() / "nodes" / key / site_name


def _setup(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], context: Context, clock: Stopwatch):
    """Run config, project config, site data, device, seed, and the student + discriminator holding ``arrays``."""
    configure_logging(context.node_config)
    run = dict(context.run_config)
    cfg = config_from_run(run)
    clock.lap("config")
    data = site_data(run, context.node_config, cfg)
    clock.lap("data")
    device = pick_device()
    # distinct per site and per round: a node must not redraw the same crops every round
    seed = int(cfg.train.seed) + 1000 * int(context.node_config.get("partition-id", 0))
    seed_everything(seed + int(config.get("server-round", 0)))
    student, disc = MSTKDNet(cfg.model), build_discriminator(cfg.model)
    load_federated_arrays(student, disc, arrays)
    return run, cfg, data, device, seed, student, disc


class Stopwatch:
    """Seconds spent in each phase of one message, sent back as ``<stage>-time-<phase>`` metrics
    (``train-time-data``, ``val-time-evaluate``, ...).

    ``<stage>-time-startup`` is the age of this process when its first message arrived: interpreter
    start, imports and Flower's own set-up. A deployed SuperNode starts one process per message, so
    every message pays it; a simulation's Ray workers start once per run, and report 0.
    """

    def __init__(self, stage: str) -> None:
        global _SERVED
        self.prefix = f"{stage}-time-"
        first = not _SERVED and _ray_node() is None  # a Ray worker's age would include its idle time
        self.times: dict[str, float] = {f"{self.prefix}startup": _process_age() if first else 0.0}
        _SERVED = True
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to ``phase``."""
        now = time.perf_counter()
        key = self.prefix + phase
        self.times[key] = self.times.get(key, 0.0) + now - self._last
        self._last = now


_SERVED = False  # has this process handled a message yet


def _process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0.0 where it cannot be read)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)


def _ray_node() -> str | None:
    """The Ray node this message runs on in a simulation (a Ray cluster spreads sites over many); None outside
    Ray. A deployed site reports nothing about its machine: its site name is all the server needs."""
    ray = sys.modules.get("ray")  # imported by the simulation engine's workers, never by this module
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def local_round(
    arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], context: Context, transport: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, float | int], dict[str, str]]:
    """One round of local training from the global ``arrays``: the updated student + discriminator arrays,
    the scalar metrics and the site's name, device and modalities (everything a reply carries)."""
    start = time.perf_counter()
    clock = Stopwatch("train")
    run, cfg, data, device, seed, student, disc = _setup(arrays, config, context, clock)
    nets = Networks(MSTKDNet(cfg.model), student, disc).to(device)
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(seed)
    server_round = int(config.get("server-round", 0))
    state = SiteState(
        _state_folder(context, data.name, str(config.get("state-key", ""))), str(cfg.train.state_precision)
    )
    clock.lap("build")
    info = state.load(nets, optimizers, rng, before_round=server_round) or {"rounds": 0, "epoch": 0.0}
    clock.lap("state-load")
    moments = str(cfg.train.student_moments)  # keep | reset, checked with the config
    if moments == "reset":  # the kept moments belong to the site's last student, not to the new global one
        reset_optimizer_state(optimizers.main, nets.student)
    if not data.train:
        skipped = len(data.federation.skipped)
        raise RuntimeError(f"{data.name}: no usable training case ({skipped} left out as broken; see the node log)")
    loader = make_loader(
        data.train,
        cfg.data,
        train=True,
        patch=cfg.data.patch_size or cfg.model.input_size,
        batch_size=int(cfg.train.batch_size),
    )
    clock.lap("loader")
    local_epochs = float(run.get("local-epochs", 1))
    steps = int(run.get("local-steps", 0)) or max(1, round(local_epochs * len(loader)))
    epoch = float(config.get("epoch", info["epoch"]))
    log.info(
        "%s: training %d steps on %d cases (device %s, round %s)",
        data.name,
        steps,
        len(data.train),
        device,
        server_round,
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
    clock.lap("train")
    log.info(
        "%s: round %s trained, loss %.3f, predicted class shares %s",
        data.name,
        server_round,
        metrics["loss"],
        ", ".join(f"{c} {metrics[f'fg_{c}']:.3f}" for c in CLASSES),
    )
    info = {"rounds": info["rounds"] + 1, "epoch": metrics["epoch"], "round": server_round}
    if moments == "reset":  # the next round resets them anyway: not worth 40 % of the state on disk
        reset_optimizer_state(optimizers.main, nets.student)
    state.save(nets, optimizers, rng, info)
    clock.lap("state-save")
    reply = {
        "num-examples": len(data.train),
        **{f"train-{k}": float(metrics.get(k, 0.0)) for k in TRAIN_METRICS},
        "train-steps": steps,
        "train-seconds": float(metrics["seconds"]),
        "skipped-cases": len(data.federation.skipped),
    }
    site = {"name": data.name, "device": str(device), "modalities": data.available.name}
    if node := _ray_node():
        site["ray-node"] = node
    wire = TRANSPORT_DTYPES[transport or str(run.get("transport", "float16"))]
    updated = federated_arrays(nets.student, nets.discriminator, "float32")
    # the L2 norm of this site's update: what a DP clipping norm is compared with
    reply["update-norm"] = float(
        np.sqrt(sum(np.sum((updated[k] - np.asarray(v, np.float32)) ** 2, dtype=np.float64) for k, v in arrays.items()))
    )
    wired = {k: v.astype(wire, copy=False) for k, v in updated.items()}
    clock.lap("reply")
    reply["client-seconds"] = time.perf_counter() - start
    return wired, reply | clock.times, site


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secagg_fit(msg):
        return secagg_train(msg, context, local_round)
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    updated, metrics, site = local_round(arrays, dict(msg.content["config"]), context)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in updated.items()}),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord(site),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    clock = Stopwatch("val")
    run, cfg, data, device, _, student, _ = _setup(
        {k: v.numpy() for k, v in msg.content["arrays"].items()}, config, context, clock
    )
    clock.lap("build")
    # "full" means everything this site has; subsets it cannot form are skipped
    wanted = parse_subsets(str(run.get("site-eval-subsets", "full")))
    subsets = [s for s in wanted if s.issubset(data.available)] or [data.available]
    metrics: dict[str, float | int] = {"num-examples": len(data.val)}
    site = {"name": data.name}
    if data.val:
        result = evaluate_cases(student, data.val, cfg, subsets=subsets, device=device, progress=False)
        summary = result.summary()
        metrics.update({f"val-dice-{r}": float(summary[f"{r}_dice"]) for r in REGIONS})
        metrics.update({f"val-share-{r}": float(summary[f"{r}_share_max"]) for r in REGIONS})
        metrics["val-mean-dice"] = float(summary["mean_dice"])
        hits = result.collapse()
        metrics["val-collapsed"] = float(len(hits))
        if hits:
            site["val-collapse"] = "; ".join(describe_collapse(h) for h in hits)
            log.warning("%s: collapse on its validation cases: %s", data.name, site["val-collapse"])
    else:
        metrics.update({f"val-dice-{r}": 0.0 for r in REGIONS} | {f"val-share-{r}": 0.0 for r in REGIONS})
        metrics.update({"val-mean-dice": 0.0, "val-collapsed": 0.0})
    clock.lap("evaluate")
    content = RecordDict({"metrics": MetricRecord(metrics | clock.times), "site": ConfigRecord(site)})
    return Message(content=content, reply_to=msg)
