"""The federated arrays in one piece on a deployed grid.

A deployed Flower 1.42 grid moves a message as separate objects: every array of an
``ArrayRecord`` is one (plus one per 5 MB chunk), and each is pulled with its own HTTPS request,
two at a time, first by the SuperNode from the SuperLink and then by the per-message
``flwr-clientapp`` from the SuperNode. The student + discriminator are 239 arrays (``tiny``) to
337 (``paper``): a ``tiny`` message was 301 objects. The per-message process starts pulling
before its SuperNode has them all, and backs off 1, 2, 4, 8 s on each miss: 15-20 s per message
at ``tiny`` size.

So on a deployed grid each ``ArrayRecord`` of a message travels packed: one flat array per dtype,
under the record's own key, and its layout (names, shapes, dtypes, in order) in a ``ConfigRecord``
under ``<key>.layout``. The server packs what it sends and unpacks what it receives
(:func:`server.loop.send_and_receive`); :func:`packed_arrays_mod`, the node's outermost mod,
unpacks an incoming message and packs its reply in the same way. Nothing else sees the packing:
the mods, the work and the strategy get the named arrays, bit for bit (in native byte order).
The values are the same whichever way they travel; a simulation (no object transfer) sends them
as they are, and so does secure aggregation, whose messages Flower's own workflow sends.

Whatever arrives is read with :func:`decode_array`, never with ``Array.numpy()``: a ``.npy`` header
is the sender's word, and NumPy allocates what a header claims before it reads a byte (a 136-byte
array claiming 10^13 floats asks for 40 TB). :func:`decode_array` checks the header against the
bytes that actually arrived first, and reads plain numbers only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from math import prod

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from numpy.lib import format as npy

LAYOUT = ".layout"  # suffix of the ConfigRecord that holds a packed ArrayRecord's layout
NUMERIC = "biuf"  # dtype kinds an array may have: bool, signed, unsigned, float (never objects or strings)
MAX_HEADER = 4096  # bytes of a .npy header; NumPy writes about 128 for any array of ours


NDARRAY = "numpy.ndarray"
"""How Flower names an array serialised as NumPy's ``.npy``: the only kind read here."""


class WireError(ValueError):
    """An array that does not read as what it claims to be."""


def decode_array(array: Array, kinds: str = NUMERIC) -> np.ndarray:
    """The values of ``array``, read only once its header agrees with its metadata and with the bytes that came.

    Checks, in order, before anything is allocated: NumPy serialisation, a version 1 or 2 header of at most
    ``MAX_HEADER`` bytes, a dtype of one of ``kinds`` (no objects, no records), the header's shape and dtype
    equal to the array's metadata (where it has any: the legacy API's arrays carry none), and exactly
    ``prod(shape) x itemsize`` bytes after the header. The result is a read-only view of the received bytes.

    Raises:
        WireError: any check fails (the message says which).
    """
    if array.stype != NDARRAY:
        raise WireError(f"serialised as {str(array.stype)[:40]!r}, not as a NumPy array")
    data = array.data
    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise WireError(f"unsupported .npy version {version}")
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(stream, max_header_size=MAX_HEADER)
    except WireError:
        raise
    except Exception as exc:  # NumPy raises ValueError, SyntaxError, EOFError... for a bad header
        raise WireError(f"unreadable .npy header ({type(exc).__name__})") from None
    if dtype.kind not in kinds or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"dtype {dtype} is not a plain number type")
    legacy = str(array.dtype) == "" and tuple(array.shape) == ()  # Flower's legacy parameters carry no metadata
    if not legacy and (tuple(shape) != tuple(array.shape) or dtype.name != str(array.dtype)):
        raise WireError(f"header says {dtype.name} {tuple(shape)}, metadata {array.dtype} {tuple(array.shape)}")
    count = prod(shape)
    expected = count * dtype.itemsize
    if len(data) - stream.tell() != expected:
        raise WireError(
            f"{len(data) - stream.tell()} bytes of values where {dtype.name} {tuple(shape)} needs {expected}"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return values.reshape(shape, order="F" if fortran else "C")


def nonfinite(values: np.ndarray) -> int:
    """How many values of a float array are NaN or infinite (0 for any other dtype)."""
    return int(values.size - np.count_nonzero(np.isfinite(values))) if values.dtype.kind == "f" else 0


def pack_record(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
    """One flat array per dtype (keyed by its name), and the layout that restores ``record``."""
    arrays = {name: array.numpy() for name, array in record.items()}
    dtypes = {name: a.dtype.name for name, a in arrays.items()}
    flats = {
        dtype: np.concatenate([a.ravel() for name, a in arrays.items() if dtypes[name] == dtype])
        for dtype in dict.fromkeys(dtypes.values())
    }
    layout = ConfigRecord(
        {
            "names": list(arrays),
            "shapes": [",".join(map(str, a.shape)) for a in arrays.values()],
            "dtypes": list(dtypes.values()),
        }
    )
    return ArrayRecord({dtype: Array(flat) for dtype, flat in flats.items()}), layout


def unpack_record(packed: ArrayRecord, layout: ConfigRecord) -> ArrayRecord:
    """The named arrays :func:`pack_record` packed, in their order.

    Raises:
        ValueError: the layout does not account for exactly the packed values, or a packed array does not
            read (:class:`WireError`).
    """
    flats = {dtype: decode_array(array) for dtype, array in packed.items()}
    used = dict.fromkeys(flats, 0)
    out = {}
    names = list(layout["names"])
    if len(set(names)) != len(names):
        raise ValueError("packed arrays: the layout names an array twice")
    for name, shape_text, dtype in zip(names, layout["shapes"], layout["dtypes"], strict=True):
        shape = tuple(int(n) for n in str(shape_text).split(",") if n)
        if any(n < 0 for n in shape):
            raise ValueError(f"packed arrays: {name} has a negative size")
        start, size = used.get(dtype, 0), prod(shape)
        if dtype not in flats or start + size > flats[dtype].size:
            raise ValueError(f"packed arrays: {name} ({dtype}, {shape}) lies beyond the packed values")
        out[name] = Array(flats[dtype][start : start + size].reshape(shape))
        used[dtype] = start + size
    if any(used[d] != flats[d].size for d in flats):
        raise ValueError("packed arrays: values left over after the layout")
    return ArrayRecord(out)


def pack(content: RecordDict) -> RecordDict:
    """``content`` with every ArrayRecord of more than one array packed (see the module doc)."""
    out = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and len(record) > 1:
            if key + LAYOUT in content:
                raise ValueError(f"cannot pack record {key!r}: the message already has a record {key + LAYOUT!r}")
            out[key], out[key + LAYOUT] = pack_record(record)
        else:
            out[key] = record
    return out


def is_packed(content: RecordDict) -> bool:
    return any(key.endswith(LAYOUT) and key[: -len(LAYOUT)] in content.array_records for key in content.config_records)


def unpack(content: RecordDict, expected: Mapping[str, Sequence[str]] | None = None) -> RecordDict:
    """``content`` with its packed ArrayRecords restored; unchanged if nothing is packed.

    ``expected`` (the server reading a node's reply) names the records that may be packed and the arrays each must
    name, in any order: any other layout is refused before an array is built, since a layout naming a few hundred
    thousand empty arrays costs seconds of the server's time per megabyte.

    Raises:
        ValueError: with ``expected``, a packed record it does not name, or a layout of other names.
    """
    packed = {key[: -len(LAYOUT)] for key in content.config_records if key.endswith(LAYOUT)}
    packed &= set(content.array_records)
    if expected is not None:
        for key in sorted(packed):
            names = content.config_records[key + LAYOUT].get("names")
            wanted = expected.get(key, ())
            if not isinstance(names, list) or len(names) != len(wanted) or set(names) != set(wanted):
                raise ValueError(f"packed arrays: record {key[:40]!r} does not hold the arrays that were sent")
    out = RecordDict()
    for key, record in content.items():
        if key in packed:
            out[key] = unpack_record(record, content.config_records[key + LAYOUT])
        elif not (key.endswith(LAYOUT) and key[: -len(LAYOUT)] in packed):
            out[key] = record
    return out


def packed_arrays_mod(msg: Message, context: Context, call_next) -> Message:
    """The node's side: unpack a packed message for the mods and the work after this one, pack the reply."""
    if not is_packed(msg.content):
        return call_next(msg, context)
    msg.content = unpack(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply
