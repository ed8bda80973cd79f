"""Secure aggregation (SecAgg+) on the server: the server's only contact with Flower's legacy API.

With ``secagg=true`` the rounds run through Flower's legacy ``DefaultWorkflow`` with a
``SecAggPlusWorkflow`` fit stage: each node masks its update, and the server learns only the
weighted sum over the nodes that took part (the masks cancel in the sum), which plain FedAvg then
divides by the total weight. A node's individual weights never reach the server.

What differs from the normal loop (:mod:`server.loop`): every round needs all ``min-nodes``
nodes (at least 3; the protocol splits each node's key into shares that the others hold),
there is no per-node validation, no checkpoint and no resume, differential privacy cannot be
combined with it, ``strategy``, ``fraction-train``, ``min-replies`` and ``node-wait`` do not apply,
and no bytes are logged. The server cannot check a single node's update (it sees only their masked sum): the
reply checks of :mod:`server.replies` do not apply, nodes' metrics are kept only where they are finite
numbers, records are keyed by position (node ids are hidden), and a sum that is not finite stops the
run before it is saved or sent. Weights travel as float32: the protocol scales each node's weights by
``num-examples / secagg-max-weight`` and quantises them to 2**22 levels over [-8, 8], so the
error of the average is about ``nodes x 3.8e-6 x secagg-max-weight / total examples``; set
``secagg-max-weight`` to about the largest site's number of training cases. The scalar metrics
(losses, ``update-norm``, case counts) are not masked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.common import ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from mstkd.errors import InputError
from mstkd.numbers import is_finite
from mstkd.runconfig import RunConfig
from server.replies import METRIC_NAME, printable
from server.runlog import RunLog

RECONSTRUCTION = 2 / 3
"""Share of key shares needed to recover a dropped node's mask."""


def _plain_number(key: object, value: object) -> bool:
    return isinstance(key, str) and METRIC_NAME.fullmatch(key) is not None and is_finite(value)


def run_secagg(
    grid: Grid,
    context: Context,
    run: RunConfig,
    initial: dict[str, np.ndarray],
    train_config: dict,
    runlog: RunLog,
    evaluate_fn: Callable[[int, ArrayRecord], object],
) -> dict[str, np.ndarray]:
    """Run the run's rounds of FedAvg with SecAgg+ over ``min-nodes`` nodes (``secagg-max-weight`` sets the
    quantisation step); return the final global arrays (by name)."""
    rounds, min_nodes, timeout = run.num_server_rounds, run.min_nodes, run.round_timeout
    local_epochs, max_weight = run.local_epochs, run.secagg_max_weight
    if min_nodes < 3:
        raise InputError(f"secure aggregation needs min-nodes >= 3 (key shares among the others), got {min_nodes}")
    names = list(initial)
    current = {"round": 0, "arrays": dict(initial)}

    def fit_config(server_round: int) -> dict:
        current["round"] = server_round
        runlog.record(server_round)["secure_aggregation"] = "SecAgg+"
        return {**train_config, "server-round": server_round, "epoch": (server_round - 1) * local_epochs}

    def fit_metrics(results: list[tuple[int, dict]]) -> dict:
        # the protocol hides which node sent what: records are keyed by position, names are only labels, and only
        # finite numbers under plain names are kept (the legacy API also lets a node send text and bytes)
        for index, (num_examples, metrics) in enumerate(results):
            site = runlog.site(current["round"], index, printable(metrics.get("site", "?"), 64))
            site.update({k: v for k, v in metrics.items() if k != "site" and _plain_number(k, v)})
            site["train-examples"] = int(num_examples)
        return {}

    def evaluate(server_round: int, ndarrays: list[np.ndarray], config: dict) -> None:
        arrays = {n: np.asarray(a, dtype=np.float32) for n, a in zip(names, ndarrays, strict=True)}
        if not all(np.isfinite(a).all() for a in arrays.values()):  # no single update can be checked here
            raise RuntimeError(
                f"round {server_round}: the securely aggregated model is not finite (some node's update was not); "
                "the run stops before it is saved or sent"
            )
        current["arrays"] = arrays
        evaluate_fn(server_round, ArrayRecord({k: Array(v) for k, v in arrays.items()}))
        return None

    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=min_nodes,
        min_evaluate_clients=0,
        min_available_clients=min_nodes,
        initial_parameters=ndarrays_to_parameters([np.asarray(initial[n], dtype=np.float32) for n in names]),
        on_fit_config_fn=fit_config,
        evaluate_fn=evaluate,
        fit_metrics_aggregation_fn=fit_metrics,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds, round_timeout=timeout), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled node holds a share of every other node's key
            reconstruction_threshold=RECONSTRUCTION,
            max_weight=max_weight,
            timeout=timeout,
        )
    )
    workflow(grid, legacy)
    return current["arrays"]
