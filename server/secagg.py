"""Secure aggregation (SecAgg+) on the server: the server's only contact with Flower's legacy API.

With ``secagg=true`` the rounds run through Flower's legacy ``DefaultWorkflow`` with a
``SecAggPlusWorkflow`` fit stage: each node masks its update, and the server learns only the
weighted sum over the nodes that took part (the masks cancel in the sum), which plain FedAvg then
divides by the total weight. A node's individual weights never reach the server.

What differs from the normal loop (:mod:`server.loop`): every round starts with ``min-nodes`` nodes (at least 3;
the protocol splits each node's key into shares that the others hold) and aggregates while two thirds of them are
left (nodes lost on the way are forgotten or recovered, :class:`RoundSafeSecAgg`),
there is no per-node validation, no checkpoint and no resume, differential privacy cannot be
combined with it, ``strategy``, ``fraction-train``, ``min-replies`` and ``node-wait`` do not apply,
and no bytes are logged. The server cannot check a single node's update (it sees only their masked sum): the
reply checks of :mod:`server.replies` do not apply, nodes' metrics are kept only where they are finite
numbers, records are keyed by position (node ids are hidden), and a sum that is not finite stops the
run before it is saved or sent. Weights travel as float32: the protocol scales each node's weights by
``num-examples / secagg-max-weight`` and quantises them to 2**22 levels over [-8, 8], so the
error of the average is about ``nodes x 3.8e-6 x secagg-max-weight / total examples``; set
``secagg-max-weight`` to about the largest site's number of training cases. The sum of the nodes' weight factors, which
the sum of updates is divided by, is masked too: once unmasked it must be what the case counts the nodes sent in
the clear give, or the round is skipped. The scalar metrics (losses, ``update-norm``, case counts) are not masked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_secagg

from messages import signed_keys
from messages.arrays import NDARRAY, WireError, decode_array
from messages.masks import use_full_seeds
from mstkd.errors import InputError
from mstkd.numbers import is_whole
from mstkd.runconfig import RunConfig
from server.loop import expire
from server.replies import metric_problem, printable
from server.runlog import RunLog

RECONSTRUCTION = 2 / 3
"""Share of key shares needed to recover a dropped node's mask."""

_KEY, _BYTES, _NODES = "key", "bytes", "nodes"
STAGE_FIELDS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: _KEY, Key.PUBLIC_KEY_2: _KEY},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: _NODES, Key.CIPHERTEXT_LIST: _BYTES},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: _BYTES},
    Stage.UNMASK: {Key.NODE_ID_LIST: _NODES, Key.SHARE_LIST: _BYTES},
}
"""What Flower's SecAgg+ workflow reads from each stage's replies: a key (bytes), a list of bytes, or a list of node
ids under each key; the lists of one reply have one length, and a list of node ids names exactly the nodes its message
asked about, each once (its key shares go to each neighbour it was given the keys of; its shares for unmasking are
of each node it was asked for)."""


class CheckedGrid:
    """A grid whose SecAgg+ replies are checked for what the workflow reads before it reads them (the workflow indexes
    them unchecked, so one malformed reply ended the run with a ``KeyError``): a reply that lacks a field, holds
    another type, names a node outside the round, sends masked vectors of other shapes or a case count out of range
    becomes that node's error, which the protocol treats as a dropped node. So does one whose key shares skip a
    neighbour or whose unmasking shares skip a node asked for: the masks would no longer cancel, or too few shares
    would be left, and the round's sum would be wrong or lost. The contents of keys, ciphertexts and shares cannot be
    checked: with secure aggregation the server cannot tell a wrong one (docs/security.md)."""

    def __init__(self, grid: Grid, shapes: list[tuple[int, ...]], max_examples: int) -> None:
        self.grid, self.shapes, self.max_examples = grid, [(1,), *shapes], max_examples  # the weight factor first
        self.counts: dict[int, int] = {}  # the case count of each node whose masked vectors were taken, this round
        self.signatures: dict[int, list[bytes]] = {}  # each node's signature of its round keys, this round
        self.list_signatures: dict[int, bytes] = {}  # each node's signature of the key list it was given
        self.fit_signatures: dict[int, bytes] = {}  # each node's signature of the fit instructions it trained on
        self.errors: list[str] = []  # the reasons of this round's error replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        asked = {m.metadata.dst_node_id: _asked(m) for m in messages}
        for message in messages:
            self._relay_signatures(message, asked[message.metadata.dst_node_id][0])
        expire(messages, timeout)
        replies = [self._checked(reply, asked) for reply in self.grid.send_and_receive(messages, timeout=timeout)]
        for reply in replies:
            if reply.has_error():
                self.errors.append(printable(reply.error.reason, 200))
            else:
                self._keep_signature(reply, asked.get(reply.metadata.src_node_id, ("",))[0])
        return replies

    def _keep_signature(self, reply: Message, stage: str | None) -> None:
        """A set-up reply's signature of the node's keys, or a key-exchange reply's of its key list, to relay; one
        that is not of the form a node signs is dropped (the sites that check then refuse that node)."""
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        node = reply.metadata.src_node_id
        if stage == Stage.SETUP:
            signed = record.get(signed_keys.SIGNED_BY)
            if isinstance(signed, list) and len(signed) == 2 and all(map(_short_bytes, signed)):
                self.signatures[node] = signed
        elif stage == Stage.SHARE_KEYS and _short_bytes(record.get(signed_keys.LIST_SIGNED_BY)):
            self.list_signatures[node] = record[signed_keys.LIST_SIGNED_BY]
        elif stage == Stage.COLLECT_MASKED_VECTORS and _short_bytes(record.get(signed_keys.FIT_SIGNED_BY)):
            self.fit_signatures[node] = record[signed_keys.FIT_SIGNED_BY]

    def _relay_signatures(self, message: Message, stage: str | None) -> None:
        """A set-up starts a round with no signature; a key exchange carries each listed node's signature of its keys
        beside them, a request for masked vectors each partner's signature of its key list, and an unmasking request
        each living node's signature of its fit instructions, for nodes whose sites check them
        (:mod:`messages.signed_keys`)."""
        if stage == Stage.SETUP:
            self.signatures, self.list_signatures, self.fit_signatures, self.errors = {}, {}, {}, []
            return
        record = message.content.config_records[RECORD_KEY_CONFIGS]
        if stage == Stage.SHARE_KEYS:
            for node in [int(k) for k in record if k.isdigit()]:
                if node in self.signatures:
                    record[signed_keys.entry(node)] = self.signatures[node]
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            for node in record[Key.SOURCE_LIST]:
                if node in self.list_signatures:
                    record[signed_keys.entry(node, signed_keys.LIST_SIGNED_BY)] = self.list_signatures[node]
        elif stage == Stage.UNMASK:
            for node in record[Key.ACTIVE_NODE_ID_LIST]:
                if node in self.fit_signatures:
                    record[signed_keys.entry(node, signed_keys.FIT_SIGNED_BY)] = self.fit_signatures[node]

    def _checked(self, reply: Message, asked: dict[int, tuple[str | None, list[int]]]) -> Message:
        if reply.has_error():
            return reply
        stage, nodes = asked.get(reply.metadata.src_node_id, ("", []))
        if reply.metadata.src_node_id not in asked:
            problem = "a reply from a node not asked"
        elif stage not in STAGE_FIELDS:  # the workflow's other messages
            return reply
        else:
            try:
                problem = self._problem(reply, stage, nodes)
            except Exception as exc:  # a reply that does not even read
                problem = f"unreadable ({type(exc).__name__})"
        if problem is None:
            return reply
        return Message(metadata=reply.metadata, error=Error(code=0, reason=f"SecAgg+ {stage}: {problem}"))

    def _problem(self, reply: Message, stage: str, nodes: list[int]) -> str | None:
        fields = STAGE_FIELDS[stage]
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        values = {key: record.get(key) if record is not None else None for key in fields}
        for key, kind in fields.items():
            value = values[key]
            if kind == _KEY and not isinstance(value, bytes):
                return f"{key} is not a key"
            if kind != _KEY and not isinstance(value, list):
                return f"{key} is not a list"
            if kind == _BYTES and not all(isinstance(v, bytes) for v in value):
                return f"{key} holds something other than bytes"
            if kind == _NODES and not (all(is_whole(v) for v in value) and sorted(value) == sorted(nodes)):
                return f"{key} does not name each node it was asked about once"
        if len({len(v) for v in values.values() if isinstance(v, list)}) > 1:
            return "its lists differ in length"
        if stage == Stage.COLLECT_MASKED_VECTORS:
            try:  # the header against the bytes that came, before Flower's reader allocates what it claims
                masked = values[Key.MASKED_PARAMETERS]
                vectors = [decode_array(Array(dtype="", shape=(), stype=NDARRAY, data=b), "iu") for b in masked]
            except WireError as exc:
                return f"a masked vector does not read ({exc})"
            if [v.shape for v in vectors] != self.shapes:
                return "its masked vectors are not of the model's shapes"
            examples = compat.recorddict_to_fitres(reply.content, True).num_examples
            if not (is_whole(examples) and 1 <= examples <= self.max_examples):
                return f"a case count outside 1..{self.max_examples}"
            self.counts[reply.metadata.src_node_id] = int(examples)
        return None


_EXPECTED_WEIGHT: ContextVar[int | None] = ContextVar("secagg_expected_weight", default=None)
"""The sum of weight factors the round being unmasked (in this thread) must have; None outside an unmasking."""
_flower_factor_extract = flower_secagg.factor_extract


def _checked_factor_extract(parameters):
    """Flower's ``factor_extract``, where its workflow reads the unmasked sum of the weight factors, checked against
    :data:`_EXPECTED_WEIGHT` (installed once, for every workflow of this process; a no-op outside our unmasking)."""
    total, rest = _flower_factor_extract(parameters)
    expected = _EXPECTED_WEIGHT.get()
    if expected is not None and total != expected:
        raise ValueError(
            f"the nodes' weights sum to {total}, not the {expected} their case counts give: a node "
            "lied, or masked with another version's generator"
        )
    return total, rest


flower_secagg.factor_extract = _checked_factor_extract
FULL_SEEDS = use_full_seeds(flower_secagg)  # the nodes' masks, drawn from the whole of each seed (client.secagg)


class RoundSafeSecAgg(SecAggPlusWorkflow):
    """Flower's SecAgg+ fit stage, with two repairs so that a node's failure costs that node, or at worst its round,
    never the run:

    - Contents no check can reach (shares that do not combine, a key that is not one) raised a ``ValueError`` out of
      the workflow and ended the run. The round is now skipped with its reason, and the global model kept, as when
      too few nodes are left; any other error (a bug) still ends the run.
    - A node lost in the first two stages (no keys, or no shares of its own keys) lost the round for every node:
      Flower's workflow still counted it among the round's nodes, so the last stage asked for its shares, which no
      node holds, and its neighbours for shares of a key they never received. As in the protocol's paper, the round's
      nodes are now those that shared their keys: a node lost before then is forgotten (no node masked its update
      with it, and it sent no update), and one lost after is recovered from the others' shares, as before.
    """

    def __init__(self, *args, on_failure: Callable[[Exception], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_failure = on_failure

    def __call__(self, grid, context) -> None:
        try:
            super().__call__(grid, context)
        except (ValueError, UnsupportedAlgorithm) as exc:  # the protocol's own, on contents no check can reach
            self.on_failure(exc)

    # Flower's own threshold check at the end of these two stages counts the lost nodes' neighbourhoods too (with a
    # partial neighbour graph it may refuse a round that the nodes left can finish): its answer is replaced by the
    # check after the lost nodes are forgotten. A setup stage that stopped before it drew the neighbour graph (no
    # node sampled, or one) stays stopped.
    def setup_stage(self, grid, context, state) -> bool:
        super().setup_stage(grid, context, state)
        return self._went_on(bool(state.nid_to_neighbours) and self._forget_lost(state), grid, "set-up")

    def share_keys_stage(self, grid, context, state) -> bool:
        super().share_keys_stage(grid, context, state)
        return self._went_on(self._forget_lost(state), grid, "key exchange")

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        grid.counts = {}
        return self._went_on(super().collect_masked_vectors_stage(grid, context, state), grid, "masked updates")

    def _went_on(self, went_on: bool, grid, stage: str) -> bool:
        """A stage that leaves too few nodes halts Flower's workflow, which says nothing more: the round is recorded
        as skipped, with the nodes' reasons."""
        if not went_on:  # the nodes' most common reasons, with how many gave each
            why = "; ".join(f"{n} x {reason}" for reason, n in Counter(grid.errors).most_common(2)) or "nodes silent"
            self.on_failure(RuntimeError(f"too few nodes left after its {stage}: {why}"))
        return went_on

    def unmask_stage(self, grid, context, state) -> bool:
        """Flower's unmasking, which divides the sum by the sum of the nodes' weight factors (each node's first masked
        value, which it chooses): that sum must be what the case counts the nodes sent in the clear give, or a node
        could scale the round's model (a sum of 1 multiplied it by a million) or make it infinite."""
        counts = [c for n, c in grid.counts.items() if n in state.active_node_ids]
        expected = sum(round(c / self.max_weight * self.quantization_range) for c in counts)
        if expected >= self.modulus_range:  # the sum wraps round: Flower's division would be wrong for honest nodes
            raise ValueError(f"the nodes' {sum(counts)} cases are too many for secagg-max-weight {self.max_weight:g}")
        token = _EXPECTED_WEIGHT.set(expected)
        try:
            return self._went_on(super().unmask_stage(grid, context, state), grid, "unmasking")
        finally:
            _EXPECTED_WEIGHT.reset(token)

    def _forget_lost(self, state) -> bool:
        """Make the nodes still active the round's nodes, and their neighbours among them (a node that never sent its
        key shares holds no part of the sum and no share another node needs); then check the protocol's threshold
        (Flower's check passes a round with no node left, whose unmasking then failed with an ``IndexError``)."""
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        state.nid_to_neighbours = {n: ns & kept for n, ns in state.nid_to_neighbours.items() if n in kept}
        return bool(kept) and self._check_threshold(state)


def _short_bytes(value: object) -> bool:
    return isinstance(value, bytes) and len(value) <= signed_keys.MAX_FIELD


def _asked(message: Message) -> tuple[str | None, list[int]]:
    """The SecAgg+ stage a message asks for (None for the workflow's other messages), and the nodes its reply must name:
    the neighbours whose keys it carries (but the node itself) when sharing keys, the nodes whose shares it asks for
    when unmasking."""
    record = message.content.config_records.get(RECORD_KEY_CONFIGS) if message.has_content() else None
    stage = record.get(Key.STAGE) if record is not None else None
    if stage == Stage.SHARE_KEYS:
        nodes = [int(k) for k in record if k.isdigit() and int(k) != message.metadata.dst_node_id]
    elif stage == Stage.UNMASK:
        nodes = [*record[Key.ACTIVE_NODE_ID_LIST], *record[Key.DEAD_NODE_ID_LIST]]
    else:
        nodes = []
    return (stage if isinstance(stage, str) else None), nodes


def run_secagg(
    grid: Grid,
    context: Context,
    run: RunConfig,
    initial: dict[str, np.ndarray],
    train_config: dict,
    runlog: RunLog,
    evaluate_fn: Callable[[int, ArrayRecord], object],
) -> dict[str, np.ndarray]:
    """Run the run's rounds of FedAvg with SecAgg+ over ``min-nodes`` nodes (``secagg-max-weight`` sets the
    quantisation step); return the final global arrays (by name)."""
    rounds, min_nodes, timeout = run.num_server_rounds, run.min_nodes, run.round_timeout
    local_epochs, max_weight = run.local_epochs, run.secagg_max_weight
    if min_nodes < 3:
        raise InputError(f"secure aggregation needs min-nodes >= 3 (key shares among the others), got {min_nodes}")
    if not FULL_SEEDS:
        raise InputError("secure aggregation: this Flower draws SecAgg+ masks in a way this version does not know")
    names = list(initial)
    current = {"round": 0, "arrays": dict(initial)}

    def fit_config(server_round: int) -> dict:
        current["round"] = server_round
        runlog.record(server_round)["secure_aggregation"] = "SecAgg+"
        return {**train_config, "server-round": server_round, "epoch": (server_round - 1) * local_epochs}

    def fit_metrics(results: list[tuple[int, dict]]) -> dict:
        # the protocol hides which node sent what: records are keyed by position and names are only labels; a metric
        # that fails server.replies' checks is dropped (no single reply can be refused), and only then counts
        # against its position's bound on names (the legacy API also lets a node send text and bytes)
        for index, (num_examples, metrics) in enumerate(results):
            site = runlog.site(current["round"], index, printable(metrics.get("site", "?"), 64))
            good = {k: v for k, v in metrics.items() if metric_problem("train", k, v) is None}
            kept = runlog.names_of(index, good)
            site.update({k: v for k, v in good.items() if k in kept})
            site["train-examples"] = int(num_examples)
        return {}

    def evaluate(server_round: int, ndarrays: list[np.ndarray], config: dict) -> None:
        arrays = {n: np.asarray(a, dtype=np.float32) for n, a in zip(names, ndarrays, strict=True)}
        if not all(np.isfinite(a).all() for a in arrays.values()):  # no single update can be checked here
            raise RuntimeError(
                f"round {server_round}: the securely aggregated model is not finite (some node's update was not); "
                "the run stops before it is saved or sent"
            )
        current["arrays"] = arrays
        evaluate_fn(server_round, ArrayRecord({k: Array(v) for k, v in arrays.items()}))
        return None

    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=min_nodes,
        min_evaluate_clients=0,
        min_available_clients=min_nodes,
        initial_parameters=ndarrays_to_parameters([np.asarray(initial[n], dtype=np.float32) for n in names]),
        on_fit_config_fn=fit_config,
        evaluate_fn=evaluate,
        fit_metrics_aggregation_fn=fit_metrics,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds, round_timeout=timeout), strategy=strategy
    )

    def failed(exc: Exception) -> None:
        reason = f"secure aggregation failed ({type(exc).__name__}: {printable(str(exc), 300)})"
        runlog.record(current["round"])["skipped"] = reason

    workflow = DefaultWorkflow(
        fit_workflow=RoundSafeSecAgg(
            num_shares=1.0,  # every sampled node holds a share of every other node's key
            reconstruction_threshold=RECONSTRUCTION,
            max_weight=max_weight,
            timeout=timeout,
            on_failure=failed,
        )
    )
    shapes = [np.shape(initial[n]) for n in names]
    workflow(CheckedGrid(grid, shapes, run.max_examples), legacy)  # type: ignore[arg-type]
    return current["arrays"]
