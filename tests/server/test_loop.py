"""The server's message loop (server.loop) on a deployed grid: packed once for all nodes, a broken reply is that
node's failure."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from messages.arrays import is_packed, pack, unpack
from tests.helpers import tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


class DeployedGrid(HttpGrid):
    """Flower's deployed grid as :func:`server.loop.send_and_receive` sees it, with scripted nodes:
    node 1 answers in kind, node 2 with a layout that does not fit, node 3 never."""

    def __init__(self) -> None:  # no SuperLink
        self.pushed: list[Message] = []
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{i}"  # as the SuperLink assigns them
            self.pushed.append(message)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        replies = []
        for message in self.pushed:
            if message.metadata.message_id not in message_ids or message.metadata.dst_node_id == 3:
                continue
            content = unpack(message.content)
            if message.metadata.dst_node_id == 2:
                content["config"] = ConfigRecord()
                content = pack(content)
                content["arrays.layout"]["shapes"] = ["1"] * len(content["arrays.layout"]["shapes"])
            else:
                content = pack(content)
            replies.append(Message(content, reply_to=message))
        return replies


def test_the_server_sends_packed_on_a_deployed_grid_and_turns_a_broken_reply_into_that_nodes_failure():
    from server.loop import REPLY_POLL, TTL_MARGIN, send_and_receive

    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float16").items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2, 3)]
    grid = DeployedGrid()
    start = time.monotonic()
    replies = send_and_receive(grid, messages, timeout=1.0)
    assert 1.0 <= time.monotonic() - start < 1.0 + 2 * REPLY_POLL + 0.5  # node 3 is waited for, then left out
    assert grid.pulls >= 4  # every REPLY_POLL seconds, not every 3 s
    assert all(is_packed(m.content) for m in grid.pushed)
    assert len({id(m.content) for m in grid.pushed}) == 1  # packed once for all nodes
    # a node that comes back after the wait finds nothing of this round to work through (Flower's default: 12 h)
    assert {m.metadata.ttl for m in grid.pushed} == {1.0 + TTL_MARGIN}

    by_node = {r.metadata.src_node_id: r for r in replies}
    assert sorted(by_node) == [1, 2]
    good = by_node[1].content["arrays"]
    assert list(good) == list(arrays) and all(np.array_equal(good[k].numpy(), arrays[k].numpy()) for k in arrays)
    assert by_node[2].has_error() and "do not unpack" in by_node[2].error.reason


def test_a_node_whose_error_reads_like_the_servers_refusal_is_still_filed_as_its_own_error(tmp_path):
    """A node's error reply is its own text: one that began with the server's "refused: " was filed in the run log as
    the server's refusal of its reply. Only the refusal the server made itself (a reply that does not unpack) is."""
    from flwr.app import Error

    from server.loop import REFUSED, ServerRefusal, split_replies
    from server.replies import ReplyRules
    from server.runlog import RunLog

    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float32").items()})
    sent = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    server_made = ServerRefusal(
        Error(code=0, reason=f"{REFUSED}its reply's packed arrays do not unpack"), reply_to=sent[0]
    )
    imitation = Message(Error(code=0, reason=f"{REFUSED}its reply's packed arrays do not unpack"), reply_to=sent[1])
    for reply, message in zip((server_made, imitation), sent, strict=True):
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
    runlog = RunLog(tmp_path)
    assert split_replies(runlog, 1, "train", sent, [server_made, imitation], 1.0, ReplyRules.of(arrays, 100)) == []
    kinds = {f["node"]: f["kind"] for f in runlog.record(1)["failures"]}
    assert kinds == {1: "refused", 2: "error"}


def test_the_superlinks_error_for_a_node_it_lost_is_that_nodes_and_the_node_that_hung_is_the_silent_one(tmp_path):
    """A SuperLink answers for a node whose heartbeat lapsed with an error reply from its own id (1): it was filed
    against id 1, the lost node counted as silent, and the node that really hung went unrecorded."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID

    from server.loop import split_replies
    from server.replies import ReplyRules
    from server.runlog import RunLog

    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float32").items()})
    sent = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type=MessageType.TRAIN) for n in (11, 12)]
    for i, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"m{i}"  # as the SuperLink assigns them
    lost = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent[0])  # node 12 hangs and says nothing
    lost.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as the SuperLink makes it
    runlog = RunLog(tmp_path)
    assert split_replies(runlog, 1, "train", sent, [lost], 1.0, ReplyRules.of(arrays, 100)) == []
    assert [(f["node"], f["kind"]) for f in runlog.record(1)["failures"]] == [(11, "error"), (12, "silent")]


@pytest.mark.parametrize("where", ["arrays", "extra"])
def test_a_packed_reply_may_name_only_the_arrays_that_were_sent(where, monkeypatch):
    """A layout that names 200,000 empty arrays (3.7 MB on the wire) made the server build one array object per name,
    about 6 s of its time, before any check; so did one under a record of another name. Refused before any is built."""
    import messages.arrays as wire
    from server.loop import _unpacked

    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float16").items()})
    message = Message(pack(RecordDict({"arrays": arrays})), dst_node_id=1, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = "m0"
    honest = pack(RecordDict({"arrays": arrays}))
    assert not _unpacked(Message(honest, reply_to=message), {"m0": message}).has_error()

    many = 200_000
    names = [f"x{i}" for i in range(many)]
    layout = ConfigRecord({"names": names, "shapes": ["0"] * many, "dtypes": ["float32"] * many})
    empty = ArrayRecord({"float32": Array(np.zeros(0, np.float32))})
    hostile = RecordDict({"arrays": empty, "arrays.layout": layout} if where == "arrays" else {**honest})
    if where == "extra":
        hostile["extra"], hostile["extra.layout"] = empty, layout
    built = []
    monkeypatch.setattr(wire, "Array", lambda *a, **k: built.append(1) or Array(*a, **k))
    reply = _unpacked(Message(hostile, reply_to=message), {"m0": message})
    assert reply.has_error() and "does not hold the arrays that were sent" in reply.error.reason
    assert not built


def test_a_node_cannot_add_columns_to_the_run_log_every_round(tmp_path):
    """A node that sends 200 metric names of its own each round grew metrics.csv by 200 columns a round (past
    Excel's 16,384 in 80 rounds); over a run one node may put at most MAX_NODE_NAMES names in the log, and the other
    nodes' records keep all of theirs."""
    from server.loop import split_replies
    from server.replies import ReplyRules
    from server.runlog import MAX_NODE_NAMES, RunLog

    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float32").items()})
    runlog = RunLog(tmp_path)
    for server_round in range(1, 6):
        sent = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
        replies = []
        for message in sent:
            metrics = {"num-examples": 3, "train-loss": 0.5, "train-time-train": 2.0}
            if message.metadata.dst_node_id == 2:  # 200 new names a round, and only the required ones besides
                metrics = {"num-examples": 3, "train-loss": 0.5}
                metrics |= {f"train-junk-{server_round}-{i}": 1.0 for i in range(200)}
            reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            replies.append(reply)
        assert len(split_replies(runlog, server_round, "train", sent, replies, 1.0, ReplyRules.of(arrays, 100))) == 2
        honest = runlog.record(server_round)["sites"]["1"]
        assert honest["train-time-train"] == 2.0 and honest["train-loss"] == 0.5  # the honest node keeps its own
    names = {k for r in range(1, 6) for k in runlog.record(r)["sites"]["2"]}
    assert len(names) <= MAX_NODE_NAMES + 2 and len(names) > 400  # its first names are logged, then no more
