"""The server's state after a round, on disk as arrays plus JSON: what ``resume-from`` continues from.

``server_state.npz`` holds the global student + discriminator, the strategy's memory (FedAvgM's
momentum, FedAdam's and FedYogi's moments, an adaptive clipping norm) and, as one JSON document,
the run log so far, the best round, the nodes' state key, Python's RNG state and the privacy
accountant. It is read with ``allow_pickle=False``: a run folder copied from elsewhere can hold
a wrong model, never code. One file, written atomically, so a crash leaves the previous round's.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from mstkd.atomic import atomic_path
from mstkd.errors import InputError
from mstkd.model import MSTKDNet, StyleDiscriminator, build_discriminator, count_parameters
from mstkd.model.federated import TRANSPORT_DTYPES, federated_arrays, load_federated_arrays
from mstkd.runconfig import RunConfig, Transport, check_state_key
from server.runlog import check_best, check_record

STRATEGY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")
"""Attributes that carry a strategy's memory across rounds (FedAvgM's momentum, FedAdam/FedYogi's moments)."""
WRAPPER_STATE = ("clipping_norm",)
"""What a differential-privacy wrapper carries across rounds (adaptive clipping moves its norm)."""
META = "__meta__"


def _inner(strategy):
    """The aggregating strategy inside a wrapper (differential privacy wraps one)."""
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy) -> dict[str, Any]:
    """What ``strategy`` carries across rounds and :class:`ServerCheckpoint` saves (attributes that hold nothing yet
    are left out)."""
    return {name: value for name, value in strategy_memory(strategy, copy=False).items() if value is not None}


def strategy_memory(strategy, *, copy: bool = True) -> dict[str, Any]:
    """Everything in ``strategy`` that aggregating a round changes, ``None`` where it holds nothing yet; a copy, so
    that :func:`restore_strategy` can undo a round whose aggregate is refused."""
    take = deepcopy if copy else (lambda value: value)
    inner = _inner(strategy)
    memory = {name: take(getattr(inner, name)) for name in STRATEGY_STATE if hasattr(inner, name)}
    if inner is not strategy and _moves(strategy):  # a fixed clipping norm is the run config's, not memory
        memory |= {f"wrapper.{name}": getattr(strategy, name) for name in WRAPPER_STATE if hasattr(strategy, name)}
    return memory


def _moves(strategy) -> bool:
    """Whether a differential-privacy wrapper moves its clipping norm from round to round (adaptive clipping)."""
    return hasattr(strategy, "target_clipped_quantile")


def restore_strategy(strategy, state: dict[str, Any]) -> None:
    """Put ``state`` (:func:`strategy_memory`, or what a checkpoint held) back into ``strategy``: only the attributes
    that carry its memory, whatever else a state file names. A fixed clipping norm is the run config's, not memory
    (a resumed run's nodes clip at the ``dp-clip`` its run config gives, and refuse another)."""
    inner = _inner(strategy)
    for name, value in state.items():
        if name.startswith("wrapper.") and name.removeprefix("wrapper.") in WRAPPER_STATE and inner is not strategy:
            if _moves(strategy):
                setattr(strategy, name.removeprefix("wrapper."), value)
        elif name in STRATEGY_STATE:
            setattr(inner, name, value)


def finite_memory(state: dict[str, Any]) -> bool:
    """Whether every number and array of a strategy's saved memory is finite (and a clipping norm positive)."""

    def finite(value: Any) -> bool:
        if isinstance(value, ArrayRecord):
            return all(finite(v.numpy()) for v in value.values())
        if isinstance(value, dict):
            return all(finite(v) for v in value.values())
        if isinstance(value, list | tuple):
            return all(finite(v) for v in value)
        return bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))

    norms = [v for k, v in state.items() if k == "wrapper.clipping_norm"]
    return finite(list(state.values())) and all(float(v) > 0 for v in norms)


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in arrays.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _flatten(name: str, value: Any, out: dict[str, np.ndarray]) -> Any:
    """Put the arrays of one strategy attribute into ``out``; return how to rebuild it (JSON)."""
    if isinstance(value, ArrayRecord):
        for key, array in value.items():
            out[f"strategy/{name}/{key}"] = array.numpy()
        return {"kind": "arrayrecord", "keys": list(value.keys())}
    if isinstance(value, dict):
        for key, array in value.items():
            out[f"strategy/{name}/{key}"] = np.asarray(array)
        return {"kind": "dict", "keys": list(value.keys())}
    if isinstance(value, list | tuple):
        for i, array in enumerate(value):
            out[f"strategy/{name}/{i}"] = np.asarray(array)
        return {"kind": "list", "length": len(value)}
    return {"kind": "number", "value": float(value)}


def _rebuild(name: str, how: dict, arrays: dict[str, np.ndarray]) -> Any:
    kind = how["kind"]
    if kind == "number":
        return float(how["value"])
    if kind == "list":
        return [arrays[f"strategy/{name}/{i}"] for i in range(int(how["length"]))]
    values = {key: arrays[f"strategy/{name}/{key}"] for key in how["keys"]}
    return numpy_to_arrays(values) if kind == "arrayrecord" else values


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

    FILE = "server_state.npz"
    OLD_FILE = "server_state.pkl"  # earlier versions pickled the state: never read

    def save(self, folder: Path) -> Path:
        arrays = {f"global/{k}": np.asarray(v, dtype=np.float32) for k, v in self.arrays.items()}
        layout = {name: _flatten(name, value, arrays) for name, value in self.strategy.items()}
        meta = {
            "round": self.round,
            "global": list(self.arrays),
            "strategy": layout,
            "records": {str(r): rec for r, rec in self.records.items()},
            "best": self.best,
            "state_key": self.state_key,
            "random_state": self.random_state,
            "privacy": self.privacy,
        }
        arrays[META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = Path(folder) / self.FILE
        with atomic_path(path) as tmp:
            with tmp.open("wb") as handle:
                np.savez(handle, allow_pickle=False, **arrays)
        return path

    @classmethod
    def load(cls, folder: Path) -> ServerCheckpoint:
        """The state in ``folder``.

        Raises:
            InputError: no state there, a pickled state of an earlier version, or a file that does not read.
        """
        path = Path(folder) / cls.FILE
        if not path.is_file():
            if (Path(folder) / cls.OLD_FILE).is_file():
                raise InputError(
                    f"resume-from: {folder} holds a server state of an earlier version ({cls.OLD_FILE}, a pickle), "
                    "which is never loaded (a pickle can run code); start a new run"
                )
            raise InputError(f"resume-from: {folder} holds no {cls.FILE} (not a run folder, or no round finished)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            meta = json.loads(arrays.pop(META).tobytes().decode())
            state = cls(
                round=int(meta["round"]),
                arrays={name: arrays[f"global/{name}"] for name in meta["global"]},
                strategy={name: _rebuild(name, how, arrays) for name, how in meta["strategy"].items()},
                records={int(r): rec for r, rec in meta["records"].items()},
                best=dict(meta["best"]),
                state_key=str(meta["state_key"]),
                random_state=_random_state(meta["random_state"]),
                privacy=dict(meta["privacy"]),
            )
        except (OSError, ValueError, KeyError, TypeError, EOFError, MemoryError, zipfile.BadZipFile) as exc:
            raise InputError(f"resume-from: {path} is not a readable server state ({type(exc).__name__})") from None
        if not all(np.issubdtype(v.dtype, np.floating) and np.isfinite(v).all() for v in state.arrays.values()):
            raise InputError(f"resume-from: {path} holds a global model that is not finite; it is not resumed")
        unknown = [
            k for k in state.strategy if k not in STRATEGY_STATE and k.removeprefix("wrapper.") not in WRAPPER_STATE
        ]
        if unknown or not finite_memory(state.strategy):
            what = f"an unknown strategy setting {unknown[0]!r}" if unknown else "a strategy memory that is not finite"
            raise InputError(f"resume-from: {path} holds {what}; it is not resumed")
        try:  # checked here once, not refused by every node in every round
            check_state_key(state.state_key, "its state key")
        except InputError as exc:
            raise InputError(f"resume-from: {path}: {exc}; it is not resumed") from None
        for server_round, record in state.records.items():  # shown after training: checked before it
            try:
                check_record(record, server_round)
            except ValueError as exc:
                raise InputError(
                    f"resume-from: {path}: round {server_round}'s record: {exc}; it is not resumed"
                ) from None
        try:
            check_best(state.best, state.round)
        except ValueError as exc:
            raise InputError(f"resume-from: {path}: its best round is {exc}; it is not resumed") from None
        return state


def _random_state(value: Any) -> Any:
    """Python's ``random.getstate()`` back from JSON (lists to tuples)."""
    if value is None:
        return None
    version, internal, gauss = value
    return (int(version), tuple(int(v) for v in internal), gauss)


def global_model(
    cfg, run: RunConfig, checkpoint: ServerCheckpoint | None, device: Any, say: Callable[[str], None]
) -> tuple[MSTKDNet, StyleDiscriminator, ArrayRecord]:
    """The global student and discriminator, and the arrays round 1 starts from: freshly initialised, or those of
    the run ``checkpoint`` (``resume-from``) continues (one line on a model this version cannot load). Says what
    travels.

    Raises:
        InputError: the checkpoint holds a model of another shape.
    """
    student = MSTKDNet(cfg.model)
    disc = build_discriminator(cfg.model)
    if checkpoint is not None:
        initial = numpy_to_arrays(checkpoint.arrays)
        try:
            load_federated_arrays(student, disc, checkpoint.arrays)
        except (RuntimeError, ValueError) as exc:  # e.g. a run of the earlier region head (3 outputs)
            raise InputError(f"resume-from: {run.resume_from} holds a model this version cannot load ({exc})") from None
    else:
        initial = ArrayRecord({k: Array(v) for k, v in federated_arrays(student, disc, Transport.FLOAT32).items()})
    floats = sum(v.numel() for m in (student, disc) for v in m.state_dict().values() if v.is_floating_point())
    message_mb = floats * np.dtype(TRANSPORT_DTYPES[run.transport]).itemsize / 1e6
    say(
        f"model {cfg.model.preset}: {count_parameters(student) / 1e6:.2f} M student parameters, "
        f"{len(initial)} federated arrays, {message_mb:.1f} MB per message ({run.transport}); server device {device}"
    )
    return student, disc, initial
