"""The run config's one home: every key a Flower run or a node takes, with its type, default, range and choices.

:class:`RunConfig` is ``[tool.flwr.app.config]`` in ``pyproject.toml`` (a test keeps the two identical) and
:class:`NodeConfig` is a node's ``--node-config``. Each is parsed once where a process starts (the ServerApp,
the ClientApp's work, a benchmark scenario, the CLI); everything after that reads typed attributes, so no part
keeps a default of its own. Flower passes ``--run-config`` values through as TOML gives them: ``parse`` refuses an
unknown key (naming the closest one), a value of the wrong type and a value out of range with one line naming the
key, before any work. Choices are :class:`~enum.StrEnum` members, and the registries that dispatch on them
(strategies, DP wrappers, transport dtypes) are keyed by those enums. A key's name is its field's with ``-`` for
``_`` (``num-server-rounds`` is ``num_server_rounds``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import DictConfig

from mstkd.errors import InputError, RefusedMessage
from mstkd.numbers import is_number, is_whole

POSITIVE, NON_NEGATIVE, UNIT = "positive", "non-negative", "unit"


class Strategy(StrEnum):
    """How the server combines the sites' updates."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    BULYAN = "bulyan"

    @property
    def robust(self) -> bool:
        """A median, a trimmed mean or a selection: one hostile site cannot move it at will."""
        return self in (Strategy.FEDMEDIAN, Strategy.FEDTRIMMEDAVG, Strategy.KRUM, Strategy.MULTIKRUM, Strategy.BULYAN)


class DPMode(StrEnum):
    """Differential privacy: none, clipped and noised by the server, or clipped by each site."""

    OFF = "off"
    SERVER = "server"
    CLIENT = "client"


class DPClipping(StrEnum):
    """A fixed clipping norm, or one that follows a quantile of the update norms."""

    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class Transport(StrEnum):
    """The dtype of the weights on the wire."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


class WorkerMode(StrEnum):
    """Whether a deployed node hands its work to a warm worker process (``auto``: where Flower starts a process
    per message)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _key(rule: str | None = None, default: Any = None, **kwargs: Any) -> Any:
    return field(default=default, metadata={"rule": rule}, **kwargs)


@dataclass(frozen=True)
class RunConfig:
    """The Flower run config, typed. Defaults are ``pyproject.toml``'s (a test keeps them so); see the comment
    beside each key there for what it does."""

    num_server_rounds: int = _key(POSITIVE, 5)
    local_epochs: float = _key(POSITIVE, 5.0)
    local_steps: int = _key(NON_NEGATIVE, 0)
    model: str = "lite"  # the preset: checked by load_config, which knows the preset files
    lr: float = _key(POSITIVE, 1e-3)
    seed: int = 42
    overrides: str = ""
    strategy: Strategy = Strategy.FEDAVG
    proximal_mu: float = _key(NON_NEGATIVE, 0.01)
    server_lr: float = _key(POSITIVE, 1.0)
    server_momentum: float = _key(UNIT, 0.9)
    malicious_nodes: int = _key(NON_NEGATIVE, 1)
    trim_beta: float = _key(UNIT, 0.2)
    krum_select: int = _key(NON_NEGATIVE, 0)
    update_bound: float = _key(NON_NEGATIVE, 0.0)
    max_examples: int = _key(POSITIVE, 10_000)
    site_cases: str = ""
    min_nodes: int = _key(POSITIVE, 2)
    fraction_train: float = _key(UNIT, 1.0)
    fraction_evaluate: float = _key(UNIT, 1.0)
    round_timeout: float = _key(POSITIVE, 3600.0)
    rest_silent: int = _key(NON_NEGATIVE, 4)
    min_replies: int = _key(POSITIVE, 1)
    node_wait: float = _key(NON_NEGATIVE, 600.0)
    resume_from: str = ""
    dp: DPMode = DPMode.OFF
    dp_clipping: DPClipping = DPClipping.FIXED
    dp_clip: float = _key(POSITIVE, 1.0)
    dp_clip_quantile: float = _key(UNIT, 0.5)
    dp_clip_lr: float = _key(POSITIVE, 0.2)
    dp_count_noise: float = _key(NON_NEGATIVE, 0.0)
    dp_noise: float = _key(NON_NEGATIVE, 0.1)
    dp_delta: float = _key(UNIT, 1e-5)
    dp_max_epsilon: float = _key(NON_NEGATIVE, 0.0)
    secagg: bool = False
    secagg_max_weight: float = _key(POSITIVE, 100.0)
    secagg_peers: str = ""
    transport: Transport = Transport.FLOAT16
    eval_every: int = _key(POSITIVE, 5)
    eval_initial: bool = False
    eval_subsets: str = "all"
    eval_cases: int = _key(NON_NEGATIVE, 0)
    eval_lesion: bool = False
    site_eval_subsets: str = "full"
    data_path: str = ""
    partitioning: str = ""
    test_data_path: str = ""
    drop_modalities: str = ""
    phantom_cases: int = _key(POSITIVE, 24)
    phantom_shape: str = "96 96 64"
    phantom_seed: int = 0
    work_dir: str = ""
    out_dir: str = ""
    overwrite: bool = False
    run_name: str = ""
    tensorboard: bool = False
    tracker: str = ""

    @property
    def trackers(self) -> tuple[str, str]:
        """What :class:`mstkd.tracking.Tracker` is given: ``tracker`` (comma-separated names), and tensorboard
        where ``tensorboard=true``."""
        return ("tensorboard" if self.tensorboard else "", self.tracker)

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> RunConfig:
        """A run config from Flower's flat mapping (or a scenario's): missing keys take their defaults.

        Raises:
            InputError: an unknown key, a wrong type or a value out of range (one line naming the key).
        """
        return _parse(cls, values, "run config")

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The flat mapping Flower passes (``--run-config`` keys), every key given."""
        return _flat(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def home(self) -> Path:
        """Where phantoms, caches and (in a simulation) node state go: ``work-dir``, else :func:`default_home`."""
        return Path(self.work_dir or default_home()).expanduser()

    def phantom_grid(self) -> tuple[int, int, int]:
        """``phantom-shape`` as three voxel counts.

        Raises:
            InputError: not three whole numbers.
        """
        try:
            shape = tuple(int(v) for v in self.phantom_shape.split())
        except ValueError:
            shape = ()
        if len(shape) != 3:
            raise InputError(
                f"run config phantom-shape={self.phantom_shape!r}: give three voxel counts, e.g. '96 96 64'"
            )
        return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class NodeConfig:
    """A node's ``--node-config``. In a simulation Flower gives ``partition-id`` and ``num-partitions``; a deployed
    node is started with its own ``data-path`` (and optionally the rest)."""

    data_path: str = ""  # deployment: the site's own case folder
    modalities: str = ""  # deployment: the modalities the site has (e.g. "flair,t1,t2"); empty = those on disk
    site_name: str = ""  # deployment: the site's name in logs and reports; empty = the data folder's name
    cache_dir: str = ""
    state_dir: str = ""  # where the node keeps its teacher and optimisers between rounds
    partition_id: int | None = _key(NON_NEGATIVE)  # simulation: this node is the n-th site
    num_partitions: int | None = _key(POSITIVE)
    log_level: LogLevel | None = None  # empty: info when deployed, warning in a simulation
    worker: WorkerMode = WorkerMode.AUTO
    worker_idle: float = _key(POSITIVE, 1800.0)  # seconds a warm worker waits for a message before it ends
    # > 0: this site's update leaves it only masked, under SecAgg+ among at least this many nodes (2 at least)
    require_secagg: int = _key(NON_NEGATIVE, 0)
    secagg_key: str = ""  # this node's SuperNode private key: it signs its SecAgg+ keys and its replies (messages/)
    secagg_peers: str = ""  # with require-secagg: the consortium's node public keys; every round key must be signed
    # > 0: no message's training holds this node longer than this many seconds (work past it is dropped, unsent)
    max_work_seconds: float = _key(NON_NEGATIVE, 0.0)
    # where the node logs every reply it sends (client/disclosures.py); empty: <state-dir>/disclosures.jsonl when
    # deployed, none in a simulation; "off": none
    disclosure_log: str = ""

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> NodeConfig:
        """A node config from Flower's mapping. A deployment's ``--node-config`` values may all arrive as strings
        (``worker-idle="60"``): numbers are read from them.

        Raises:
            InputError: an unknown key, a wrong type or a value out of range (one line naming the key).
        """
        return _parse(cls, values, "node config", lenient=True)

    def to_flower(self) -> dict[str, bool | int | float | str]:
        return {k: v for k, v in _flat(self).items() if v is not None}

    @property
    def simulated(self) -> bool:
        """A simulated site (Flower gave it a partition), not one with its own data folder."""
        return self.partition_id is not None and not self.data_path

    @property
    def level(self) -> LogLevel:
        """Site logs: INFO in deployment, WARNING in a simulation (many sites share one terminal)."""
        deployed = bool(self.data_path) and self.partition_id is None
        return self.log_level or (LogLevel.INFO if deployed else LogLevel.WARNING)


# ----------------------------------------------------------------------------- parsing


def key_name(name: str) -> str:
    """The config key of field ``name``: ``num_server_rounds`` -> ``num-server-rounds``."""
    return name.replace("_", "-")


@cache
def _fields(cls: type) -> dict[str, tuple[str, Any, str | None]]:
    """Key -> (field name, type, rule) of a config class."""
    hints = get_type_hints(cls)
    return {key_name(f.name): (f.name, hints[f.name], f.metadata.get("rule")) for f in dataclasses.fields(cls)}


def _typed(what: str, key: str, value: Any, kind: Any, lenient: bool) -> Any:
    optional = getattr(kind, "__args__", None)
    if optional:  # X | None
        kind = next(k for k in optional if k is not type(None))
        if value is None or value == "":
            return None
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        text = str(value).lower() if isinstance(value, str) else None
        if text not in set(kind):
            raise InputError(f"{what} {key}={value!r}: choose one of {', '.join(kind)}")
        return kind(text)
    if lenient and kind is str and is_number(value):
        return str(value)  # site-name=3 on a command line arrives as a TOML number
    if lenient and isinstance(value, str) and kind in (int, float):
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            pass
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if is_whole(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if is_number(value):
            return float(value)
    elif isinstance(value, str):
        return value
    raise InputError(f"{what} {key}={value!r}: expected {'true or false' if kind is bool else kind.__name__}")


def _parse(cls: type, values: Mapping[str, Any], what: str, lenient: bool = False) -> Any:
    """``lenient`` (a node config): numbers read from text and text from numbers, and an unknown key is left out
    with a warning instead of refused, since one SuperNode's node config also serves other Flower apps; except an
    unknown ``require-...`` key, a site's term misspelt, which would otherwise leave the site without it."""
    fields = _fields(cls)
    checked = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            # a site's terms (require-...) misspelt would be no terms at all: refused, not ignored
            if lenient and not str(key).startswith("require-"):
                _unknown_node_key(str(key), hint)
                continue
            raise InputError(f"unknown {what} key {key!r}{hint}")
        name, kind, rule = fields[key]
        value = checked[name] = _typed(what, key, value, kind, lenient)
        if value is None:
            continue
        if rule == POSITIVE and not value > 0:
            raise InputError(f"{what} {key}={value!r}: must be greater than 0")
        if rule == NON_NEGATIVE and not value >= 0:  # NaN too
            raise InputError(f"{what} {key}={value!r}: must not be negative")
        if rule == UNIT and not 0 <= value <= 1:
            raise InputError(f"{what} {key}={value!r}: must lie between 0 and 1")
    return cls(**checked)


@cache
def _unknown_node_key(key: str, hint: str) -> None:
    """Say once per process that this app ignores ``key`` (another app's, or a misspelt one of ours)."""
    logging.getLogger("mstkd.client").warning("node config key %r is not one of this app's%s: ignored", key, hint)


def _flat(config: Any) -> dict[str, Any]:
    out = {}
    for key, (name, _, _) in _fields(type(config)).items():
        value = getattr(config, name)
        out[key] = str(value) if isinstance(value, StrEnum) else value
    return out


# ----------------------------------------------------------------------------- what the config implies


def default_home() -> Path:
    """Where phantoms, caches, node state and runs go unless a path is given: ``$MSTKD_HOME`` or ``~/.mstkd``."""
    return Path(os.environ.get("MSTKD_HOME", Path.home() / ".mstkd")).expanduser().resolve()


def project_config(run: RunConfig) -> DictConfig:
    """The project config (``mstkd/configs``) a run trains with.

    From ``model`` (preset), ``lr``, ``seed``, ``local-epochs``, ``num-server-rounds`` and ``overrides`` (a string
    of dot-list overrides, e.g. ``"loss.gsm=false train.amp=false"``). The lr schedule spans the whole federation:
    ``train.epochs = rounds x local-epochs``. ``eval-lesion`` sets ``eval.lesion=brats2023``.

    Raises:
        InputError: a malformed override, an interpolation, or a value the project config refuses.
    """
    from mstkd.config import load_config  # mstkd.config imports the data package, which imports this module

    try:
        extra = shlex.split(run.overrides)
    except ValueError as exc:  # an unclosed quote
        raise InputError(f"run config overrides: {exc}") from None
    overrides = [
        f"model={run.model}",
        f"train.epochs={max(run.num_server_rounds * run.local_epochs, 1.0)}",
        f"train.lr={run.lr}",
        f"train.seed={run.seed}",
        *(["eval.lesion=brats2023"] if run.eval_lesion else []),
        *extra,
    ]
    # what OmegaConf will read, quotes and escapes removed: ${oc.env:...} would read the environment of whoever
    # loads it (a node's secrets), however it was spelt in the run config
    if any("${" in item for item in overrides):
        raise InputError("run config overrides: ${...} interpolation is not allowed in a run config")
    return load_config(overrides)


STATE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A state key or site name is one plain folder name: no separators, no ``..``, nothing absolute."""


def check_state_key(key: str, what: str = "state key") -> str:
    """``key`` if it is one plain folder name (:data:`STATE_KEY`), so that joining it to a base folder stays there.
    The server makes one from ``run-name``; a node checks the one a message names before it joins it to its own
    state folder.

    Raises:
        RefusedMessage: a path separator, ``..``, a leading dot or dash, another character, or more than 128 of them.
    """
    if not STATE_KEY.fullmatch(key) or ".." in key:
        shown = key if len(key) <= 60 and key.isprintable() else f"{key[:60]!r}..."
        raise RefusedMessage(f"{what} {shown!r} is not a plain folder name (letters, digits, . _ -; no '..')")
    return key
