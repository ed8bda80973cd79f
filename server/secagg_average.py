"""The one check the server can make of SecAgg+'s result: the unmasked average against what the nodes claim.

Under SecAgg+ the server sees no single update, only the weighted average of the nodes' parameters, and each node's
case count and update length (``update-norm``) in the clear. The average's update is a weighted mean of the nodes'
updates, so it is no longer than the same weighted mean of their lengths, plus what quantisation adds
(:func:`allowed_update`). :class:`CheckedFedAvg`, the strategy :func:`server.secagg.run_secagg` gives Flower's
workflow, skips a round whose average is longer than that (a node masked another update than the one it describes)
and, with ``update-bound``, scales down an average longer than the claims cut to k lower medians allow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as LegacyFedAvg

from messages.clipping import scaled_update, update_norm
from server.replies import metric_problem, printable
from server.runlog import RunLog
from server.strategy import median_limit, warn_few_moved

log = logging.getLogger("mstkd.server")

CLIP, LEVELS = 8.0, 2**22
"""The range each node's scaled weights are clipped to, and the steps they are quantised to (Flower's defaults)."""
RELATIVE_SLACK = 1e-6
"""What float64 arithmetic may add to the lengths the nodes measure, relative to them."""


@dataclass(frozen=True)
class Allowance:
    """How far a round's unmasked average may move the model (:func:`allowed_update`)."""

    claims: float
    """The weighted mean of the lengths the nodes claim, plus quantisation: no honest average is longer."""
    bound: float
    """The same with each claim cut to ``update-bound`` lower medians (``claims`` without ``update-bound``)."""
    cut: list[tuple[int, float, float]]
    """The claims cut: ``(position, the length claimed, limit)``."""
    moved: int
    """How many claims are above 0."""


def weight_factor(count: int, max_weight: float, levels: int = LEVELS) -> int:
    """A node's SecAgg+ weight factor, as Flower's client computes it from its case count: the integer its scaled
    weights are multiplied by, over ``levels``."""
    return round(count / max_weight * levels)


def allowed_update(
    claims: list[tuple[int, float]], *, max_weight: float, levels: int, clip: float, size: int, bound: float = 0.0
) -> Allowance:
    """How far the unmasked average of nodes that claim ``claims`` can move the model.

    Each claim is a node's case count and the length of its update (``update-norm``: 0 when not a finite number from
    0, and at most the longest update its scaled weights can carry, each moved across [-``clip``, ``clip``]). The
    average weighs each node's update by its weight factor, ``round(count / max_weight * levels)``, so by the triangle
    inequality it is no longer than the same weighted mean of the lengths; quantising each node's scaled weights
    (``size`` of them) to ``levels`` steps over [-``clip``, ``clip``] moves each weight of the sum by less than one
    step per node, which the division by the total weight factor scales. With ``bound`` k > 0, each claim is also cut
    to k times the lower median of the claims above 0 (most nodes must be honest).

    Raises:
        ValueError: the weight factors sum to 0 (``max_weight`` far above every case count): there is no average.
    """
    weights = [weight_factor(count, max_weight, levels) for count, _ in claims]
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"the nodes' weight factors sum to 0: secagg-max-weight {max_weight:g} is too large")
    norms = [
        min(norm if np.isfinite(norm) and norm >= 0 else 0.0, np.sqrt(size) * 2 * clip * levels / w if w else 0.0)
        for w, (_, norm) in zip(weights, claims, strict=True)
    ]
    limit, moved = median_limit(norms, bound)
    if not bound or limit is None:
        limit = float("inf")
    cut = [(i, float(claims[i][1]), limit) for i, n in enumerate(norms) if n > limit]  # as claimed
    quantisation = np.sqrt(size) * len(claims) * 2 * clip / total

    def mean(lengths: list[float]) -> float:
        return sum(w * n for w, n in zip(weights, lengths, strict=True)) / total * (1 + RELATIVE_SLACK) + quantisation

    return Allowance(claims=mean(norms), bound=mean([min(n, limit) for n in norms]), cut=cut, moved=moved)


def _claimed_norm(metrics: dict) -> float:
    """The length of its update a node claims (``update-norm``, as :func:`server.replies.metric_problem` takes a
    metric), or 0 where it sent none that reads as one."""
    value = metrics.get("update-norm")
    try:
        return float(value) if metric_problem("train", "update-norm", value) is None else 0.0
    except OverflowError:  # an int beyond float's range (gRPC's are 64-bit: in process only)
        return 0.0


class CheckedFedAvg(LegacyFedAvg):
    """Flower's FedAvg as the SecAgg+ workflow calls it, with every result carrying the unmasked average, which is
    checked against the lengths the nodes claim (:func:`allowed_update`) before it becomes the round's model:

    - longer than the claims allow, it is the sum of some other update than a node describes: the round is skipped
      with the model kept (a ``ValueError``, which :class:`server.secagg.RoundSafeSecAgg` turns into a skipped round);
    - within them, but longer than ``update_bound`` allows once each claim is cut to k lower medians, its update is
      scaled down to that length, direction kept (an honest site with a long update, or a node covering a shift with
      a long claim: no single update can be told or scaled).

    The round's record says how far the average moved the model and what the claims and the bound allowed
    (``secagg-update``), and which claims were cut (``claims-bounded``)."""

    def __init__(self, *args, runlog: RunLog, names: list[str], max_weight: float, update_bound: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.runlog, self.names, self.max_weight, self.update_bound = runlog, names, max_weight, update_bound
        self.sent: list[np.ndarray] = []

    def configure_fit(self, server_round, parameters, client_manager):
        self.sent = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(parameters)]  # as nodes read it
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        parameters, metrics = super().aggregate_fit(server_round, results, failures)  # the nodes' metrics recorded
        if results:  # each result holds the same unmasked average
            average = parameters_to_ndarrays(results[0][1].parameters)
            scale = self._check(server_round, [fitres for _, fitres in results], average)
            if scale < 1:
                scaled = scaled_update(self._named(self.sent), self._named(average), scale)
                parameters = ndarrays_to_parameters(list(scaled.values()))
        return parameters, metrics

    def _named(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` in the order both ends pack the federated arrays, by name."""
        return dict(zip(self.names, arrays, strict=True))

    def _check(self, server_round: int, results: list, average: list[np.ndarray]) -> float:
        """What to scale the average's update by (1: nothing); raise ``ValueError`` where no honest nodes give it."""
        claims = [(int(r.num_examples), _claimed_norm(r.metrics)) for r in results]
        allowed = allowed_update(
            claims,
            max_weight=self.max_weight,
            levels=LEVELS,
            clip=CLIP,
            size=sum(a.size for a in self.sent),
            bound=self.update_bound,
        )
        norm = update_norm(self._named(self.sent), self._named(average))
        record = self.runlog.record(server_round)
        record["secagg-update"] = {"norm": norm, "claims": allowed.claims, "bound": allowed.bound}
        if self.update_bound:
            warn_few_moved(server_round, allowed.moved, "claim(s) of updates")
        if allowed.cut:
            record["claims-bounded"] = [
                {"site": printable(results[i].metrics.get("site", "?"), 64), "claimed": claimed, "limit": limit}
                for i, claimed, limit in allowed.cut
            ]
        if norm > allowed.claims:
            why = "a node masked another update than the one it describes"
            reach = max(c for c, _ in claims) / self.max_weight * max(float(np.abs(a).max()) for a in self.sent)
            if reach > 0.9 * CLIP:  # honest weights scaled past the range are clipped, and the sum is wrong too
                why += f", or a site's weights scaled by its cases / secagg-max-weight ({reach:.3g}) passed {CLIP:g}"
            raise ValueError(
                f"the unmasked average moved the model by {norm:.4g}, more than the {allowed.claims:.4g} the nodes' "
                f"update-norm claims allow: {why}"
            )
        if norm <= allowed.bound:
            return 1.0
        record["secagg-update"]["scaled"] = True
        log.warning(
            "round %d: the unmasked average's update (norm %.4g) scaled to update-bound's %.4g",
            server_round,
            norm,
            allowed.bound,
        )
        return allowed.bound / norm
