"""The federated round loop: rounds that never wait forever, and a checkpoint after every round.

Flower's ``Strategy.start`` waits without limit for ``min_available_nodes`` before each round,
and aborts the run on an aggregation error. :func:`run_rounds` drives the same strategy hooks
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``), with
these rules:

- a round starts once ``min_nodes`` nodes are connected, or is **skipped** after ``node_wait``
  seconds with fewer;
- the nodes have ``timeout`` seconds to reply; every reply is checked before the strategy sees it
  (:mod:`server.replies`; with ``site-cases``, its signature and case count too); a node that fails (error
  reply), sends a reply that is refused, or stays silent is recorded in the run log with its node id and the
  reason, and the round aggregates the others;
- a node that stayed silent sits the next rounds out (:mod:`server.silence`), so that it costs its timeout once;
- an aggregate that is not finite is not taken: the round is **skipped**;
- with fewer than ``min_replies`` good replies the round is **skipped**: the global model stays
  as it was, and the next round proceeds;
- after every round ``after_round`` runs: the server checkpoints its state there
  (:class:`server.state.ServerCheckpoint`), so ``resume-from`` continues from the last completed round;
- replies are collected every ``REPLY_POLL`` seconds (:func:`send_and_receive`): a deployed grid
  otherwise looks only every 3 s, which a small federation's every stage would wait for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

from messages.arrays import LAYOUT, decode_array, pack, unpack
from messages.signed_replies import shared_keys
from server.replies import (
    RefusedReply,
    ReplyRules,
    SiteCases,
    check_reply,
    common_metrics,
    finite_arrays,
    printable,
)
from server.runlog import RunLog
from server.silence import NodesAsked, SilentNodes
from server.state import finite_memory, restore_strategy, strategy_memory

log = logging.getLogger("mstkd.server")

REPLY_POLL = 0.25
TTL_MARGIN = 600.0
"""Seconds a message outlives the server's wait for its reply (Flower's default is 12 hours). A node that comes back
later then never works through rounds the server has given up on. The margin covers packing and pushing, and a
node's clock running minutes ahead (a node reckons its reply's lifetime on its own clock, and the SuperLink drops a
reply whose lifetime is spent)."""
REFUSED = "refused: "  # how a reason the server gives for refusing a reply begins


class ServerRefusal(Message):
    """The error reply the server makes in a node's place when that node's reply does not unpack. Told apart from
    the node's own error replies by its type, which no node can send, not by its text, which any node can."""


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive``, except on a deployed grid (Flower's ``HttpGrid``): there the arrays travel
    packed (:mod:`messages.arrays`; replies come back unpacked) and replies are looked for every ``REPLY_POLL``
    seconds instead of every 3 s. Every other grid moves messages in memory and polls fast already. Every message
    expires :data:`TTL_MARGIN` seconds after ``timeout`` (:func:`expire`)."""
    expire(messages, timeout)
    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    packed: dict[int, RecordDict] = {}  # the strategy gives every node the same content: pack it once
    for message in messages:
        if id(message.content) not in packed:
            packed[id(message.content)] = pack(message.content)
        message.content = packed[id(message.content)]
    ids = list(grid.push_messages(messages))
    sent = dict(zip(ids, messages, strict=True))
    waiting = set(ids)
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL)
    return [_unpacked(reply, sent) for reply in replies]


def expire(messages: list[Message], timeout: float | None) -> None:
    """Each of ``messages`` expires :data:`TTL_MARGIN` seconds after the server stops waiting, ``timeout`` seconds
    from now, or earlier where it would already (none: as it would)."""
    if timeout is not None:
        for message in messages:
            message.metadata.ttl = min(message.metadata.ttl, timeout + TTL_MARGIN)


def _unpacked(reply: Message, sent: dict[str, Message]) -> Message:
    """A reply with its arrays unpacked, or an error reply from its node when they do not unpack. Only the records
    its message had packed may be packed, naming the arrays that were sent (:func:`messages.arrays.unpack`)."""
    if not reply.has_content():
        return reply
    message = sent[reply.metadata.reply_to_message_id]
    layouts = message.content.config_records
    expected = {k.removesuffix(LAYOUT): list(v["names"]) for k, v in layouts.items() if k.endswith(LAYOUT)}
    try:
        reply.content = unpack(reply.content, expected)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as exc:
        reason = f"{REFUSED}its reply's packed arrays do not unpack: {exc}"
        return ServerRefusal(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=message)
    return reply


def step_norm(old: ArrayRecord, new: ArrayRecord) -> tuple[float, float]:
    """How far the global model moved in a round: the L2 norm of the change, and that over the old model's norm."""
    change = before = 0.0
    for name, array in old.items():
        a = decode_array(array, "f").astype(np.float64)
        change += float(np.sum((decode_array(new[name], "f").astype(np.float64) - a) ** 2))
        before += float(np.sum(a**2))
    return float(np.sqrt(change)), float(np.sqrt(change / before)) if before > 0 else float(change > 0)


def wait_for_nodes(grid: Grid, count: int, patience: float, poll: float = 1.0) -> int:
    """Wait up to ``patience`` seconds for ``count`` connected nodes; return how many there are."""
    deadline = time.monotonic() + patience
    while (connected := len(list(grid.get_node_ids()))) < count and time.monotonic() < deadline:
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
    return connected


def split_replies(
    runlog: RunLog,
    server_round: int,
    stage: str,
    sent: list[Message],
    replies: list[Message],
    timeout: float,
    rules: ReplyRules,
) -> list[Message]:
    """The good replies, each checked (:func:`server.replies.check_reply`) and its node's numbers recorded in the run
    log; failed, refused and silent nodes are recorded as failures, keyed by the node id Flower authenticated. With
    ``site-cases`` each must be signed by a listed key that signed no other reply here, and weighs at most its
    stage's share of that key's cases (:class:`server.replies.SiteCases`; a cut is recorded in ``capped``)."""
    rec = runlog.record(server_round)
    taken: list[tuple[Message, bytes, int]] = []  # each checked reply, and (site-cases) its signer and most cases
    for reply in replies:
        node = replier(reply, sent)
        if reply.has_error():
            reason = printable(reply.error.reason)  # the server's own refusal of a packed reply, or the node's error
            _failure(rec, server_round, stage, node, reason, "refused" if isinstance(reply, ServerRefusal) else "error")
            continue
        rec["bytes_received"] += sum(a.count_bytes() for a in reply.content.array_records.values())
        if any(t.metadata.src_node_id == node for t, _, _ in taken):
            _failure(rec, server_round, stage, node, f"{REFUSED}a second reply from this node", "refused")
            continue
        try:
            raw, reply.content = reply.content, check_reply(reply.content, stage, rules)
            signer, most = b"", 0
            if rules.site_cases is not None:
                claimed = int(reply.content["metrics"]["num-examples"])  # type: ignore[arg-type]
                signer, most = rules.site_cases.vouched(raw, node, stage, server_round, claimed)
        except RefusedReply as exc:
            _failure(rec, server_round, stage, node, f"{REFUSED}{exc}", "refused")
            continue
        taken.append((reply, signer, most))
    shared = shared_keys(signer for _, signer, _ in taken)
    good: list[Message] = []
    for reply, signer, most in taken:
        node = reply.metadata.src_node_id
        if signer in shared:
            reason = f"{REFUSED}its reply is signed by a key that signed another node's too (site-cases)"
            _failure(rec, server_round, stage, node, reason, "refused")
            continue
        if signer and (claimed := int(reply.content["metrics"]["num-examples"])) > most:  # type: ignore[arg-type]
            reply.content["metrics"]["num-examples"] = most
            rec.setdefault("capped", []).append({"stage": stage, "node": node, "claimed": claimed, "most": most})
            log.warning("round %d: node %s claims %d %s cases, site-cases %d", server_round, node, claimed, stage, most)
        record_site(runlog, server_round, stage, node, reply.content)
        good.append(reply)
    common_metrics([r.content for r in good])
    for node in _silent(sent, replies):
        _failure(rec, server_round, stage, node, f"no reply within the round timeout ({timeout:g} s)", "silent")
    return good


def replier(reply: Message, sent: list[Message]) -> int:
    """The node ``reply`` answers for: its sender, which Flower authenticated; or, for the error reply a SuperLink
    makes in place of a node it lost (sent from the SuperLink's own id), the node its message went to."""
    node = reply.metadata.src_node_id
    if node == SUPERLINK_NODE_ID and (answers := reply.metadata.reply_to_message_id):
        node = next((m.metadata.dst_node_id for m in sent if m.metadata.message_id == answers), node)
    return node


def _silent(sent: list[Message], replies: list[Message]) -> list[int]:
    """The nodes ``sent`` a message that none of ``replies`` answers, in the order sent."""
    answered = {replier(r, sent) for r in replies}
    return [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]


def _failure(rec: dict, server_round: int, stage: str, node: int | None, reason: str, kind: str) -> None:
    """Record one node's failure: ``kind`` is ``refused`` (the server refused its reply), ``error`` (the node
    replied with an error) or ``silent`` (no reply in time)."""
    rec["failures"].append({"stage": stage, "node": node, "reason": reason, "kind": kind})
    log.warning("round %d: %s failed on node %s: %s", server_round, stage, node, reason)


def record_site(runlog: RunLog, server_round: int, stage: str, node: int, content: RecordDict) -> None:
    """A node's metrics and what it says about itself, in the round's record of that node."""
    info = content["site"] if "site" in content.config_records else {}
    site = runlog.site(server_round, node, str(info.get("name", "") or f"node-{node}"))
    # train and evaluate replies both count their cases as num-examples: keep both
    metrics = content["metrics"]
    kept = runlog.names_of(node, metrics.keys())  # a node's own names are bounded over the run
    site.update({(f"{stage}-examples" if k == "num-examples" else k): v for k, v in metrics.items() if k in kept})
    site.update({k: str(v) for k, v in info.items() if k != "name"})


def run_rounds(
    strategy,
    grid: Grid,
    *,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    runlog: RunLog,
    train_config: dict[str, Any],
    timeout: float,
    min_nodes: int,
    min_replies: int,
    node_wait: float,
    max_examples: int = 10_000,
    site_cases: SiteCases | None = None,
    required_metrics: tuple[str, ...] = (),
    evaluate_config: dict[str, Any] | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
    before_round: Callable[[], str | None] | None = None,
    on_release: Callable[[int], None] | None = None,
    silence: SilentNodes | None = None,
    say: Callable[[str], None] = log.info,
) -> ArrayRecord:
    """Rounds ``first_round`` .. ``num_rounds`` (see the module doc); returns the final global arrays.

    ``before_round`` may end the run cleanly before a round starts by returning the reason
    (differential privacy: the next release would exceed the budget). ``on_release(round)`` runs when a round's
    new global model is taken, before anything of it leaves the server (differential privacy counts it there).
    """
    if first_round == 1 and evaluate_fn is not None:
        evaluate_fn(0, arrays)
    silence = silence or SilentNodes(0)
    for server_round in range(first_round, num_rounds + 1):
        reason = before_round() if before_round is not None else None
        if reason:
            runlog.stopped = f"stopped before round {server_round}: {reason}"
            say(runlog.stopped)
            break
        rec = runlog.record(server_round)
        wait_for_nodes(grid, min_nodes, node_wait)
        everyone = NodesAsked(grid, set())  # the nodes connected now, which this round draws from
        if (connected := len(everyone.nodes)) < min_nodes:
            rec["skipped"] = f"{connected} of {min_nodes} nodes connected after {node_wait:g} s"
        else:
            if resting := silence.resting(server_round, everyone.nodes):
                rec["rested"] = sorted(resting)
                log.warning("round %d: nodes %s sit this round out (silent before)", server_round, rec["rested"])
            sent = list(
                strategy.configure_train(
                    server_round, arrays, ConfigRecord(dict(train_config)), NodesAsked(everyone, resting)
                )
            )
            rules = ReplyRules.of(arrays, max_examples, required_metrics, sent[0].content if sent else None, site_cases)
            replies = send_and_receive(grid, sent, timeout)
            good = split_replies(runlog, server_round, "train", sent, replies, timeout, rules)
            silent = set(_silent(sent, replies))
            silence.heard(server_round, [m.metadata.dst_node_id for m in sent], silent)
            # still at work on its training, or gone: not asked to validate
            asked = NodesAsked(grid, (resting | silent) if silence.most_rounds else set())
            if len(good) < min_replies:
                rec["skipped"] = f"{len(good)} of {len(sent)} nodes replied (min-replies {min_replies})"
            else:
                memory = strategy_memory(strategy)  # momentum, moments, a clipping norm: kept to undo a refused round
                try:
                    new, _ = strategy.aggregate_train(server_round, good)
                except Exception as exc:  # a strategy's own refusal (e.g. DP wrappers' checks): the round only
                    new = None
                    rec["skipped"] = f"aggregation failed: {type(exc).__name__}: {exc}"
                if new is not None and not finite_arrays(new):  # e.g. a server optimiser's step past float32
                    new = None
                    rec["skipped"] = "the aggregate is not finite"
                # FedAdam's and FedYogi's second moment overflows on a reply of finite values near float32's range
                # while their step stays finite (0): the model would then never move again, and the state not resume
                if new is not None and not finite_memory(strategy_memory(strategy, copy=False)):
                    new = None
                    rec["skipped"] = "the strategy's memory (momentum, moments) is not finite"
                if new is None:
                    rec.setdefault("skipped", "the strategy aggregated nothing")
                    restore_strategy(strategy, memory)  # a refused round leaves no trace in the next one
                else:
                    rec["step_norm"], rec["step_relative"] = step_norm(arrays, new)
                    arrays = new
                    if on_release is not None:
                        on_release(server_round)
                    sent = (  # a draw from no node would wait without limit
                        list(
                            strategy.configure_evaluate(
                                server_round, arrays, ConfigRecord(dict(evaluate_config or {})), asked
                            )
                        )
                        if asked.nodes
                        else []
                    )
                    replies = send_and_receive(grid, sent, timeout)
                    good = split_replies(runlog, server_round, "evaluate", sent, replies, timeout, rules)
                    silence.heard(server_round, [m.metadata.dst_node_id for m in sent], set(_silent(sent, replies)))
                    try:
                        if good:
                            strategy.aggregate_evaluate(server_round, good)
                    except Exception as exc:
                        rec["failures"].append({"stage": "evaluate", "node": None, "reason": f"aggregation: {exc}"})
        if "skipped" in rec and evaluate_fn is None:  # evaluate_fn reports the round itself
            say(f"round {server_round}: skipped ({rec['skipped']}); the global model is unchanged")
        if evaluate_fn is not None:
            evaluate_fn(server_round, arrays)
        if after_round is not None:
            after_round(server_round, arrays)
    return arrays
