"""Aggregation of the student + discriminator with a Flower strategy of choice, plus run bookkeeping.

:func:`make_strategy` returns an instance of the chosen Flower strategy extended by
:class:`FederatedMixin`, which

- sends the global arrays in the transport dtype (float16 by default); the round loop hands it
  the replies checked and in float32 (:mod:`server.replies`), so the server aggregates in float32
  (FedAdam and FedYogi step from the model as sent, so with float16 on the wire a server step
  finer than float16's resolution is lost at the next round's rounding; ``transport='float32'``
  keeps it);
- tells each node the global epoch at which its local training starts (for the lr schedule);
- records, per round, bytes sent and the aggregated training and validation metrics into a
  :class:`~server.runlog.RunLog` (each node's own numbers are recorded by :mod:`server.loop`).

The strategies: FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, and the robust aggregators FedMedian
(coordinate-wise median), FedTrimmedAvg (coordinate-wise mean without the ``trim-beta`` share at
either end), Krum and MultiKrum (the ``krum-select`` replies nearest to the others) and Bulyan
(Krum selection, then a trimmed median), all of Flower; the robust ones assume at most
``malicious-nodes`` hostile nodes among those that reply, and Bulyan needs 4 of them + 3 replies.
With a robust one every site has one vote whatever case count it claims: the sites' metrics are
medians (:func:`median_metrics`; Krum, MultiKrum and Bulyan give it only the replies they select
for training, every reply for validation), so a hostile node's claimed count and scores cannot
choose ``best.pt``, and MultiKrum averages the replies it selects unweighted, as Blanchard et al.
(2017) define it (Flower's weighs them by their claimed counts, so one selected node that claims
``max-examples`` cases would be nearly the whole average).

With ``update-bound`` k > 0, any strategy first scales down each reply whose update (its weights less the global
ones as sent, in the transport dtype) is longer than k times the round's median update (the lower median of those
that moved), as norm bounding does (Sun et al., 2019, "Can you really backdoor federated learning?"): whatever a site
scales its update by, it arrives at most k times as long as a typical site's. Its direction is kept, so a
sign-flipped or noisy update of a typical length passes; the median needs three or more replies, most of them
honest; and FedAvg still weighs each reply by the case count its site claims (up to ``max-examples``), so a site
claiming far more cases than it has still outweighs the others (a robust aggregator gives every site one vote).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
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

from messages.clipping import scaled_update, update_norm
from mstkd.errors import InputError
from mstkd.model.federated import TRANSPORT_DTYPES
from mstkd.runconfig import DPMode, RunConfig, Strategy, Transport
from server.runlog import RunLog

log = logging.getLogger("mstkd.server")

STRATEGIES = {
    Strategy.FEDAVG: FedAvg,
    Strategy.FEDPROX: FedProx,
    Strategy.FEDAVGM: FedAvgM,
    Strategy.FEDADAM: FedAdam,
    Strategy.FEDYOGI: FedYogi,
    Strategy.FEDMEDIAN: FedMedian,
    Strategy.FEDTRIMMEDAVG: FedTrimmedAvg,
    Strategy.KRUM: Krum,
    Strategy.MULTIKRUM: MultiKrum,
    Strategy.BULYAN: Bulyan,
}


def median_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Each metric's median over the replies, one vote per site whatever case count it claims: the robust
    aggregators' counterpart of Flower's weighted mean (``weighted_by_key`` names the count, which is left out as
    there). A weighted mean lets one node that claims ``max-examples`` validation cases and a Dice of 1 decide which
    round becomes ``best.pt``; a median of three or more sites stays within the honest sites' scores. A reply that
    counts no case (a site without validation cases) has no score to give. The replies are checked
    (:mod:`server.replies`): plain finite numbers, the same names in each."""
    records = [next(iter(c.metric_records.values())) for c in contents]
    voting = [r for r in records if r[weighted_by_key] > 0]
    return MetricRecord(
        {key: float(np.median([r[key] for r in voting])) for key in voting[0] if key != weighted_by_key}
        if voting
        else {}
    )


def strategy_options(run: RunConfig, nodes: int) -> dict:
    """The keyword arguments of the run's strategy from its run config (``nodes``: how many reply per round).

    Raises:
        InputError: settings the strategy cannot work with (Bulyan with too few nodes, MultiKrum selecting
            more replies than there are).
    """
    check_update_bound(run)
    name, hostile = run.strategy, run.malicious_nodes
    if name == Strategy.FEDPROX:
        return {"proximal_mu": run.proximal_mu}
    if name == Strategy.FEDAVGM:
        return {"server_learning_rate": run.server_lr, "server_momentum": run.server_momentum}
    if name in (Strategy.FEDADAM, Strategy.FEDYOGI):
        return {"eta": run.server_lr}
    if name == Strategy.FEDTRIMMEDAVG:
        beta = run.trim_beta
        if not 0 <= beta < 0.5:
            raise InputError(f"trim-beta={beta:g}: the share trimmed at either end must lie in [0, 0.5)")
        if int(beta * nodes) == 0:  # what SciPy's trim_mean cuts from each end
            raise InputError(
                f"fedtrimmedavg with trim-beta={beta:g} trims no reply with min-nodes={nodes} "
                f"(int({beta:g} x {nodes}) = 0): give trim-beta of at least {1 / nodes:.3g}"
            )
        return {"beta": beta}
    if name == Strategy.KRUM:
        return {"num_malicious_nodes": hostile}
    if name == Strategy.MULTIKRUM:
        select = run.krum_select or max(nodes - hostile, 1)
        if select > nodes:
            raise InputError(f"krum-select={select}: more replies than the {nodes} nodes of a round (min-nodes)")
        return {"num_malicious_nodes": hostile, "num_nodes_to_select": select}
    if name == Strategy.BULYAN:
        if nodes < 4 * hostile + 3:
            raise InputError(
                f"bulyan with malicious-nodes={hostile} needs at least {4 * hostile + 3} nodes per round "
                f"(4 x malicious-nodes + 3), but min-nodes is {nodes}"
            )
        return {"num_malicious_nodes": hostile}
    return {}


def check_update_bound(run: RunConfig) -> None:
    """Refuse an ``update-bound`` that cannot work: one below 1 (it would shrink a typical update too), or one with
    differential privacy (whose clipping bounds each update at a norm of its own; a bound that follows the other
    sites' updates would change what the noise covers). Under secure aggregation it bounds the lengths the nodes claim
    (:func:`server.secagg_average.allowed_update`), since the server never sees a single update.

    Raises:
        InputError: one line naming the setting.
    """
    bound = run.update_bound
    if not bound:
        return
    if not 1 <= bound < float("inf"):
        raise InputError(f"update-bound={bound:g}: give 0 (off) or a number from 1 (times the round's median update)")
    if run.dp != DPMode.OFF:
        raise InputError(
            f"update-bound with dp={str(run.dp)!r}: differential privacy clips each update at dp-clip already; "
            "use one or the other"
        )


def strategy_caveat(run: RunConfig, nodes: int) -> str | None:
    """A warning for settings the strategy runs with but without its guarantee, or None: Krum and MultiKrum
    (Blanchard et al., 2017) tolerate ``malicious-nodes`` f only among at least 2f + 3 replies; with fewer, a
    hostile update can be nearer the honest ones than they are to each other, and be selected in their place.
    ``update-bound`` needs three replies or more for its median to stand for the honest sites."""
    hostile, caveats = run.malicious_nodes, []
    if run.strategy in (Strategy.KRUM, Strategy.MULTIKRUM) and hostile and nodes < 2 * hostile + 3:
        caveats.append(
            f"{run.strategy} with malicious-nodes={hostile} needs at least {2 * hostile + 3} nodes per round "
            f"(2 x malicious-nodes + 3) to keep a hostile update out, but min-nodes is {nodes}: it may select one"
        )
    if run.update_bound and nodes < 3:
        caveats.append(
            f"update-bound with min-nodes={nodes}: a round of fewer than three replies has no median a hostile "
            "site cannot set (of two, the shorter update bounds the other; one is never bounded)"
        )
    return "; ".join(caveats) or None


def cast_arrays(arrays: ArrayRecord, dtype: type) -> ArrayRecord:
    """A copy of ``arrays`` with every array in ``dtype``."""
    return ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=dtype)) for k, v in arrays.items()})


class FederatedMixin:
    """Transport casting, global-epoch hand-out, update bounding and per-round records over a Flower strategy."""

    def __init__(
        self, *args, transport: Transport = Transport.FLOAT16, local_epochs: float = 1.0, runlog: RunLog, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.transport = TRANSPORT_DTYPES[transport]
        self.local_epochs = local_epochs
        self.runlog = runlog
        self.uniform_weights = False  # True: every site counts the same (robust aggregators, differential privacy)
        self.update_bound = 0.0  # > 0: no update longer than this many times the round's median one
        self.bound_base: dict[str, np.ndarray] = {}  # the round's global weights, which updates are measured from
        self.most_train_nodes: int | None = None  # at most this many nodes train in a round (differential privacy)

    def _outgoing(self, server_round: int, arrays: ArrayRecord, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.runlog.record(server_round)["bytes_sent"] += arrays.count_bytes() * len(messages)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["epoch"] = (server_round - 1) * self.local_epochs
        sent = cast_arrays(arrays, self.transport)
        if self.update_bound:  # the model the nodes train from: an unchanged reply then has an update of 0
            self.bound_base = {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in sent.items()}
        messages = list(super().configure_train(server_round, sent, config, grid))  # the nodes drawn, in random order
        return self._outgoing(server_round, sent, messages[: self.most_train_nodes])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        sent = cast_arrays(arrays, self.transport)
        return self._outgoing(server_round, sent, super().configure_evaluate(server_round, sent, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)  # checked by the round loop: float32 arrays (server.replies)
        if self.update_bound and replies:
            self._bound_updates(server_round, replies)
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

    def _bound_updates(self, server_round: int, replies: list[Message]) -> None:
        """Scale each reply's update longer than ``update_bound`` times the round's median update down to that
        length, in place, and record which (``bounded`` in the round's record: node, norm, limit)."""
        returned = [_arrays(reply) for reply in replies]
        norms = [update_norm(self.bound_base, arrays) for arrays in returned]
        limit, moved = median_limit(norms, self.update_bound)
        if limit is None:
            return
        warn_few_moved(server_round, moved, "update(s)")
        bounded = []
        for reply, arrays, norm in zip(replies, returned, norms, strict=True):
            if norm <= limit:
                continue
            (name,) = reply.content.array_records
            scaled = scaled_update(self.bound_base, arrays, limit / norm)
            reply.content[name] = ArrayRecord({k: Array(v) for k, v in scaled.items()})
            node = reply.metadata.src_node_id
            bounded.append({"node": node, "norm": norm, "limit": limit})
            log.warning(
                "round %d: node %s's update (norm %.4g) scaled to update-bound's %.4g", server_round, node, norm, limit
            )
        if bounded:
            self.runlog.record(server_round)["bounded"] = bounded

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if replies and sum(float(r.content["metrics"]["num-examples"]) for r in replies) == 0:
            return None  # no site has validation cases: nothing to average
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.runlog.record(server_round)["val"] = {k: v for k, v in metrics.items()}
        return metrics


def median_limit(lengths: Iterable[float], bound: float) -> tuple[float | None, int]:
    """``bound`` times the lower median of the update ``lengths`` above 0 (most nodes must be honest; a node that sent
    back what it got adds nothing to compare), or None where none is; and how many are above 0."""
    moved = sorted(n for n in lengths if n > 0)
    return (bound * moved[(len(moved) - 1) // 2] if moved else None), len(moved)


def warn_few_moved(server_round: int, moved: int, what: str) -> None:
    """Warn where ``update-bound`` compares only one or two ``what`` that moved: of two, the shorter bounds the other;
    one is never bounded."""
    if 0 < moved < 3:
        log.warning(
            "round %d: update-bound compares %d %s that moved: no median here that a hostile site cannot set (three "
            "or more are needed)",
            server_round,
            moved,
            what,
        )


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    """A checked train reply's one array record as NumPy arrays (float32: :mod:`server.replies`)."""
    (record,) = reply.content.array_records.values()
    return {k: v.numpy() for k, v in record.items()}


def make_strategy(run: RunConfig, *, runlog: RunLog, nodes: int, **kwargs):
    """An instance of the run's strategy (:data:`STRATEGIES`) with the mixin, its options from the run config
    (:func:`strategy_options`); ``kwargs`` go to the Flower strategy."""
    base = STRATEGIES[run.strategy]
    cls = type(f"MSTKD{base.__name__}", (FederatedMixin, base), {})
    if run.strategy.robust:  # hostile nodes expected: no claimed case count weighs in the sites' metrics
        kwargs = {"train_metrics_aggr_fn": median_metrics, "evaluate_metrics_aggr_fn": median_metrics, **kwargs}
    strategy = cls(
        runlog=runlog,
        transport=run.transport,
        local_epochs=run.local_epochs,
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        **kwargs,
        **strategy_options(run, nodes),
    )
    strategy.uniform_weights = run.strategy.robust  # the arrays too: only MultiKrum's read the counts
    strategy.update_bound = run.update_bound
    return strategy
