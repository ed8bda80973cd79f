"""The server's message loop (server.loop) on a deployed grid: packed once for all nodes, a broken reply is that
node's failure."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
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
    from server.loop import REPLY_POLL, send_and_receive

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

    by_node = {r.metadata.src_node_id: r for r in replies}
    assert sorted(by_node) == [1, 2]
    good = by_node[1].content["arrays"]
    assert list(good) == list(arrays) and all(np.array_equal(good[k].numpy(), arrays[k].numpy()) for k in arrays)
    assert by_node[2].has_error() and "do not unpack" in by_node[2].error.reason
