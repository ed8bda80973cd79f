"""Flower ClientApp: one node = one institution, a thin adapter over :mod:`client.site`.

``train``: one round of local training from the global student and discriminator
(:func:`client.site.local_round`), replying with the student + discriminator only.
``evaluate``: the global student scored on the site's validation cases
(:func:`client.site.evaluate_site`). ``query``: before the first round, the site's median voxel size
(:func:`client.site.site_geometry`), from which the server plans the federation's target geometry.

Where the work runs: in this process in a simulation (Ray keeps its workers warm); in the node's
warm worker (:mod:`client.worker`) on a deployed SuperNode, which starts a fresh process for
every message. This module therefore imports neither PyTorch nor MONAI.

Mods, outermost first: ``disclosed`` writes every reply this node sends in its own disclosure log before it
leaves (:mod:`client.disclosures`); ``private_errors`` turns any failure into an error reply that tells the server a
category and a short code only (:func:`mstkd.errors.public_reason`; the details go to the node's own log);
``required_secagg`` refuses what breaks the site's own terms for its update (node config ``require-secagg``, or a
``secagg=true`` run's: :mod:`client.terms`); ``packed_arrays_mod`` unpacks the arrays a deployed server sends in
one piece and packs the reply (:mod:`messages.arrays`); ``checked_input`` reads every incoming array safely and
refuses a global model that is not finite; ``secagg_mod`` runs Flower's SecAgg+ protocol when the server asks for secure
aggregation (``secagg=true``; :mod:`client.secagg`); ``clip_updates`` clips the update for client-side
differential privacy (``dp='client'``, fixed or adaptive clipping; :mod:`messages.clipping`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT  # what Flower's DP wrappers use

from client import worker
from client.context import Job, NodeContext, configure_logging, message_kind, ray_node, work_deadline
from client.disclosures import disclosed
from client.secagg import is_secagg_fit, secagg_mod, secagg_train
from client.terms import required_secagg
from messages.arrays import NUMERIC, WireError, decode_array, nonfinite, packed_arrays_mod
from messages.clipping import clip_update
from messages.signed_keys import load_signing_key
from messages.signed_replies import ASKED, SIGNED, sign_reply
from mstkd.errors import RefusedMessage, public_reason
from mstkd.numbers import is_finite
from mstkd.runconfig import DPClipping, DPMode, NodeConfig, RunConfig

log = logging.getLogger("mstkd.client")


def private_errors(msg: Message, context: Context, call_next) -> Message:
    """Whatever fails on this node becomes an error reply with its public reason only; the exception, with its
    traceback, goes to the node's own log (case IDs, paths and settings never reach the server)."""
    try:
        return call_next(msg, context)
    except Exception as exc:
        try:
            configure_logging(NodeConfig.parse(context.node_config))
        except Exception:  # a bad node config: the message below still goes to stderr
            pass
        log.error("this node's %s work failed", msg.metadata.message_type, exc_info=exc)
        reason = public_reason(exc)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def checked_input(msg: Message, context: Context, call_next) -> Message:
    """Read every array a message brings with :func:`messages.arrays.decode_array` (its header checked against its
    bytes), and refuse a global model with a value that is not finite: it would reach the site's teacher."""
    for record in msg.content.array_records.values():
        for name, array in record.items():
            try:
                values = decode_array(array, NUMERIC)
            except WireError as exc:
                raise RefusedMessage(f"the global model's {name} does not read ({exc})") from None
            if bad := nonfinite(values):
                raise RefusedMessage(f"the global model is not finite ({bad} values in {name})")
    return call_next(msg, context)


def clip_updates(msg: Message, context: Context, call_next) -> Message:
    """Client-side differential privacy: on a train message that carries a clipping norm (the server runs
    ``dp='client'``), scale this site's update down to that norm (:func:`messages.clipping.clip_update`, in float64)
    and, with ``dp-clipping='adaptive'``, say whether it was scaled (``norm_bit``, which the server's adaptive norm
    follows). Everything else passes, but where the run config says ``dp='client'`` (what a site approves in a plan,
    ``deploy/plans.py``) a train message must carry its clipping: the run's ``dp-clip`` when it is fixed."""
    config = msg.content.config_records.get("config")
    if message_kind(msg) == MessageType.TRAIN and (run := RunConfig.parse(context.run_config)).dp is DPMode.CLIENT:
        norm, clipping = (None, None) if config is None else (config.get(KEY_CLIPPING_NORM), config.get("dp-clipping"))
        fixed = run.dp_clipping is DPClipping.FIXED
        if norm is None or clipping != run.dp_clipping or (fixed and norm != run.dp_clip):
            raise RefusedMessage(f"this run clips each update (dp='client', {run.dp_clipping}); the message does not")
    if message_kind(msg) != MessageType.TRAIN or config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    norm = config[KEY_CLIPPING_NORM]
    if not is_finite(norm) or norm <= 0:
        raise RefusedMessage("the message's clipping norm is not a positive number")
    sent = {k: decode_array(v, "f") for k, v in msg.content["arrays"].items()}  # read, checked, by checked_input
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    returned = {k: decode_array(v, "f") for k, v in reply.content["arrays"].items()}
    clipped, scaled = clip_update(sent, returned, float(norm))
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in clipped.items()})
    if config.get("dp-clipping") == "adaptive":
        reply.content["metrics"][KEY_NORM_BIT] = int(scaled)
    return reply


MODS = [disclosed, private_errors, required_secagg, packed_arrays_mod, checked_input, secagg_mod, clip_updates]
app = ClientApp(mods=MODS)

_SERVED = False  # has this process handled a message yet


def _process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0.0 where it cannot be read)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)


def site_runner(msg: Message, context: Context, *, timed: bool = True):
    """``do_job(job, *args)``: ``client.site.<job>`` for ``msg`` in the node's warm worker or in this process
    (:func:`client.worker.wanted`), called with a :class:`client.context.NodeContext` first, which carries the
    message's deadline (:func:`client.context.work_deadline`). ``timed``: the work reports this process's
    start-up (the voxel-size report before round 1 does not, so the first train message still carries it)."""
    global _SERVED
    node_config = NodeConfig.parse(context.node_config)
    configure_logging(node_config)
    first = timed and not _SERVED and ray_node() is None  # a Ray worker's age would include its idle time
    _SERVED = _SERVED or timed
    node = NodeContext(
        run_id=int(context.run_id),
        node_id=int(context.node_id),
        node=node_config,
        run=RunConfig.parse(context.run_config),
        startup=_process_age() if first else 0.0,
    )
    node.deadline, node.deadline_of = work_deadline(msg.metadata, node_config.max_work_seconds)
    remote = worker.wanted(node_config)

    def do_job(job: Job, *args: Any) -> Any:
        node.sent_at = time.time()
        if remote:
            return worker.call(node, job, *args)
        return worker.site_work(job)(node, *args)

    return do_job


@app.train()
def train(msg: Message, context: Context) -> Message:
    do_job = site_runner(msg, context)
    if is_secagg_fit(msg):
        if RECORD_KEY_CONFIGS not in msg.content.config_records:  # only SecAgg+'s client asks with a legacy fit record
            raise RefusedMessage("a legacy fit message outside SecAgg+ is not answered")
        return secagg_train(msg, do_job)
    config = dict(msg.content["config"])
    arrays = {k: decode_array(v) for k, v in msg.content["arrays"].items()}  # read, checked, by checked_input
    updated, metrics, site = do_job(Job.LOCAL_ROUND, arrays, config)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in updated.items()}),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord(site),
        }
    )
    return Message(content=signed(content, msg, context), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Before its first round the federation plans its target geometry: this site's median voxel size."""
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    metrics = site_runner(msg, context, timed=False)(Job.SITE_GEOMETRY, config)
    return Message(content=signed(RecordDict({"metrics": MetricRecord(metrics)}), msg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    arrays = {k: decode_array(v) for k, v in msg.content["arrays"].items()}
    metrics, site = site_runner(msg, context)(Job.EVALUATE_SITE, arrays, config)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord(site)})
    return Message(content=signed(content, msg, context), reply_to=msg)


def signed(content: RecordDict, msg: Message, context: Context) -> RecordDict:
    """A train, evaluate or voxel-size reply's ``content``, signed with this node's SuperNode key (node config
    ``secagg-key``) where the server asks for it: it then weighs the reply by at most the cases the consortium lists
    for that key (run config ``site-cases``, :mod:`messages.signed_replies`). A node without a key sends it unsigned."""
    config = msg.content.config_records.get("config", ConfigRecord())
    if config.get(ASKED) is True and (key := NodeConfig.parse(context.node_config).secagg_key):
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]  # checked by the site's work
        cases = int(content["metrics"]["num-examples"])  # type: ignore[arg-type]
        kind, node = message_kind(msg), context.node_id
        content[SIGNED] = sign_reply(load_signing_key(key), context.run_id, node, kind, server_round, cases)
    return content
