"""Packed arrays on a deployed grid (messages.arrays): the same values bit for bit, in a few objects, not hundreds."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

from client.app import app as client_app
from messages.arrays import WireError, is_packed, pack, pack_record, unpack, unpack_record
from tests.inproc import deployed_site, tiny_arrays


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower sets in a process before it makes messages."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_packing_restores_every_array_bit_for_bit_in_order(dtype):
    arrays = tiny_arrays(dtype) | {"extra.scalar": np.array(2.5, np.float64), "extra.ints": np.arange(5)}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": ConfigRecord()})
    packed = pack(content)
    assert is_packed(packed) and not is_packed(content)
    assert sorted(packed["arrays"]) == sorted({dtype, "float64", "int64"})
    back = unpack(packed)
    assert list(back.keys()) == ["arrays", "config"] and list(back["arrays"]) == list(arrays)
    for name, value in arrays.items():
        got = back["arrays"][name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value), name
    assert unpack(content) is not content and list(unpack(content)["arrays"]) == list(arrays)


def test_a_packed_message_is_a_handful_of_objects():
    record = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float16").items()})
    plain = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type=MessageType.TRAIN)
    packed = Message(pack(RecordDict({"arrays": record})), dst_node_id=1, message_type=MessageType.TRAIN)
    # what a deployed node pulls one HTTPS request at a time
    assert len(get_all_nested_objects(plain)) > 200  # 301: the 239 arrays and their chunks, less duplicates
    assert len(get_all_nested_objects(packed)) < 10


def test_a_layout_that_does_not_fit_is_refused():
    record, layout = pack_record(ArrayRecord({"a": Array(np.zeros(3, np.float32)), "b": Array(np.ones(2))}))
    short = ConfigRecord({"names": ["a"], "shapes": ["3"], "dtypes": ["float32"]})
    with pytest.raises(ValueError, match="left over"):
        unpack_record(record, short)
    long = ConfigRecord({"names": ["a", "b"], "shapes": ["4", "2"], "dtypes": ["float32", "float64"]})
    with pytest.raises(ValueError, match="beyond"):
        unpack_record(record, long)
    assert list(unpack_record(record, layout)) == ["a", "b"]


def test_the_node_answers_a_packed_message_in_kind(tmp_path):
    run_config, node_config = deployed_site(tmp_path, worker="off")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float16").items()})

    def ask(kind: str, content: RecordDict) -> RecordDict:
        return client_app(Message(content, dst_node_id=1, message_type=kind), context).content

    evaluate = RecordDict({"arrays": arrays, "config": ConfigRecord()})
    plain_scores = ask(MessageType.EVALUATE, evaluate)["metrics"]
    packed_scores = ask(MessageType.EVALUATE, pack(evaluate))["metrics"]
    assert {k: v for k, v in plain_scores.items() if "-time-" not in k} == {
        k: v for k, v in packed_scores.items() if "-time-" not in k
    }

    train = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    reply = ask(MessageType.TRAIN, pack(train))
    assert is_packed(reply) and list(reply["arrays"]) == ["float16"]
    assert list(unpack(reply)["arrays"]) == list(arrays)

    # client-side differential privacy clips the unpacked update, whatever way it travels
    context.run_config["transport"] = "float32"
    clip = 0.01
    train = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2, KEY_CLIPPING_NORM: clip})})
    clipped = unpack(ask(MessageType.TRAIN, pack(train)))
    update = [clipped["arrays"][k].numpy() - arrays[k].numpy().astype(np.float32) for k in arrays]
    assert clipped["metrics"]["update-norm"] > 10 * clip  # the update before clipping
    assert np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update)) <= clip * 1.001


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


def test_a_packed_layout_cannot_smuggle_values_under_a_repeated_name_or_a_negative_size():
    """A layout that names ``a`` twice would spend 1000 extra values on the second ``a`` and hand on one array of the
    right shape: the extra payload would pass every later check. Refused, as is a negative size."""
    packed = ArrayRecord({"float32": Array(np.zeros(1003, np.float32))})
    twice = ConfigRecord({"names": ["a", "a"], "shapes": ["3", "1000"], "dtypes": ["float32", "float32"]})
    with pytest.raises(ValueError, match="names an array twice"):
        unpack_record(packed, twice)
    negative = ConfigRecord({"names": ["a", "b"], "shapes": ["-1,3", "1006"], "dtypes": ["float32", "float32"]})
    with pytest.raises(ValueError, match="negative size"):
        unpack_record(packed, negative)
    lying = Array(dtype="float32", shape=(1003,), stype="numpy.ndarray", data=packed["float32"].data[:-40])
    with pytest.raises(WireError, match="bytes of values"):  # a packed array is read as carefully as any
        unpack_record(
            ArrayRecord({"float32": lying}), ConfigRecord({"names": ["a"], "shapes": ["1003"], "dtypes": ["float32"]})
        )
