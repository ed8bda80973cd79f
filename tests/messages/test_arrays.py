"""Packed arrays (messages.arrays): the same values bit for bit, in a few objects, not hundreds; a packed layout or
an array header that lies is refused before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

import simulations.adversary as adversary
from messages.arrays import WireError, is_packed, pack, pack_record, unpack, unpack_record
from tests.helpers import tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


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


def test_a_header_that_lies_about_its_size_allocates_nothing():
    from messages.arrays import WireError, decode_array

    header = adversary._npy_header("float32", (10**13,))  # 40 TB claimed in 128 bytes
    lying = Array(dtype="float32", shape=(10**13,), stype="numpy.ndarray", data=header + bytes(8))
    assert len(lying.data) < 200
    with pytest.raises(WireError, match="bytes of values"):
        decode_array(lying)
    with pytest.raises(MemoryError):  # what Flower's own reader does with it
        lying.numpy()
