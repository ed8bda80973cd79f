"""A broken or hostile node, for the fault tests and the robustness benchmark.

:data:`app` is the project's own ClientApp with one more mod, outermost: on the chosen simulated
partitions it corrupts every train reply in one way (:data:`ATTACKS`) before the reply leaves the
node. Two families:

- **poisoning** (well-formed replies that pass every check): ``scale`` sends the global model plus
  100 times the honest update, ``sign-flip`` the global model minus the honest update, ``noise``
  the global model plus Gaussian noise of sd 1 on every weight;
- **faults** (replies the server must refuse): NaN/inf values, a wrong shape, a wrong dtype, a
  missing or an extra array, a ``num-examples`` of 0, -5, NaN or 10^12, a truncated payload, an
  oversized one, and a 136-byte ``.npy`` header that claims 10^13 floats.

Which partition attacks how is read from the environment variable ``MSTKD_ADVERSARY``
(``{"attacks": {"1": "scale"}}``; the simulation engine's workers inherit it from ``flwr run``):
:func:`hostile_app` writes a copy of the app whose ClientApp is this one and returns that variable,
for ``simulations.launch.flower_simulation(..., app=..., env=...)``. Nothing of this is part of the
shipped app: its ``pyproject.toml`` names :mod:`client.app`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp

import client.app as honest
from simulations.launch import ROOT

ENV = "MSTKD_ADVERSARY"
POISONING = ("scale", "sign-flip", "noise")
FAULTS = (
    "nan",
    "shape",
    "dtype",
    "missing",
    "extra",
    "examples-0",
    "examples-negative",
    "examples-nan",
    "examples-huge",
    "truncated",
    "oversized",
    "huge-header",
)
ATTACKS = (*POISONING, *FAULTS)


def _floats(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _poison(kind: str, sent: dict[str, np.ndarray], honest_reply: dict[str, np.ndarray], seed: int):
    rng = np.random.default_rng(seed)
    if kind == "scale":
        return {k: sent[k] + 100.0 * (v - sent[k]) for k, v in honest_reply.items()}
    if kind == "sign-flip":
        return {k: sent[k] - (v - sent[k]) for k, v in honest_reply.items()}
    return {k: sent[k] + rng.normal(0.0, 1.0, v.shape).astype(np.float32) for k, v in honest_reply.items()}


def _raw(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def corrupt(kind: str, sent: Message, reply: Message, seed: int = 0) -> Message:
    """``reply`` (an honest train reply to ``sent``) corrupted by attack ``kind``, in place."""
    content = reply.content
    arrays, metrics = content["arrays"], content["metrics"]
    first = next(iter(arrays.keys()))
    if kind in POISONING:
        content["arrays"] = _arrays(_poison(kind, _floats(sent.content["arrays"]), _floats(arrays), seed))
    elif kind == "nan":
        values = _floats(arrays)
        values[first].flat[0], values[first].flat[-1] = np.nan, np.inf
        content["arrays"] = _arrays(values)
    elif kind == "shape":
        arrays[first] = Array(arrays[first].numpy()[None])
    elif kind == "dtype":
        arrays[first] = Array(arrays[first].numpy().astype(np.int32))
    elif kind == "missing":
        del arrays[first]
    elif kind == "extra":
        arrays["teacher.x"] = Array(np.zeros(16, np.float32))
    elif kind.startswith("examples-"):
        metrics["num-examples"] = {"0": 0, "negative": -5, "nan": float("nan"), "huge": 10**12}[kind[9:]]
    elif kind in ("truncated", "oversized"):  # the largest array: half its bytes cut, or 8 MB more
        name = max(arrays.keys(), key=lambda k: len(arrays[k].data))
        array = arrays[name]
        data = array.data[: len(array.data) // 2] if kind == "truncated" else array.data + bytes(8 * 2**20)
        arrays[name] = _raw(array.dtype, tuple(array.shape), data)
    elif kind == "huge-header":
        shape = (10**13,)
        arrays[first] = _raw("float32", shape, _npy_header("float32", shape) + bytes(8))
    else:
        raise ValueError(f"unknown attack {kind!r}; known: {', '.join(ATTACKS)}")
    return reply


SETTINGS: dict | None = None
"""The attacks by partition when set here (in-process tests); else the environment's ``MSTKD_ADVERSARY``."""


def _settings() -> dict:
    if SETTINGS is not None:
        return SETTINGS
    return json.loads(os.environ.get(ENV) or "{}")


def adversary_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Corrupt this node's train replies when its partition is a hostile one (see the module doc)."""
    reply = call_next(msg, context)
    attack = _settings().get("attacks", {}).get(str(context.node_config.get("partition-id")))
    if attack and msg.metadata.message_type == MessageType.TRAIN and reply.has_content():
        seed = int(msg.content["config"].get("server-round", 0))
        return corrupt(str(attack), msg, reply, seed)
    return reply


app = ClientApp(mods=[adversary_mod, *honest.MODS])
app.train()(honest.train)
app.evaluate()(honest.evaluate)
app.query()(honest.query)

APP_PARTS = ("mstkd", "client", "server", "messages", "simulations")
"""The packages the app needs (what its FAB carries), copied into a hostile app."""


def hostile_app(folder: Path, attacks: dict[int, str]) -> tuple[Path, dict[str, str]]:
    """A copy of the app in ``folder`` whose ClientApp is :data:`app`, and the environment that makes partition
    ``p`` attack with ``attacks[p]``."""
    if unknown := [a for a in attacks.values() if a not in ATTACKS]:
        raise ValueError(f"unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    for part in APP_PARTS:
        shutil.copytree(ROOT / part, folder / part, ignore=skip)
    for name in ("LICENSE", "README.md", ".gitignore"):
        shutil.copy2(ROOT / name, folder / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject, count = re.subn(r'clientapp = "client\.app:app"', 'clientapp = "simulations.adversary:app"', pyproject)
    if count != 1:
        raise RuntimeError("pyproject.toml: the clientapp component is not client.app:app")
    # the copy keeps the bundle's file list: it names the app's packages, which the copy holds
    (folder / "pyproject.toml").write_text(pyproject)
    return folder, {ENV: json.dumps({"attacks": {str(p): a for p, a in attacks.items()}})}
