"""Secure aggregation (SecAgg+) on the node: the node's only contact with Flower's legacy API.

Flower 1.42 runs SecAgg+ only through its legacy workflow, whose train messages carry
``fitins.*`` records and expect ``fitres.*`` replies, and whose client protocol
(``secaggplus_mod``) masks the reply's parameters before they leave the node. This module:

- :func:`secagg_mod` hands the protocol's messages (those with a ``secaggplus_configs`` record)
  to ``secaggplus_mod`` and passes every other message through; ``secaggplus_mod`` draws its masks from
  the whole of each seed (:mod:`messages.masks`), as the server unmasks them, and answers the consistency round
  between masking and unmasking that Flower's protocol lacks (:data:`messages.signed_keys.SURVIVORS`);
- :func:`secagg_train` turns a legacy fit message into the same local round as any other
  (:func:`client.site.local_round`, wherever the node runs it) and its result back into a legacy
  fit reply.

The federated arrays travel as a list in the order of their names (``student.*``, ``disc.*``),
which is the order the server packs them in (:mod:`server.secagg`), always as float32 because
the protocol quantises them itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from importlib import import_module
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.context import SECAGG_SEED, Job, message_kind
from messages import signed_keys
from messages.masks import check_range, use_full_seeds
from mstkd.errors import RefusedMessage
from mstkd.numbers import is_whole
from mstkd.runconfig import NodeConfig, Transport

# the module, not the function of the same name its package exports: its masks are drawn from the whole seed
FULL_SEEDS = use_full_seeds(import_module("flwr.client.mod.secure_aggregation.secaggplus_mod"))

FIT_PARAMETERS = "fitins.parameters"
FIT_CONFIG = "fitins.config"
ROUND = "mstkd.secagg-round"
"""What a node with a ``secagg-key`` keeps of its SecAgg+ round, to sign and for its site's terms
(:mod:`client.terms`): the round's terms (:func:`messages.signed_keys.round_terms`), the digest of the key list it
was given and of the fit instructions it trained on, and the survivors it signed."""
SIGNED = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS)


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Run the SecAgg+ client protocol on its own messages; leave every other message alone. Flower's protocol
    runs only on messages of type ``train`` and passes ``train.<name>`` on unmasked, so such a message that
    carries the protocol's record is refused. A node with a ``secagg-key`` signs its round keys in its set-up reply,
    the key list it was given in its key-exchange reply and the fit instructions it trained on in its masked-vector
    reply (:mod:`messages.signed_keys`), and answers the project's consistency round itself (:func:`_survivors`); the
    signatures the server relays are taken out before Flower's client reads a message.

    Raises:
        RefusedMessage: a ``train.<name>`` message with the protocol's record; a set-up for another node, or with a
            range no mask can be drawn from; a masked update for a round that is not a whole number; a Flower whose
            masks this version cannot draw. (A second request for an update of a round is refused by the training,
            :func:`client.sent.take_round`.)
    """
    if message_kind(msg) != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN:
        raise RefusedMessage("secure aggregation runs on train messages only, not on train.<name> ones")
    if not FULL_SEEDS:
        raise RefusedMessage("secure aggregation: this node's Flower draws masks in a way this version does not know")
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)  # read before Flower's client, which takes it out of the record
    if stage == signed_keys.SURVIVORS:  # the project's own stage, which Flower's client does not know
        return _survivors(msg, context, configs.get(Key.ACTIVE_NODE_ID_LIST))
    if stage == Stage.SETUP:
        if msg.metadata.dst_node_id != context.node_id:
            raise RefusedMessage("secure aggregation: this set-up is addressed to another node")
        try:  # before the node trains for a round whose masks it could not draw
            check_range(configs.get(Key.MOD_RANGE))
        except ValueError as exc:
            raise RefusedMessage(f"secure aggregation: {exc}") from None
        context.state.config_records.pop(ROUND, None)
    for name in [k for k in configs if k.startswith(signed_keys.SIGNED_BY)]:
        del configs[name]  # the relayed signatures, for the site's terms (client/terms.py), not for Flower's client
    if stage == Stage.COLLECT_MASKED_VECTORS:  # training takes its round (client.sent.take_round): one update a round
        fit_round = msg.content.config_records.get(FIT_CONFIG, ConfigRecord()).get("server-round", 0)
        if not is_whole(fit_round):  # Flower's workflow sends a whole number
            raise RefusedMessage("secure aggregation: the message's server-round is not a whole number")
    return _protocol(msg, context, call_next, configs, stage)


def _protocol(msg: Message, context: Context, call_next, configs: ConfigRecord, stage: str) -> Message:
    """Flower's SecAgg+ client on a stage of its protocol; a node with a ``secagg-key`` signs what it was given."""
    path = NodeConfig.parse(context.node_config).secagg_key
    if not path or stage not in SIGNED:  # a node without a key signs nothing, and keeps nothing to sign
        return secaggplus_mod(msg, context, call_next)
    kept = ConfigRecord(dict(context.state.config_records.get(ROUND, {})))  # kept only once the stage succeeds
    if stage == Stage.SETUP:
        kept = ConfigRecord({"terms": signed_keys.round_terms(configs, msg.metadata.group_id)})
    elif stage == Stage.SHARE_KEYS:
        kept["list"] = signed_keys.list_digest(signed_keys.exchange_keys(configs))
    else:
        kept["fit"] = signed_keys.fit_digest(msg.content)  # before training, which may change the message
    reply = secaggplus_mod(msg, context, call_next)
    if reply.has_error():
        return reply
    context.state[ROUND] = kept
    if "terms" in kept:
        _sign(reply.content.config_records[RECORD_KEY_CONFIGS], stage, context, signed_keys.load_signing_key(path))
    return reply


def _sign(out: ConfigRecord, stage: str, context: Context, key) -> None:
    """Sign, into this node's reply ``out``, what it was given at this stage (:data:`ROUND`)."""
    kept, run, node = context.state.config_records[ROUND], context.run_id, context.node_id
    if stage == Stage.SETUP:
        pk1, pk2 = out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2]
        out[signed_keys.SIGNED_BY] = signed_keys.sign(key, run, node, kept["terms"], pk1, pk2)
    elif stage == Stage.SHARE_KEYS and "list" in kept:
        out[signed_keys.LIST_SIGNED_BY] = signed_keys.sign_statement(
            key, signed_keys.LIST_DOMAIN, run, node, kept["terms"], kept["list"]
        )
    elif stage == Stage.COLLECT_MASKED_VECTORS and "list" in kept and "fit" in kept:
        out[signed_keys.FIT_SIGNED_BY] = signed_keys.sign_statement(
            key, signed_keys.FIT_DOMAIN, run, node, kept["terms"], kept["list"], kept["fit"]
        )


def _survivors(msg: Message, context: Context, survivors: object) -> Message:
    """The consistency round (:data:`messages.signed_keys.SURVIVORS`): a node with a ``secagg-key`` signs the nodes
    that the server says sent masked updates, once a round and only after its own; a node without one answers with
    nothing signed."""
    ids = isinstance(survivors, list) and all(is_whole(n) and 0 <= n <= signed_keys.MAX_NODE_ID for n in survivors)
    if not (ids and context.node_id in survivors):
        raise RefusedMessage("secure aggregation: a list of survivors that is not node ids, this node's among them")
    out = ConfigRecord()
    path = NodeConfig.parse(context.node_config).secagg_key
    if path:
        kept = context.state.config_records.get(ROUND)
        if kept is None or "list" not in kept or "fit" not in kept or "survivors" in kept:
            raise RefusedMessage("secure aggregation: survivors asked for before this node's masked update, or twice")
        listed = sorted({int(n) for n in survivors})
        run, node, key = context.run_id, context.node_id, signed_keys.load_signing_key(path)
        digests = kept["list"], signed_keys.nodes_digest(listed)
        out[signed_keys.SURVIVORS_SIGNED_BY] = signed_keys.sign_statement(
            key, signed_keys.SURVIVORS_DOMAIN, run, node, kept["terms"], *digests
        )
        context.state[ROUND] = ConfigRecord({**kept, "survivors": listed})
    return Message(content=RecordDict({RECORD_KEY_CONFIGS: out}), reply_to=msg)


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
    config = {**fitins.config, SECAGG_SEED: secrets.randbelow(2**31)}  # the node's own, whatever the server sent
    updated, metrics, site = do_job(Job.LOCAL_ROUND, arrays, config, Transport.FLOAT32)
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([np.asarray(updated[n], dtype=np.float32) for n in names]),
        num_examples=int(metrics.pop("num-examples")),
        metrics={**metrics, "site": site["name"]},
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
