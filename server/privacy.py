"""Differential privacy on the server: Flower's DP wrappers with unpredictable noise (the ledger: :mod:`server.ledger`).

``dp`` = ``off`` | ``server`` (the server clips each site's update) | ``client`` (each site clips its
own, :mod:`client.app`'s ``clip_updates``), then the server adds Gaussian noise to the average.
``dp-clipping`` = ``fixed`` clips at ``dp-clip``; ``adaptive`` starts there and moves the norm
each round until a ``dp-clip-quantile`` share of the sites' updates is clipped, at rate ``dp-clip-lr``
(Andrew et al., 2021, with Flower's wrappers, whose direction of that step :class:`_TowardsTarget`
corrects), so that nobody has to guess the norm. With
adaptive clipping part of the privacy budget goes to the noisy count of clipped updates (its
noise sd ``dp-count-noise``, by default ``nodes / 20``): the update noise is raised so that the
two together give noise multiplier ``dp-noise``, which the ledger accounts for.
"""

from __future__ import annotations

import logging
import math
import secrets

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import CLIENTS_DISCREPANCY_WARNING, get_norm

from mstkd.errors import InputError
from mstkd.runconfig import DPClipping, DPMode, RunConfig, Strategy


class _UnpredictableNoise:
    """Gaussian noise from a generator seeded by the operating system's entropy, added to a sum over a fixed
    number of sites.

    Flower's wrappers draw the noise from NumPy's global generator, which the server seeds with the
    run's (published) seed: anyone could recompute and subtract it, and a resumed run would repeat it.
    The same holds for the noise on the count of clipped updates that adaptive clipping releases.

    Flower's wrappers average the replies that came, while the noise is calibrated to ``num_sampled_clients``
    (``min-nodes``: one site moving the average by ``clip / min-nodes``), so a round had to wait for every node, and
    one node that failed or sent a refused reply in every round stopped a DP run from learning. Here, as in
    DP-FedAvg's fixed-denominator estimator (McMahan et al., 2018), a round asks at most ``min-nodes`` nodes
    (:func:`wrap_for_privacy`), and the clipped updates that came are summed and divided by ``min-nodes`` whoever
    replies: a node that does not reply adds a zero update, and adding or removing one site moves the release by at
    most ``clip / min-nodes``, which the noise covers. A round in which all ``min-nodes`` nodes reply is their plain
    average, as before. An update of norm 0 (a node that sends back what it was sent, or changes a weight of 0 by
    1e-23) adds nothing to the sum and is left out of it: Flower's clipping divides by its norm.

    Adaptive clipping's share of clipped updates is the centred count of Andrew et al. (2021): each reply counts its
    bit minus 1/2, the noise is added, the sum is divided by ``min-nodes`` and 1/2 added back. One site then moves
    the count by 1/2, as the split of the noise between the updates and the count assumes
    (``compute_adaptive_noise_params``), and a node that does not reply counts as half clipped.
    """

    @staticmethod
    def _rng() -> np.random.Generator:
        return np.random.default_rng(secrets.randbits(128))

    sites_clip = False  # whether the sites clip their own updates (client-side DP)

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # sites that clip do so against the model as they received it, in the transport dtype: a sum over that base
        # moves by clip / nodes
        base = next(iter(messages[0].content.array_records.values())) if self.sites_clip and messages else arrays
        self.round_start = {k: base[k].numpy().astype(np.float32, copy=False) for k in arrays}
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.replied = len(replies)
        moving = [r for r in replies if not self._unchanged(r)]
        self.summed = len(moving)
        if not moving:
            return None, None
        return super().aggregate_train(server_round, moving)

    def _unchanged(self, reply) -> bool:
        """Whether the reply's update has norm 0 as Flower's clipping computes it (in the arrays' float32, where an
        update of 1e-23 on a weight of 0 squares to 0 as well)."""
        arrays = next(iter(reply.content.array_records.values()))
        return get_norm([np.subtract(arrays[k].numpy(), start) for k, start in self.round_start.items()]) == 0

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        norm = getattr(self, "noise_norm", self.clipping_norm)  # adaptive clipping: the norm the round clipped at
        stdev = self.noise_multiplier * norm / self.num_sampled_clients
        share = self.summed / self.num_sampled_clients  # the mean of the updates summed, as a sum over min-nodes
        rng = self._rng()
        noisy = {}
        for k, v in aggregated_arrays.items():
            mean = v.numpy()
            if share != 1:
                start = self.round_start[k].astype(np.float64)
                mean = start + share * (mean.astype(np.float64) - start)
            noisy[k] = Array((mean + rng.normal(0.0, stdev, mean.shape)).astype(v.numpy().dtype))
        return ArrayRecord(noisy)

    def _noisy_fraction(self, count: int, total: int) -> float:
        absent = self.num_sampled_clients - self.replied  # count 1/2 each (a zero update that came: 0, not clipped)
        return (float(self._rng().normal(count, self.clipped_count_stddev)) + absent / 2) / self.num_sampled_clients


class ServerSideDP(_UnpredictableNoise, DifferentialPrivacyServerSideFixedClipping):
    """The server clips each site's update at a fixed norm, then adds noise to their average."""


class ClientSideDP(_UnpredictableNoise, DifferentialPrivacyClientSideFixedClipping):
    """The sites clip their own updates (:func:`client.app.clip_updates`; the round loop refuses a reply that was not
    clipped); the server adds noise to the average."""

    sites_clip = True


class _TowardsTarget:
    """The adaptive norm's step, towards its target: ``C <- C exp(lr (clipped share - target share))``; and the
    round's noise at the norm its updates were clipped at.

    Flower 1.42 steps by ``exp(-lr (clipped share - target))``: its ``norm_bit`` marks an update that was
    clipped, where Andrew et al. count the updates that were not. So more clipping than wanted shrank the
    norm, which clipped still more, until every update was clipped to nearly nothing. The sign here makes
    the norm grow when too many updates are clipped and shrink when too few are. Flower also moves the norm
    before it adds the round's noise, which then follows next round's norm: too little noise whenever the
    norm shrinks. The noise here uses the norm the round clipped at.
    """

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.noise_norm = self.clipping_norm  # what this round's updates were clipped at
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class ServerSideAdaptiveDP(_TowardsTarget, _UnpredictableNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """The server clips each site's update at a norm it adapts every round, then adds noise to their average."""


class ClientSideAdaptiveDP(_TowardsTarget, _UnpredictableNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    """The sites clip their own updates at the norm the server sends (:func:`client.app.clip_updates`) and say whether
    they clipped; the server adapts the norm and adds noise to the average."""

    sites_clip = True


DP_WRAPPERS = {
    (DPMode.SERVER, DPClipping.FIXED): ServerSideDP,
    (DPMode.CLIENT, DPClipping.FIXED): ClientSideDP,
    (DPMode.SERVER, DPClipping.ADAPTIVE): ServerSideAdaptiveDP,
    (DPMode.CLIENT, DPClipping.ADAPTIVE): ClientSideAdaptiveDP,
}


def privacy_settings(run: RunConfig) -> dict:
    """``dp`` = off | server | client, with ``dp-clipping``, ``dp-clip``, ``dp-noise`` and the rest: what the run
    log records (empty when ``dp`` is off). The run config's types and ranges are checked already
    (:mod:`mstkd.runconfig`); this checks the combinations."""
    mode, min_nodes = str(run.dp), run.min_nodes
    if run.dp == DPMode.OFF:
        return {}
    if run.strategy in (Strategy.FEDAVGM, Strategy.FEDADAM, Strategy.FEDYOGI):
        raise InputError(
            f"dp={mode!r} with strategy={str(run.strategy)!r}: Flower adds the noise after the server optimiser, "
            "whose momentum or moments then hold the sites' average without noise (and carry it into every later "
            "round and the server's saved state); use fedavg or fedprox with differential privacy"
        )
    if run.strategy.robust:
        raise InputError(
            f"dp={mode!r} with strategy={str(run.strategy)!r}: the noise is calibrated to an average of the clipped "
            "updates (one site moves it by dp-clip / nodes); a median or a selection moves by up to dp-clip, so the "
            "reported epsilon would be wrong. Use a robust strategy or differential privacy, not both"
        )
    if run.dp_delta >= 1 / min_nodes:
        raise InputError(
            f"dp-delta={run.dp_delta:g} is at least 1 / min-nodes ({1 / min_nodes:.3g}): releasing one whole site's "
            "update at random meets that delta, so its epsilon would guarantee nothing; use one far below it "
            "(the default: 1e-5)"
        )
    clipping = str(run.dp_clipping)
    clip, noise = run.dp_clip, run.dp_noise
    max_epsilon = run.dp_max_epsilon
    if max_epsilon > 0 and noise == 0:
        raise InputError("dp-max-epsilon needs dp-noise > 0: without noise there is no finite epsilon to bound")
    settings = {
        "mode": mode,
        "clipping": clipping,
        "clipping_norm": clip,
        "noise_multiplier": noise,
        "sampled_nodes": min_nodes,
        "noise_stdev": noise * clip / min_nodes,
        "delta": run.dp_delta,
        "max_epsilon": max_epsilon or None,
    }
    if clipping == "adaptive":
        count_noise = run.dp_count_noise or min_nodes / 20
        if noise > 0 and noise >= 2 * count_noise:
            raise InputError(
                f"adaptive clipping with dp-noise={noise:g} needs dp-count-noise above {noise / 2:g} (the noise on "
                f"the count of clipped updates; now {count_noise:g}); or use dp-clipping='fixed'"
            )
        settings.update(
            target_quantile=run.dp_clip_quantile,
            clip_lr=run.dp_clip_lr,
            count_noise=count_noise,
        )
        del settings["noise_stdev"]  # it follows the norm, which moves: the run log records it per round
    return settings


def _not_flowers_count_warning(record: logging.LogRecord) -> bool:
    """Drops Flower's warning that fewer nodes replied than were sampled "could impact the differential privacy
    guarantees": the sum here is divided by ``min-nodes`` whoever replies (:class:`_UnpredictableNoise`), so a node
    that did not reply is a zero update the noise covers, and the warning would say so in every such round."""
    return record.msg != CLIENTS_DISCREPANCY_WARNING


def wrap_for_privacy(strategy, privacy: dict):
    """``strategy`` inside Flower's DP wrapper for ``privacy`` (:func:`privacy_settings`)."""
    flower_log = logging.getLogger("flwr")
    if _not_flowers_count_warning not in flower_log.filters:
        flower_log.addFilter(_not_flowers_count_warning)
    strategy.uniform_weights = True  # the noise is calibrated to one site's share being 1 / sites
    strategy.most_train_nodes = privacy["sampled_nodes"]  # the sum is divided by that many, whoever replies
    wrapper = DP_WRAPPERS[(privacy["mode"], privacy["clipping"])]
    common = {"noise_multiplier": privacy["noise_multiplier"], "num_sampled_clients": privacy["sampled_nodes"]}
    if privacy["clipping"] == "fixed":
        return wrapper(strategy, clipping_norm=privacy["clipping_norm"], **common)
    return wrapper(
        strategy,
        initial_clipping_norm=privacy["clipping_norm"],
        target_clipped_quantile=privacy["target_quantile"],
        clip_norm_lr=privacy["clip_lr"],
        clipped_count_stddev=privacy["count_noise"],
        **common,
    )
