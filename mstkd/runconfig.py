"""The typed schema of the Flower run config (``[tool.flwr.app.config]`` in ``pyproject.toml``).

Flower passes ``--run-config`` values through as TOML gives them, so ``num-server-rounds="x"``
or ``dp="of"`` would otherwise surface deep inside a round. :func:`check_run_config` refuses an
unknown key, a value of the wrong type and a value out of range with one line naming the key;
the server and every node call it (through :func:`mstkd.federated.config_from_run`) before any work.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from mstkd.errors import InputError

POSITIVE, NON_NEGATIVE, UNIT = "positive", "non-negative", "unit"

SCHEMA: dict[str, tuple[type, Any]] = {
    "num-server-rounds": (int, POSITIVE),
    "local-epochs": (float, POSITIVE),
    "local-steps": (int, NON_NEGATIVE),
    "model": (str, None),  # the preset: checked by load_config, which knows the preset files
    "lr": (float, POSITIVE),
    "seed": (int, None),
    "overrides": (str, None),
    "strategy": (
        str,
        (
            "fedavg",
            "fedprox",
            "fedavgm",
            "fedadam",
            "fedyogi",
            "fedmedian",
            "fedtrimmedavg",
            "krum",
            "multikrum",
            "bulyan",
        ),
    ),
    "proximal-mu": (float, NON_NEGATIVE),
    "server-lr": (float, POSITIVE),
    "server-momentum": (float, UNIT),
    "malicious-nodes": (int, NON_NEGATIVE),
    "trim-beta": (float, UNIT),
    "krum-select": (int, NON_NEGATIVE),
    "max-examples": (int, POSITIVE),
    "min-nodes": (int, POSITIVE),
    "fraction-train": (float, UNIT),
    "fraction-evaluate": (float, UNIT),
    "round-timeout": (float, POSITIVE),
    "min-replies": (int, POSITIVE),
    "node-wait": (float, NON_NEGATIVE),
    "resume-from": (str, None),
    "dp": (str, ("off", "server", "client")),
    "dp-clipping": (str, ("fixed", "adaptive")),
    "dp-clip": (float, POSITIVE),
    "dp-clip-quantile": (float, UNIT),
    "dp-clip-lr": (float, POSITIVE),
    "dp-count-noise": (float, NON_NEGATIVE),
    "dp-noise": (float, NON_NEGATIVE),
    "dp-delta": (float, UNIT),
    "dp-max-epsilon": (float, NON_NEGATIVE),
    "secagg": (bool, None),
    "secagg-max-weight": (float, POSITIVE),
    "transport": (str, ("float16", "float32")),
    "eval-every": (int, POSITIVE),
    "eval-initial": (bool, None),
    "eval-subsets": (str, None),
    "eval-cases": (int, NON_NEGATIVE),
    "site-eval-subsets": (str, None),
    "data-path": (str, None),
    "partitioning": (str, None),
    "test-data-path": (str, None),
    "drop-modalities": (str, None),
    "phantom-cases": (int, POSITIVE),
    "phantom-shape": (str, None),
    "phantom-seed": (int, None),
    "work-dir": (str, None),
    "out-dir": (str, None),
    "overwrite": (bool, None),
    "run-name": (str, None),
    "tensorboard": (bool, None),
}
"""Key -> (type, rule): a rule is POSITIVE, NON_NEGATIVE, UNIT ([0, 1]), a tuple of choices, or None."""


def _typed(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise InputError(f"run config {key}={value!r}: expected {'true or false' if kind is bool else kind.__name__}")


def check_run_config(run: Mapping[str, Any]) -> dict[str, Any]:
    """``run`` with each value in its schema type; one line on the first unknown key or bad value.

    Raises:
        InputError: an unknown key, a wrong type or a value out of range.
    """
    checked = {}
    for key, value in run.items():
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(f"unknown run config key {key!r}{hint}")
        kind, rule = SCHEMA[key]
        value = checked[key] = _typed(key, value, kind)
        if isinstance(rule, tuple) and value not in rule:
            raise InputError(f"run config {key}={value!r}: choose one of {', '.join(rule)}")
        if rule == POSITIVE and not value > 0:
            raise InputError(f"run config {key}={value!r}: must be greater than 0")
        if rule == NON_NEGATIVE and value < 0:
            raise InputError(f"run config {key}={value!r}: must not be negative")
        if rule == UNIT and not 0 <= value <= 1:
            raise InputError(f"run config {key}={value!r}: must lie between 0 and 1")
    return checked
