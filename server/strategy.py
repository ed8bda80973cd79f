"""Aggregation of the student + discriminator with a Flower strategy of choice, plus run bookkeeping.

:func:`make_strategy` returns an instance of the chosen Flower strategy extended by
:class:`FederatedMixin`, which

- sends the global arrays in the transport dtype (float16 by default); the round loop hands it
  the replies checked and in float32 (:mod:`server.replies`), so the server's model never
  accumulates in half precision;
- tells each node the global epoch at which its local training starts (for the lr schedule);
- records, per round, bytes sent and the aggregated training and validation metrics into a
  :class:`~server.runlog.RunLog` (each node's own numbers are recorded by :mod:`server.loop`).

The strategies: FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, and the robust aggregators FedMedian
(coordinate-wise median), FedTrimmedAvg (coordinate-wise mean without the ``trim-beta`` share at
either end), Krum and MultiKrum (the ``krum-select`` replies nearest to the others) and Bulyan
(Krum selection, then a trimmed median), all of Flower; the robust ones assume at most
``malicious-nodes`` hostile nodes among those that reply, and Bulyan needs 4 of them + 3 replies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from mstkd.errors import InputError
from mstkd.federated import TRANSPORT_DTYPES
from server.runlog import RunLog

log = logging.getLogger("mstkd.server")

STRATEGIES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def strategy_options(name: str, run: dict, nodes: int) -> dict:
    """The keyword arguments of strategy ``name`` from the run config (``nodes``: how many reply per round).

    Raises:
        InputError: settings the strategy cannot work with (Bulyan with too few nodes, MultiKrum selecting
            more replies than there are).
    """
    hostile = int(run.get("malicious-nodes", 1))
    if name == "fedprox":
        return {"proximal_mu": float(run.get("proximal-mu", 0.01))}
    if name == "fedavgm":
        return {
            "server_learning_rate": float(run.get("server-lr", 1.0)),
            "server_momentum": float(run.get("server-momentum", 0.9)),
        }
    if name in ("fedadam", "fedyogi"):
        return {"eta": float(run.get("server-lr", 1e-2))}
    if name == "fedtrimmedavg":
        beta = float(run.get("trim-beta", 0.2))
        if not 0 <= beta < 0.5:
            raise InputError(f"trim-beta={beta:g}: the share trimmed at either end must lie in [0, 0.5)")
        if int(beta * nodes) == 0:  # what SciPy's trim_mean cuts from each end
            raise InputError(
                f"fedtrimmedavg with trim-beta={beta:g} trims no reply with min-nodes={nodes} "
                f"(int({beta:g} x {nodes}) = 0): give trim-beta of at least {1 / nodes:.3g}"
            )
        return {"beta": beta}
    if name == "krum":
        return {"num_malicious_nodes": hostile}
    if name == "multikrum":
        select = int(run.get("krum-select", 0)) or max(nodes - hostile, 1)
        if select > nodes:
            raise InputError(f"krum-select={select}: more replies than the {nodes} nodes of a round (min-nodes)")
        return {"num_malicious_nodes": hostile, "num_nodes_to_select": select}
    if name == "bulyan":
        if nodes < 4 * hostile + 3:
            raise InputError(
                f"bulyan with malicious-nodes={hostile} needs at least {4 * hostile + 3} nodes per round "
                f"(4 x malicious-nodes + 3), but min-nodes is {nodes}"
            )
        return {"num_malicious_nodes": hostile}
    return {}


def cast_arrays(arrays: ArrayRecord, dtype: type) -> ArrayRecord:
    """A copy of ``arrays`` with every array in ``dtype``."""
    return ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=dtype)) for k, v in arrays.items()})


class FederatedMixin:
    """Transport casting, global-epoch hand-out and per-round records over a Flower strategy."""

    def __init__(self, *args, transport: str = "float16", local_epochs: float = 1.0, runlog: RunLog, **kwargs):
        super().__init__(*args, **kwargs)
        self.transport = TRANSPORT_DTYPES[transport]
        self.local_epochs = local_epochs
        self.runlog = runlog
        self.uniform_weights = False  # True: every site counts the same (differential privacy)

    def _outgoing(self, server_round: int, arrays: ArrayRecord, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.runlog.record(server_round)["bytes_sent"] += arrays.count_bytes() * len(messages)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["epoch"] = (server_round - 1) * self.local_epochs
        wire = cast_arrays(arrays, self.transport)
        return self._outgoing(server_round, wire, super().configure_train(server_round, wire, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        wire = cast_arrays(arrays, self.transport)
        return self._outgoing(server_round, wire, super().configure_evaluate(server_round, wire, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)  # checked by the round loop: float32 arrays (server.replies)
        if self.uniform_weights:
            for reply in replies:
                reply.content["metrics"]["num-examples"] = 1
        # fewer replies than planned may leave FedTrimmedAvg nothing to trim
        if isinstance(self, FedTrimmedAvg) and replies and int(self.beta * len(replies)) == 0:
            log.warning(
                "round %d: trim-beta %g trims no reply of %d: this round is a plain mean",
                server_round,
                self.beta,
                len(replies),
            )
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.runlog.record(server_round)["train"] = {k: v for k, v in metrics.items()}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if replies and sum(float(r.content["metrics"]["num-examples"]) for r in replies) == 0:
            return None  # no site has validation cases: nothing to average
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.runlog.record(server_round)["val"] = {k: v for k, v in metrics.items()}
        return metrics


def make_strategy(name: str, *, runlog: RunLog, transport: str, local_epochs: float, **kwargs):
    """An instance of strategy ``name`` (a key of :data:`STRATEGIES`) with the mixin."""
    key = name.lower()
    if key not in STRATEGIES:
        raise InputError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = type(f"MSTKD{STRATEGIES[key].__name__}", (FederatedMixin, STRATEGIES[key]), {})
    return cls(runlog=runlog, transport=transport, local_epochs=local_epochs, **kwargs)
