"""Secure aggregation (SecAgg+) on the server: the server's only contact with Flower's legacy API.

With ``secagg=true`` the rounds run through Flower's legacy ``DefaultWorkflow`` with a
``SecAggPlusWorkflow`` fit stage: each node masks its update, and the server learns only the
weighted sum over the nodes that took part (the masks cancel in the sum), which plain FedAvg then
divides by the total weight. A node's individual weights never reach the server.

What differs from the normal loop (:mod:`server.loop`): every round starts with ``min-nodes`` nodes (at least 3;
the protocol splits each node's key into shares that the others hold) and aggregates while two thirds of them are
left (nodes lost on the way are forgotten or recovered, :class:`RoundSafeSecAgg`),
there is no per-node validation, no checkpoint and no resume, differential privacy cannot be
combined with it, ``strategy``, ``fraction-train``, ``min-replies`` and ``node-wait`` do not apply,
and no bytes are logged. The server cannot check a single node's update (it sees only their masked sum): the
reply checks of :mod:`server.replies` do not apply, nodes' metrics are kept only where they are finite
numbers, records are keyed by position (node ids are hidden), and a sum that is not finite stops the
run before it is saved or sent. Weights travel as float32: the protocol scales each node's weights by
``num-examples / secagg-max-weight`` and quantises them to 2**22 levels over [-8, 8], so the
error of the average is about ``nodes x 3.8e-6 x secagg-max-weight / total examples``; set
``secagg-max-weight`` to about the largest site's number of training cases. The sum of the nodes' weight factors, which
the sum of updates is divided by, is masked too: once unmasked it must be what the case counts the nodes sent in
the clear give, or the round is skipped. The scalar metrics (losses, ``update-norm``, case counts) are not masked.

Nor can a node's masked update be checked alone, but the unmasked average can (:mod:`server.secagg_average`): it is
a weighted mean of the nodes' updates, so no longer than the same mean of their lengths, which each node sends in the
clear (``update-norm``), plus what quantisation adds. A node that masked another update than the one it describes
makes the average longer than the claims allow (one that added 4.0 to each of its scaled weights moved the tiny test
model by 2400, where the honest nodes' updates were about 1 long, and the run went on): the round is skipped with the
model kept. A node can also claim a long update to cover one. Without ``update-bound`` its claim is taken as sent, as
plain FedAvg takes any update; with ``update-bound`` k each claim counts for at most k times the lower median of the
claims, and an average longer than that allows is scaled down to it, so a round moves the model by at most about k
typical updates (in a direction a hostile node may choose). An honest site whose update is longer than k medians
costs its round that scaling, as it would cost its own update in the clear.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_secagg

from messages import signed_keys
from messages.masks import use_full_seeds
from mstkd.errors import InputError
from mstkd.runconfig import RunConfig
from server.replies import SiteCases, metric_problem, printable
from server.runlog import RunLog
from server.secagg_average import CLIP, LEVELS, CheckedFedAvg, weight_factor
from server.secagg_grid import CheckedGrid

RECONSTRUCTION = 2 / 3
"""Share of key shares needed to recover a dropped node's mask."""

_EXPECTED_WEIGHT: ContextVar[int | None] = ContextVar("secagg_expected_weight", default=None)
"""The sum of weight factors the round being unmasked (in this thread) must have; None outside an unmasking."""
_flower_factor_extract = flower_secagg.factor_extract


def _checked_factor_extract(parameters):
    """Flower's ``factor_extract``, where its workflow reads the unmasked sum of the weight factors, checked against
    :data:`_EXPECTED_WEIGHT` (installed once, for every workflow of this process; a no-op outside our unmasking)."""
    total, rest = _flower_factor_extract(parameters)
    expected = _EXPECTED_WEIGHT.get()
    if expected is not None and total != expected:
        raise ValueError(
            f"the nodes' weights sum to {total}, not the {expected} their case counts give: a node "
            "lied, or masked with another version's generator"
        )
    return total, rest


flower_secagg.factor_extract = _checked_factor_extract
FULL_SEEDS = use_full_seeds(flower_secagg)  # the nodes' masks, drawn from the whole of each seed (client.secagg)


def check_masks() -> None:
    """Refuse secure aggregation where the masks could not be put in place (:mod:`messages.masks`).

    Raises:
        InputError: this Flower draws SecAgg+ masks in a way this version does not know.
    """
    if not FULL_SEEDS:
        raise InputError("secure aggregation: this Flower draws SecAgg+ masks in a way this version does not know")


class RoundSafeSecAgg(SecAggPlusWorkflow):
    """Flower's SecAgg+ fit stage, with two repairs so that a node's failure costs that node, or at worst its round,
    never the run:

    - Contents no check can reach (shares that do not combine, a key that is not one) raised a ``ValueError`` out of
      the workflow and ended the run. The round is now skipped with its reason, and the global model kept, as when
      too few nodes are left; any other error (a bug) still ends the run.
    - A node lost in the first two stages (no keys, or no shares of its own keys) lost the round for every node:
      Flower's workflow still counted it among the round's nodes, so the last stage asked for its shares, which no
      node holds, and its neighbours for shares of a key they never received. As in the protocol's paper, the round's
      nodes are now those that shared their keys: a node lost before then is forgotten (no node masked its update
      with it, and it sent no update), and one lost after is recovered from the others' shares, as before.

    It also adds the consistency round Flower's protocol lacks, between masking and unmasking
    (:meth:`_survivors_stage`, :data:`messages.signed_keys.SURVIVORS`).
    """

    def __init__(self, *args, on_failure: Callable[[Exception], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_failure = on_failure

    def __call__(self, grid, context) -> None:
        try:
            super().__call__(grid, context)
        except (ValueError, UnsupportedAlgorithm) as exc:  # the protocol's own, on contents no check can reach
            self.on_failure(exc)

    # Flower's own threshold check at the end of these two stages counts the lost nodes' neighbourhoods too (with a
    # partial neighbour graph it may refuse a round that the nodes left can finish): its answer is replaced by the
    # check after the lost nodes are forgotten. A setup stage that stopped before it drew the neighbour graph (no
    # node sampled, or one) stays stopped.
    def setup_stage(self, grid, context, state) -> bool:
        super().setup_stage(grid, context, state)
        return self._went_on(bool(state.nid_to_neighbours) and self._forget_lost(state), grid, "set-up")

    def share_keys_stage(self, grid, context, state) -> bool:
        super().share_keys_stage(grid, context, state)
        return self._went_on(self._forget_lost(state), grid, "key exchange")

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        grid.counts = {}
        if not self._went_on(super().collect_masked_vectors_stage(grid, context, state), grid, "masked updates"):
            return False
        return self._went_on(self._survivors_stage(grid, context, state), grid, "list of survivors")

    def _survivors_stage(self, grid, context, state) -> bool:
        """The consistency round Flower's workflow lacks (:data:`messages.signed_keys.SURVIVORS`): each node that sent
        a masked update is sent the list of those nodes, which nodes with keys sign; the round goes on while the
        threshold of them answer. Those that do not are still asked to unmask: their updates are in the sum."""
        survivors = sorted(state.active_node_ids)
        group = str(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        asked = {Key.STAGE: signed_keys.SURVIVORS, Key.ACTIVE_NODE_ID_LIST: survivors}
        messages = [
            Message(
                content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(asked)}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=group,
            )
            for node in survivors
        ]
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        return sum(not reply.has_error() for reply in replies) >= state.threshold

    def _went_on(self, went_on: bool, grid, stage: str) -> bool:
        """A stage that leaves too few nodes halts Flower's workflow, which says nothing more: the round is recorded
        as skipped, with the nodes' reasons."""
        if not went_on:  # the nodes' most common reasons, with how many gave each
            why = "; ".join(f"{n} x {reason}" for reason, n in Counter(grid.errors).most_common(2)) or "nodes silent"
            self.on_failure(RuntimeError(f"too few nodes left after its {stage}: {why}"))
        return went_on

    def unmask_stage(self, grid, context, state) -> bool:
        """Flower's unmasking, which divides the sum by the sum of the nodes' weight factors (each node's first masked
        value, which it chooses): that sum must be what the case counts the nodes sent in the clear give, or a node
        could scale the round's model (a sum of 1 multiplied it by a million) or make it infinite."""
        counts = [c for n, c in grid.counts.items() if n in state.active_node_ids]
        expected = sum(weight_factor(c, self.max_weight, self.quantization_range) for c in counts)
        if expected >= self.modulus_range:  # the sum wraps round: Flower's division would be wrong for honest nodes
            raise ValueError(f"the nodes' {sum(counts)} cases are too many for secagg-max-weight {self.max_weight:g}")
        token = _EXPECTED_WEIGHT.set(expected)
        try:
            return self._went_on(super().unmask_stage(grid, context, state), grid, "unmasking")
        finally:
            _EXPECTED_WEIGHT.reset(token)

    def _forget_lost(self, state) -> bool:
        """Make the nodes still active the round's nodes, and their neighbours among them (a node that never sent its
        key shares holds no part of the sum and no share another node needs); then check the protocol's threshold
        (Flower's check passes a round with no node left, whose unmasking then failed with an ``IndexError``)."""
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        state.nid_to_neighbours = {n: ns & kept for n, ns in state.nid_to_neighbours.items() if n in kept}
        return bool(kept) and self._check_threshold(state)


def run_secagg(
    grid: Grid,
    context: Context,
    run: RunConfig,
    initial: dict[str, np.ndarray],
    train_config: dict,
    runlog: RunLog,
    evaluate_fn: Callable[[int, ArrayRecord], object],
    peers: frozenset[bytes] = frozenset(),
    listing: SiteCases | None = None,
) -> dict[str, np.ndarray]:
    """Run the run's rounds of FedAvg with SecAgg+ over ``min-nodes`` nodes (``secagg-max-weight`` sets the
    quantisation step; with ``peers``, the run's ``secagg-peers``, a reply whose signature the checking sites would
    refuse is that node's error, and with ``listing``, the run's ``site-cases``, so is a case count above its key's:
    :class:`server.secagg_grid.CheckedGrid`); return the final global arrays (by name)."""
    rounds, min_nodes, timeout = run.num_server_rounds, run.min_nodes, run.round_timeout
    local_epochs, max_weight = run.local_epochs, run.secagg_max_weight
    names = list(initial)
    current = {"round": 0, "arrays": dict(initial)}

    def fit_config(server_round: int) -> dict:
        current["round"] = server_round
        runlog.record(server_round)["secure_aggregation"] = "SecAgg+"
        return {**train_config, "server-round": server_round, "epoch": (server_round - 1) * local_epochs}

    def fit_metrics(results: list[tuple[int, dict]]) -> dict:
        # the protocol hides which node sent what: records are keyed by position and names are only labels; a metric
        # that fails server.replies' checks is dropped (no single reply can be refused), and only then counts
        # against its position's bound on names (the legacy API also lets a node send text and bytes)
        for index, (num_examples, metrics) in enumerate(results):
            site = runlog.site(current["round"], index, printable(metrics.get("site", "?"), 64))
            good = {k: v for k, v in metrics.items() if metric_problem("train", k, v) is None}
            kept = runlog.names_of(index, good)
            site.update({k: v for k, v in good.items() if k in kept})
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

    strategy = CheckedFedAvg(
        runlog=runlog,
        names=names,
        max_weight=max_weight,
        update_bound=run.update_bound,
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

    def failed(exc: Exception) -> None:
        reason = f"secure aggregation failed ({type(exc).__name__}: {printable(str(exc), 300)})"
        runlog.record(current["round"])["skipped"] = reason

    workflow = DefaultWorkflow(
        fit_workflow=RoundSafeSecAgg(
            num_shares=1.0,  # every sampled node holds a share of every other node's key
            reconstruction_threshold=RECONSTRUCTION,
            clipping_range=CLIP,
            quantization_range=LEVELS,
            max_weight=max_weight,
            timeout=timeout,
            on_failure=failed,
        )
    )
    shapes = [np.shape(initial[n]) for n in names]
    workflow(CheckedGrid(grid, shapes, run.max_examples, peers, listing), legacy)  # type: ignore[arg-type]
    return current["arrays"]
