"""Secure aggregation (SecAgg+) on the node: the node's only contact with Flower's legacy API.

Flower 1.42 runs SecAgg+ only through its legacy workflow, whose train messages carry
``fitins.*`` records and expect ``fitres.*`` replies, and whose client protocol
(``secaggplus_mod``) masks the reply's parameters before they leave the node. This module:

- :func:`secagg_mod` hands the protocol's messages (those with a ``secaggplus_configs`` record)
  to ``secaggplus_mod`` and passes every other message through;
- :func:`required_secagg` holds a site to its own terms (node config ``require-secagg``): its update leaves only
  masked, in a SecAgg+ round large enough and with a threshold high enough to hide it;
- :func:`secagg_train` turns a legacy fit message into the same local round as any other
  (:func:`client.site.local_round`, wherever the node runs it) and its result back into a legacy
  fit reply.

The federated arrays travel as a list in the order of their names (``student.*``, ``disc.*``),
which is the order the server packs them in (:mod:`server.secagg`), always as float32 because
the protocol quantises them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.context import Job
from mstkd.errors import RefusedMessage
from mstkd.numbers import is_whole
from mstkd.runconfig import NodeConfig, Transport

FIT_PARAMETERS = "fitins.parameters"


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Run the SecAgg+ client protocol on its own messages; leave every other message alone."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def required_secagg(msg: Message, context: Context, call_next) -> Message:
    """A site's own terms for its update, from its node config, which no run submitter can change: with
    ``require-secagg`` N > 0, its update leaves only masked, under SecAgg+ among at least max(N, 2) nodes whose
    reconstruction threshold is more than half the shares. So a train message outside the protocol is refused
    (a run without ``secagg``, or a coordinator that turned it off), as are the protocol's set-up with too low a
    threshold and its key exchange with too few nodes. The threshold rule is the protocol's own condition against
    a server that tells some nodes a node dropped out and others that it did not: each node answers the unmasking
    stage once, so no two disjoint groups of nodes can each rebuild one of that node's two secrets. What it cannot
    check: that the other nodes in the round are sites and not the server's own (Flower's SecAgg+ has no
    authentication between nodes).

    Raises:
        RefusedMessage: which term the message breaks; the others' round goes on without this site.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    needed = NodeConfig.parse(context.node_config).require_secagg
    if not needed:
        return call_next(msg, context)
    needed = max(needed, 2)
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    terms = f"this site sends its update only under secure aggregation among {needed} nodes or more (require-secagg)"
    if configs is None:
        raise RefusedMessage(f"{terms}; this run asked for it in the clear")
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
        if not (is_whole(shares) and is_whole(threshold) and 2 * threshold > shares >= needed):
            raise RefusedMessage(f"{terms}; this round's set-up ({threshold} of {shares} shares) is not")
    elif stage == Stage.SHARE_KEYS and len([k for k in configs if k != Key.STAGE]) < needed:
        raise RefusedMessage(f"{terms}; this round has {len(configs) - 1}")
    return call_next(msg, context)


def is_secagg_fit(msg: Message) -> bool:
    return FIT_PARAMETERS in msg.content.array_records


def secagg_train(msg: Message, do_job: Callable[..., Any]) -> Message:
    """A legacy fit message in, the same local round as always, a legacy fit reply out.

    ``do_job(job, *args)`` runs a :mod:`client.site` function where the node does its work
    (:func:`client.app.site_runner`)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = do_job(Job.ARRAY_NAMES)
    values = parameters_to_ndarrays(fitins.parameters)
    if len(values) != len(names):
        raise ValueError(f"secure aggregation: {len(values)} arrays received, the model federates {len(names)}")
    arrays = dict(zip(names, values, strict=True))
    updated, metrics, site = do_job(Job.LOCAL_ROUND, arrays, dict(fitins.config), Transport.FLOAT32)
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([np.asarray(updated[n], dtype=np.float32) for n in names]),
        num_examples=int(metrics.pop("num-examples")),
        metrics={**metrics, "site": site["name"]},
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
