"""What a node does with a message, whichever process does it: one round of local training
(:func:`local_round`) and one evaluation of the global student on the site's validation cases
(:func:`evaluate_site`).

``local_round`` loads the global student and discriminator, restores the site's teacher,
optimisers and subset generator from the node's state folder (on disk, so a federation of many
simulated sites does not hold every teacher in memory, and a restarted node resumes), trains
locally, saves the local state, and returns the student + discriminator only.

This module imports PyTorch and MONAI. The ClientApp (:mod:`client.app`) imports it only where the
work runs in the ClientApp's own process (simulation); a deployed node runs it in its warm worker
(:mod:`client.worker`), so the process Flower starts for each message stays light.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.context import SECAGG_SEED, NodeContext, configure_logging, file_name, node_base, ray_node
from client.sent import take_round
from client.state import SiteState
from mstkd.data.dataset import make_loader
from mstkd.data.geometry import check_orientation
from mstkd.data.labels import CLASSES, REGIONS
from mstkd.data.sites import site_data, site_spacing, with_target
from mstkd.errors import InputError, NonFiniteUpdate, NoUsableCases, RefusedMessage
from mstkd.evaluate import describe_collapse, evaluate_cases, parse_subsets
from mstkd.losses import TERMS
from mstkd.model import MSTKDNet, build_discriminator
from mstkd.model.federated import TRANSPORT_DTYPES, federated_arrays, load_federated_arrays
from mstkd.numbers import is_finite
from mstkd.runconfig import NodeConfig, RunConfig, Strategy, Transport, check_state_key, project_config
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


def _state_folder(context: NodeContext, site_name: str, key: str = "") -> Path:
    """``<base>/nodes/<key>/<site>``: one folder per run and site, always inside the node's own base folder.

    The base is :func:`client.context.node_base`, which a deployed node never lets a run submitter choose. ``key``
    comes from the server (``state-key``: the run's name and a token of its own, kept when a run is
    resumed); without it, this run's id. It must be a plain folder name; the site's name is made one.

    Raises:
        InputError: a key that is not a plain folder name (``..``, ``/``, an absolute path).
    """
    nodes = node_base(context.node, context.run) / "nodes"
    key = check_state_key(key or f"run-{context.run_id}")
    site = file_name(site_name)
    folder = (nodes / key / site).resolve()
    if not folder.is_relative_to(nodes):  # a symlink inside the base pointing out of it
        raise InputError(f"state folder {key}/{site_name} lies outside the node's state folder")
    return folder


def _setup(
    arrays: Mapping[str, np.ndarray],
    instructions: Mapping[str, Any],
    server_round: int,
    context: NodeContext,
    clock: Stopwatch,
    kind: str,
):
    """Project config, site data, device, seed, and the student + discriminator holding ``arrays``.

    ``instructions`` is the message's config record (the round, the state key, the agreed target geometry): what
    the server asks of this round, as opposed to the run config (``context.run``) and the project config ``cfg``;
    ``server_round`` its round, which the caller checked (:func:`message_round`) before anything was read. Once the
    message is checked, the round is taken for ``kind`` (``update`` or ``validation``: :func:`client.sent.take_round`)
    before the site's data are read: whatever comes of the work, the node answers that round once.
    """
    configure_logging(context.node)
    cfg = with_target(project_config(context.run), instructions)  # the geometry the federation agreed on
    take_round(context, kind, server_round)
    clock.lap("config")
    data = site_data(context.run, context.node, cfg)
    clock.lap("data")
    device = pick_device()
    # distinct per site and per round: a node must not redraw the same crops every round, nor the same as
    # another site (a simulated site by its partition, a deployed one by its name); under SecAgg+ also per training,
    # by a number the node draws itself (client.context.SECAGG_SEED)
    seed = int(cfg.train.seed) + 1000 * site_number(context.node, data.name)
    seed_everything(seed + server_round + int(instruction(instructions, SECAGG_SEED, 0, 0, 2**31)))
    student, disc = MSTKDNet(cfg.model), build_discriminator(cfg.model)
    try:
        load_federated_arrays(student, disc, arrays)
    except (ValueError, RuntimeError) as exc:  # names or shapes of another model
        log.error("the global model does not fit this node's %s model: %s", cfg.model.preset, exc)
        raise RefusedMessage(f"the global model does not fit this node's {cfg.model.preset} model") from None
    return cfg, data, device, seed, student, disc


def instruction(instructions: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    """A number the message's config names (``default`` when it names none), refused unless it is finite and lies in
    ``low`` .. ``high``: the server chooses these numbers, and a value out of range (a round far in the future, a
    NaN epoch) would otherwise reach the site's state or its learning rate.

    Raises:
        RefusedMessage: not a number in range (NaN is not).
    """
    value = instructions.get(key, default)
    if not is_finite(value) or not low <= value <= high:
        raise RefusedMessage(f"the message's {key} is not a finite number in {low:g}..{high:g}")
    return value


def message_mu(instructions: Mapping[str, Any], run: RunConfig) -> float:
    """FedProx's ``proximal-mu`` as the message gives it, which must be the run config's (0 under any other
    strategy, and under SecAgg+, whose workflow averages): the run config is what a site approves
    (``deploy/plans.py``), the message what the server sends.

    Raises:
        RefusedMessage: not a finite number from 0, or not the run config's.
    """
    value = float(instruction(instructions, "proximal-mu", 0.0, 0, math.inf))
    if value != (run.proximal_mu if run.strategy is Strategy.FEDPROX and not run.secagg else 0.0):
        raise RefusedMessage(f"the message's proximal-mu {value:g} is not this run's ({run.strategy})")
    return value


def message_round(instructions: Mapping[str, Any], run: RunConfig) -> int:
    """The round a message belongs to: a whole number from 0 (a server that names none) to ``num-server-rounds``.

    Raises:
        RefusedMessage: anything else (a round beyond the run's last would make every later round look late to
            the site's state, which would then never be saved again).
    """
    value = instruction(instructions, "server-round", 0, 0, run.num_server_rounds)
    if value != int(value):
        raise RefusedMessage("the message's server-round is not a whole number")
    return int(value)


def site_number(node: NodeConfig, name: str) -> int:
    """The simulated partition's id, or for a deployed site a number from its name (stable across runs)."""
    if node.partition_id is not None:
        return node.partition_id
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:3], "big")


class Stopwatch:
    """Seconds spent in each phase of one message, sent back as ``<stage>-time-<phase>`` metrics
    (``train-time-data``, ``val-time-evaluate``, ...).

    ``<stage>-time-startup`` is the age of the process that took the message from Flower when the
    message arrived (interpreter start, imports, Flower's own set-up): a deployed SuperNode starts
    one such process per message, a simulation's Ray workers start once per run and report 0.
    ``<stage>-time-handoff`` is the time from there to this work starting: the connection to the node's
    warm worker (and starting it, on a node's first message), or in that same process the import of
    this module on its first message and next to nothing after.
    """

    def __init__(self, stage: str, node: NodeContext) -> None:
        self.prefix = f"{stage}-time-"
        self.times: dict[str, float] = {
            f"{self.prefix}startup": node.startup,
            f"{self.prefix}handoff": max(time.time() - node.sent_at, 0.0),
        }
        self._first = self._last = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the work was handed on (the hand-off included)."""
        return time.perf_counter() - self._first + self.times[f"{self.prefix}handoff"]

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to ``phase``."""
        now = time.perf_counter()
        key = self.prefix + phase
        self.times[key] = self.times.get(key, 0.0) + now - self._last
        self._last = now


def in_time(context: NodeContext) -> None:
    """Refuse a message that expired before its work began (its deadline: :func:`client.context.work_deadline`),
    such as one that waited in a queue while the node was away: its reply would be dropped.

    Raises:
        RefusedMessage: the message has expired.
    """
    if context.deadline is not None and time.time() > context.deadline:
        raise RefusedMessage(f"this message's deadline ({context.deadline_of}) passed before its work began")


def local_round(
    context: NodeContext,
    arrays: Mapping[str, np.ndarray],
    instructions: Mapping[str, Any],
    transport: Transport | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float | int], dict[str, str]]:
    """One round of local training from the global ``arrays``: the updated student + discriminator arrays,
    the scalar metrics and the site's name, device and modalities (everything a reply carries)."""
    in_time(context)
    clock = Stopwatch("train", context)
    # the message's numbers, checked before the site's data or state is read
    server_round = message_round(instructions, context.run)
    last_epoch = context.run.num_server_rounds * context.run.local_epochs  # where the server's schedule ends
    given_epoch = instruction(instructions, "epoch", 0, 0, last_epoch) if "epoch" in instructions else None
    proximal_mu = message_mu(instructions, context.run)
    cfg, data, device, seed, student, disc = _setup(arrays, instructions, server_round, context, clock, "update")
    nets = Networks(MSTKDNet(cfg.model), student, disc).to(device)
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(seed)
    state = SiteState(
        _state_folder(context, data.name, str(instructions.get("state-key", ""))), str(cfg.train.state_precision)
    )
    clock.lap("build")
    info = state.load(nets, optimizers, rng, before_round=server_round) or {"rounds": 0, "epoch": 0.0}
    clock.lap("state-load")
    moments = str(cfg.train.student_moments)  # keep | reset, checked with the config
    if moments == "reset":  # the kept moments belong to the site's last student, not to the new global one
        reset_optimizer_state(optimizers.main, nets.student)
    if not data.train:
        skipped = len(data.federation.skipped)
        raise NoUsableCases(f"{data.name}: no usable training case ({skipped} left out as broken; see the node log)")
    loader = make_loader(
        data.train,
        cfg.data,
        train=True,
        patch=cfg.data.patch_size or cfg.model.input_size,
        batch_size=int(cfg.train.batch_size),
    )
    clock.lap("loader")
    steps = context.run.local_steps or max(1, round(context.run.local_epochs * len(loader)))
    epoch = float(info["epoch"] if given_epoch is None else given_epoch)
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
        proximal_mu=proximal_mu,
        progress=False,
        desc=data.name,
        deadline=context.deadline,
        deadline_of=context.deadline_of,
    )
    clock.lap("train")
    if metrics["skipped_steps"] >= steps:  # nothing learned: sending the model back would count as a round of work
        raise NonFiniteUpdate(f"{data.name}: every one of the {steps} steps had a non-finite loss or gradient")
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
        "train-skipped-steps": int(metrics["skipped_steps"]),
        "train-seconds": float(metrics["seconds"]),
        "skipped-cases": len(data.federation.skipped),
    }
    site = {"name": data.name, "device": str(device), "modalities": data.available.name}
    if node := ray_node():
        site["ray-node"] = node
    updated = federated_arrays(nets.student, nets.discriminator, Transport.FLOAT32)
    # the L2 norm of this site's update: what a DP clipping norm is compared with
    reply["update-norm"] = float(
        np.sqrt(sum(np.sum((updated[k] - np.asarray(v, np.float32)) ** 2, dtype=np.float64) for k, v in arrays.items()))
    )
    sent = in_transport_dtype(updated, transport or context.run.transport, data.name)
    clock.lap("reply")
    reply["client-seconds"] = clock.elapsed()
    return sent, reply | clock.times, site


def in_transport_dtype(arrays: dict[str, np.ndarray], transport: Transport, site: str) -> dict[str, np.ndarray]:
    """``arrays`` in the transport dtype; float32 for this message where float16 would overflow to inf.

    Raises:
        NonFiniteUpdate: a value is not finite already (training diverged): such an update never leaves.
    """
    peak = max((float(np.abs(v).max()) for v in arrays.values() if v.size), default=0.0)
    if not np.isfinite(peak):
        raise NonFiniteUpdate("the trained student or discriminator is not finite: no update is sent")
    dtype = TRANSPORT_DTYPES[transport]
    if dtype == np.float16 and peak > float(np.finfo(np.float16).max):
        log.warning("%s: a weight of %.3g is beyond float16's range: this update travels as float32", site, peak)
        dtype = np.float32
    return {k: v.astype(dtype, copy=False) for k, v in arrays.items()}


def evaluate_site(
    context: NodeContext, arrays: Mapping[str, np.ndarray], instructions: Mapping[str, Any]
) -> tuple[dict[str, float | int], dict[str, str]]:
    """Score the global student ``arrays`` on the site's validation cases: the metrics and the site's name."""
    in_time(context)
    clock = Stopwatch("val", context)
    server_round = message_round(instructions, context.run)  # checked before anything is read
    cfg, data, device, _, student, _ = _setup(arrays, instructions, server_round, context, clock, "validation")
    clock.lap("build")
    # "full" means everything this site has; subsets it cannot form are skipped
    wanted = parse_subsets(context.run.site_eval_subsets)
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
    return metrics | clock.times, site


def site_geometry(context: NodeContext, instructions: Mapping[str, Any]) -> dict[str, float | int]:
    """What this site tells the federation when it plans its target geometry: the median voxel size of its cases
    in the orientation asked for (``spacing-0`` .. ``spacing-2``, mm) and how many cases that is (``num-examples``).
    Only image headers are read, and only these four numbers leave the site."""
    in_time(context)
    configure_logging(context.node)
    cfg = project_config(context.run)
    try:
        orientation = check_orientation(str(instructions.get("orientation", cfg.data.orientation)))
    except InputError as exc:
        raise RefusedMessage(f"the message's orientation is not valid ({exc})") from None
    spacing, cases = site_spacing(context.run, context.node, orientation)
    return {"num-examples": cases, **{f"spacing-{axis}": float(v) for axis, v in enumerate(spacing)}}


def array_names(context: NodeContext) -> list[str]:
    """Names of the federated arrays (``student.*``, then ``disc.*``), in the order both sides pack them."""
    cfg = project_config(context.run)
    return list(federated_arrays(MSTKDNet(cfg.model), build_discriminator(cfg.model)))


def release_memory() -> None:
    """Give back what the last message's networks and data held (a warm worker lives on between messages)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
