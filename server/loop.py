"""The federated round loop: rounds that never wait forever, and a checkpoint after every round.

Flower's ``Strategy.start`` waits without limit for ``min_available_nodes`` before each round,
and aborts the run on an aggregation error. :func:`run_rounds` drives the same strategy hooks
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``), with
these rules:

- a round starts once ``min_nodes`` nodes are connected, or is **skipped** after ``node_wait``
  seconds with fewer;
- the nodes have ``timeout`` seconds to reply; a node that fails (error reply) or stays silent is
  recorded in the run log with its reason, and the round aggregates the others;
- with fewer than ``min_replies`` good replies the round is **skipped**: the global model stays
  as it was, and the next round proceeds;
- after every round the server state is checkpointed atomically (:class:`ServerCheckpoint`), so
  ``resume-from`` continues from the last completed round;
- replies are collected every ``REPLY_POLL`` seconds (:func:`send_and_receive`): a deployed grid
  otherwise looks only every 3 s, which a small federation's every stage would wait for.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

from client import wire
from mstkd.atomic import atomic_path
from mstkd.errors import InputError
from server.runlog import RunLog

log = logging.getLogger("mstkd.server")

STRATEGY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")
"""Attributes that carry a strategy's memory across rounds (FedAvgM's momentum, FedAdam/FedYogi's moments)."""


def _inner(strategy):
    """The aggregating strategy inside a wrapper (differential privacy wraps one)."""
    return getattr(strategy, "strategy", strategy)


@dataclass
class ServerCheckpoint:
    """Everything the server needs to continue after round ``round``."""

    round: int
    arrays: dict[str, np.ndarray]  # the global student + discriminator, float32
    strategy: dict[str, Any] = field(default_factory=dict)
    records: dict[int, dict] = field(default_factory=dict)  # the run log so far
    best: dict[str, Any] = field(default_factory=dict)
    state_key: str = ""  # names the nodes' state folders
    random_state: Any = None  # Python's RNG, which Flower's node sampling uses
    privacy: dict = field(default_factory=dict)  # the privacy accountant's state

    FILE = "server_state.pkl"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.FILE
        with atomic_path(path) as tmp:
            tmp.write_bytes(pickle.dumps(self.__dict__, protocol=pickle.HIGHEST_PROTOCOL))
        return path

    @classmethod
    def load(cls, folder: Path) -> ServerCheckpoint:
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise InputError(f"resume-from: {folder} holds no {cls.FILE} (not a run folder, or no round finished)")
        return cls(**pickle.loads(path.read_bytes()))


def strategy_state(strategy) -> dict[str, Any]:
    inner = _inner(strategy)
    return {name: getattr(inner, name) for name in STRATEGY_STATE if getattr(inner, name, None) is not None}


def restore_strategy(strategy, state: dict[str, Any]) -> None:
    inner = _inner(strategy)
    for name, value in state.items():
        setattr(inner, name, value)


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in arrays.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


REPLY_POLL = 0.25


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive``, except on a deployed grid (Flower's ``HttpGrid``): there the arrays travel
    packed (:mod:`client.wire`; replies come back unpacked) and replies are looked for every ``REPLY_POLL``
    seconds instead of every 3 s. Every other grid moves messages in memory and polls fast already."""
    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    packed: dict[int, RecordDict] = {}  # the strategy gives every node the same content: pack it once
    for message in messages:
        if id(message.content) not in packed:
            packed[id(message.content)] = wire.pack(message.content)
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


def _unpacked(reply: Message, sent: dict[str, Message]) -> Message:
    """A reply with its arrays unpacked, or an error reply from its node when they do not unpack."""
    if not reply.has_content():
        return reply
    try:
        reply.content = wire.unpack(reply.content)
    except (ValueError, KeyError, TypeError) as exc:
        reason = f"its reply's packed arrays do not unpack: {exc}"
        return Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=sent[reply.metadata.reply_to_message_id])
    return reply


def wait_for_nodes(grid: Grid, count: int, patience: float, poll: float = 1.0) -> int:
    """Wait up to ``patience`` seconds for ``count`` connected nodes; return how many there are."""
    deadline = time.monotonic() + patience
    while (connected := len(list(grid.get_node_ids()))) < count and time.monotonic() < deadline:
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
    return connected


def split_replies(
    runlog: RunLog, server_round: int, stage: str, sent: list[Message], replies: list[Message], timeout: float
) -> list[Message]:
    """Record failed and silent nodes in the run log; return the good replies."""
    rec = runlog.record(server_round)
    good = [r for r in replies if not r.has_error()]
    rec["bytes_received"] += sum(a.count_bytes() for r in good for a in r.content.array_records.values())
    for reply in replies:
        if reply.has_error():
            reason = reply.error.reason
            rec["failures"].append({"stage": stage, "node": reply.metadata.src_node_id, "reason": reason})
            log.warning("round %d: %s failed on node %s: %s", server_round, stage, reply.metadata.src_node_id, reason)
    answered = {r.metadata.src_node_id for r in replies}
    silent = [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]
    for node in silent[: max(len(sent) - len(replies), 0)]:
        reason = f"no reply within the round timeout ({timeout:g} s)"
        rec["failures"].append({"stage": stage, "node": node, "reason": reason})
        log.warning("round %d: %s on node %s: %s", server_round, stage, node, reason)
    return good


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
    evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
    before_round: Callable[[], str | None] | None = None,
    say: Callable[[str], None] = log.info,
) -> ArrayRecord:
    """Rounds ``first_round`` .. ``num_rounds`` (see the module doc); returns the final global arrays.

    ``before_round`` may end the run cleanly before a round starts by returning the reason
    (differential privacy: the next release would exceed the budget).
    """
    if first_round == 1 and evaluate_fn is not None:
        evaluate_fn(0, arrays)
    for server_round in range(first_round, num_rounds + 1):
        reason = before_round() if before_round is not None else None
        if reason:
            runlog.stopped = f"stopped before round {server_round}: {reason}"
            say(runlog.stopped)
            break
        rec = runlog.record(server_round)
        connected = wait_for_nodes(grid, min_nodes, node_wait)
        if connected < min_nodes:
            rec["skipped"] = f"{connected} of {min_nodes} nodes connected after {node_wait:g} s"
        else:
            sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
            replies = send_and_receive(grid, sent, timeout)
            good = split_replies(runlog, server_round, "train", sent, replies, timeout)
            if len(good) < min_replies:
                rec["skipped"] = f"{len(good)} of {len(sent)} nodes replied (min-replies {min_replies})"
            else:
                try:
                    new, _ = strategy.aggregate_train(server_round, good)
                except Exception as exc:  # e.g. replies whose metric keys disagree (mixed client versions)
                    new = None
                    rec["skipped"] = f"aggregation failed: {type(exc).__name__}: {exc}"
                if new is None:
                    rec.setdefault("skipped", "the strategy aggregated nothing")
                else:
                    arrays = new
                    sent = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
                    replies = send_and_receive(grid, sent, timeout)
                    good = split_replies(runlog, server_round, "evaluate", sent, replies, timeout)
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
