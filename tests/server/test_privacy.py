"""Differential privacy settings and the privacy ledger (server.privacy)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig


def test_dp_max_epsilon_without_noise_is_refused():
    from server.privacy import privacy_settings

    with pytest.raises(InputError, match="dp-max-epsilon needs dp-noise"):
        privacy_settings(RunConfig.parse({"dp": "server", "dp-noise": 0.0, "dp-max-epsilon": 3.0, "min-nodes": 3}))


def test_the_privacy_ledger_survives_a_server_restart():
    from server.privacy import PrivacyLedger, privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "client", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3}))
    first = PrivacyLedger(privacy, 3)
    first.release()
    resumed = PrivacyLedger(privacy, 3, state=first.state())  # what ServerCheckpoint carries
    assert resumed.release()["epsilon"] == pytest.approx(first.release()["epsilon"])
    assert resumed.release()["releases"] == 3


def test_a_dp_run_resumes_only_from_a_state_whose_account_fits_it():
    """Resuming with noise from a run without it would count only the resumed rounds: the epsilon reported, and
    dp-max-epsilon, would ignore every model released before. A state of another population is refused too."""
    from server.privacy import PrivacyLedger, privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3}))
    with pytest.raises(InputError, match="released without privacy accounting"):
        PrivacyLedger(privacy, 3, state={})  # what a run without dp saves
    earlier = PrivacyLedger(privacy, 4)
    earlier.release()
    with pytest.raises(InputError, match="privacy account was kept for another number of sites"):
        PrivacyLedger(privacy, 3, state=earlier.state())
    limited = {"dp": "server", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3, "dp-max-epsilon": 5.0}
    stopped = PrivacyLedger(privacy_settings(RunConfig.parse(limited)), 3)
    spent = stopped.release()["epsilon"]
    raised = privacy_settings(RunConfig.parse(limited | {"dp-max-epsilon": 10.0}))  # a run resumed with more budget
    assert PrivacyLedger(raised, 3, state=stopped.state()).release()["epsilon"] > spent
    assert PrivacyLedger(privacy, 3).release()["releases"] == 1  # a fresh run has no state to check


class _Nodes:
    """A grid of connected nodes whose messages are only built, never sent."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self):
        return list(range(1, self.count + 1))


def _dp_strategy(tmp_path, mode: str, clipping: str = "fixed", **extra):
    from server.app import WAIT_ELSEWHERE
    from server.privacy import privacy_settings, wrap_for_privacy
    from server.runlog import RunLog
    from server.strategy import make_strategy

    values = {"dp": mode, "dp-clipping": clipping, "dp-clip": 1.0, "dp-noise": 0.0, "min-nodes": 3, **extra}
    run = RunConfig.parse({"transport": "float32", **values})
    inner = make_strategy(run, runlog=RunLog(tmp_path), nodes=3, **WAIT_ELSEWHERE)
    return wrap_for_privacy(inner, privacy_settings(run))


def _dp_round(strategy, start, updates, connected=5, bits=None):
    """One round from ``start`` (by name) in which the nodes asked first reply ``start + update`` each; the nodes
    asked and the released arrays (None when nothing is aggregated)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _Nodes(connected)))
    replies = []
    for i, (message, update) in enumerate(zip(sent, updates, strict=False)):
        metrics = {"num-examples": 4 + i, **({"norm_bit": bits[i]} if bits is not None else {})}
        arrays = ArrayRecord({k: Array((v + update[k]).astype(np.float32)) for k, v in start.items()})
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message))
    released, _ = strategy.aggregate_train(1, replies)
    return sent, None if released is None else {k: v.numpy().astype(np.float64) for k, v in released.items()}


@pytest.mark.parametrize("mode", ["server", "client"])
def test_a_dp_round_divides_by_min_nodes_whoever_replies(tmp_path, mode, task_identity, caplog):
    """The noise covers one site moving the release by dp-clip / min-nodes. Flower's wrappers averaged the replies
    that came, so a round needed all of them (one failing node stopped a DP run), and a round that asked more nodes
    than min-nodes let one site move it further. Now at most min-nodes nodes are asked and the sum of the clipped
    updates that came is divided by min-nodes; an update of norm 0 (a node echoing the model) no longer makes the
    server's clipping divide by zero."""
    start = {"student.w": np.zeros(4, np.float32), "disc.w": np.ones(2, np.float32)}
    u = {"student.w": np.array([0.6, 0.0, 0.0, 0.0]), "disc.w": np.array([0.0, 0.8])}  # norm 1 = dp-clip
    zero = {k: np.zeros_like(v) for k, v in u.items()}
    underflow = {"student.w": np.array([1e-23, 0.0, 0.0, 0.0]), "disc.w": np.zeros(2)}  # its square is 0 in float32
    minus = {k: -v for k, v in u.items()}
    sent, three = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, u])
    assert len(sent) == 3  # of 5 connected
    for k in start:
        np.testing.assert_allclose(three[k], start[k] + u[k], atol=1e-6)  # every node asked replied: the mean
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, two = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u])
    assert "could impact the differential privacy" not in caplog.text  # Flower's warning, untrue here
    _, echoed = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, zero])
    _, underflown = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, underflow])
    _, flipped = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, minus])
    for k in start:
        np.testing.assert_allclose(two[k], start[k] + 2 * u[k] / 3, atol=1e-6)
        np.testing.assert_allclose(echoed[k], two[k], atol=1e-6)
        np.testing.assert_allclose(underflown[k], two[k], atol=1e-6)
    for released in (three, flipped):  # one site more or less, or another in its place: at most dp-clip / 3
        moved = np.sqrt(sum(((released[k] - two[k]) ** 2).sum() for k in start))
        assert moved <= 1.0 / 3 + 1e-6
    if mode == "server":  # the server clips: an update ten times too long counts as one of norm dp-clip
        long = {k: 10 * v for k, v in u.items()}
        _, clipped = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, long])
        for k in start:
            np.testing.assert_allclose(clipped[k], three[k], atol=1e-6)
    assert _dp_round(_dp_strategy(tmp_path, mode), start, [zero])[1] is None  # nothing moved: nothing released


@pytest.mark.parametrize("mode", ["server", "client"])
def test_adaptive_clippings_count_is_centred_and_a_missing_node_counts_half(tmp_path, mode, monkeypatch, task_identity):
    """Andrew et al. count each bit minus 1/2, so that one site moves the noisy count by 1/2, as the split of the
    noise between the updates and the count assumes; the count was uncentred (one site moved it by 1), and a node
    that did not reply counted as not clipped, which shrank the norm however many updates were clipped."""
    import server.privacy as privacy

    monkeypatch.setattr(privacy._UnpredictableNoise, "_rng", staticmethod(lambda: np.random.default_rng(0)))
    start = {"student.w": np.zeros(4, np.float32)}
    long = {"student.w": np.array([5.0, 0.0, 0.0, 0.0])}  # clipped at the first norm, 1
    shares = {}
    for replying in (3, 2):
        strategy = _dp_strategy(tmp_path, mode, "adaptive", **{"dp-clip-quantile": 0.5, "dp-count-noise": 1e-9})
        real, seen = strategy._noisy_fraction, []

        def recorded(count, total, real=real, seen=seen):
            seen.append(real(count, total))
            return seen[-1]

        strategy._noisy_fraction = recorded
        _dp_round(strategy, start, [long] * replying, bits=[1] * replying)
        shares[replying] = seen[0]
        if replying == 2:  # two of three clipped, the third half: the norm grows, as it should
            assert strategy.clipping_norm > 1.0
    assert shares[3] == pytest.approx(1.0) and shares[2] == pytest.approx(2.5 / 3)


def test_dp_with_a_server_optimiser_is_refused():
    """Flower adds the noise after the server optimiser, whose momentum or moments would hold the sites' average
    without noise and carry it into later rounds and the server's saved state."""
    from server.privacy import privacy_settings

    for strategy in ("fedavgm", "fedadam", "fedyogi"):
        with pytest.raises(InputError, match="use fedavg or fedprox with differential privacy"):
            privacy_settings(RunConfig.parse({"dp": "server", "strategy": strategy, "min-nodes": 3}))
    assert (
        privacy_settings(RunConfig.parse({"dp": "server", "strategy": "fedprox", "min-nodes": 3}))["mode"] == "server"
    )
