"""Aggregation of the student + discriminator with a Flower strategy of choice, plus run bookkeeping.

:func:`make_strategy` returns an instance of the chosen Flower strategy (FedAvg, FedProx,
FedAvgM, FedAdam, FedYogi) extended by :class:`FederatedMixin`, which

- sends the global arrays in the transport dtype (float16 by default) and aggregates the
  replies in float32, so the server's model never accumulates in half precision;
- tells each node the global epoch at which its local training starts (for the lr schedule);
- records, per round, bytes each way and per-site training and validation metrics into a
  :class:`~server.runlog.RunLog` (failed and silent nodes are recorded by :mod:`server.loop`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from mstkd.errors import InputError
from mstkd.federated import TRANSPORT_DTYPES
from server.runlog import RunLog

log = logging.getLogger("mstkd.server")

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}


def cast_arrays(arrays: ArrayRecord, dtype: type) -> ArrayRecord:
    """A copy of ``arrays`` with every array in ``dtype``."""
    return ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=dtype)) for k, v in arrays.items()})


def _site(reply: Message) -> str:
    if "site" in reply.content.config_records:
        return str(reply.content["site"]["name"])
    return f"node-{reply.metadata.src_node_id}"


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

    def _incoming(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():  # recorded by the round loop (server.loop.split_replies)
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            site = self.runlog.site(server_round, _site(reply))
            # train and evaluate replies both count their cases as num-examples: keep both
            site.update({(f"{stage}-examples" if k == "num-examples" else k): v for k, v in metrics.items()})
            if "site" in reply.content.config_records:
                info = reply.content["site"]
                site.update(
                    {k: str(info[k]) for k in ("device", "ray-node", "modalities", "val-collapse") if k in info}
                )
        return replies

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = self._incoming(server_round, replies, "train")
        for reply in replies:
            if not reply.has_error():
                reply.content["arrays"] = cast_arrays(reply.content["arrays"], np.float32)
                if self.uniform_weights:
                    reply.content["metrics"]["num-examples"] = 1
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.runlog.record(server_round)["train"] = {k: v for k, v in metrics.items()}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._incoming(server_round, replies, "evaluate")
        valid = [r for r in replies if not r.has_error()]
        if valid and sum(float(r.content["metrics"]["num-examples"]) for r in valid) == 0:
            return None  # no site has validation cases: nothing to average
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.runlog.record(server_round)["val"] = {k: v for k, v in metrics.items()}
        return metrics


def make_strategy(name: str, *, runlog: RunLog, transport: str, local_epochs: float, **kwargs):
    """An instance of strategy ``name`` (fedavg, fedprox, fedavgm, fedadam, fedyogi) with the mixin."""
    key = name.lower()
    if key not in STRATEGIES:
        raise InputError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = type(f"MSTKD{STRATEGIES[key].__name__}", (FederatedMixin, STRATEGIES[key]), {})
    return cls(runlog=runlog, transport=transport, local_epochs=local_epochs, **kwargs)
