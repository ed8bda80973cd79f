"""The bound on SecAgg+'s unmasked average (server.secagg_average.allowed_update), against Flower's own quantisation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_multiply
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from server.secagg_average import CLIP, LEVELS, allowed_update

MAX_WEIGHT = 10.0


def _unmasked_average(trained: list[np.ndarray], counts: list[int], shift: float = 0.0) -> np.ndarray:
    """What the workflow unmasks from the nodes' ``trained`` float32 weights: each scaled by its node's quantised weight
    factor and quantised (Flower's own functions, stochastic rounding), summed, dequantised and divided by the total
    factor; ``shift`` is added to the last node's scaled weights, as a node that masks another update would."""
    factors = [round(c / MAX_WEIGHT * LEVELS) for c in counts]
    summed = np.zeros(trained[0].shape, np.int64)
    for i, (weights, factor) in enumerate(zip(trained, factors, strict=True)):
        (scaled,) = parameters_multiply([weights], factor / LEVELS)
        summed += quantize([scaled + (shift if i == len(trained) - 1 else 0.0)], CLIP, LEVELS)[0]
    (values,) = dequantize([summed], CLIP, LEVELS)
    return (values - (len(trained) - 1) * CLIP) * LEVELS / sum(factors)


def _federation(seed: int, nodes: int, lengths: list[float], aligned: bool = False, size: int = 20_000):
    """The model sent (float32), the nodes' trained weights (float32) and what each claims: its case count and the
    length of its update as the node measures it (client.site: float32 weights, a float64 sum)."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # noqa: NPY002 - Flower's stochastic rounding draws from NumPy's global generator
    sent = rng.normal(0, 0.5, size).astype(np.float32)
    direction = rng.normal(0, 1, size)
    trained = [
        (sent + (direction if aligned else rng.normal(0, 1, size)) / np.sqrt(size) * length).astype(np.float32)
        for length in lengths[:nodes]
    ]
    counts = [int(c) for c in rng.integers(1, 16, nodes)]  # scaled weights stay inside [-8, 8]
    claims = [(c, float(np.linalg.norm(t.astype(np.float64) - sent))) for t, c in zip(trained, counts, strict=True)]
    return sent.astype(np.float64), trained, claims


def _allowed(claims, size: int = 20_000, bound: float = 0.0):
    return allowed_update(claims, max_weight=MAX_WEIGHT, levels=LEVELS, clip=CLIP, size=size, bound=bound)


def _moved(sent: np.ndarray, trained: list[np.ndarray], claims, shift: float = 0.0) -> float:
    return float(np.linalg.norm(_unmasked_average(trained, [c for c, _ in claims], shift) - sent))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_an_honest_average_is_within_what_the_claims_allow(seed, aligned):
    """However the nodes' updates point (all the same way: the triangle inequality is tight, and only the
    quantisation term keeps an honest round in), and whatever their case counts and lengths."""
    lengths = list(np.random.default_rng(100 + seed).uniform(0.01, 1.5, 6))
    sent, trained, claims = _federation(seed, 3 + seed, lengths, aligned)
    allowed = _allowed(claims)
    assert _moved(sent, trained, claims) <= allowed.claims == allowed.bound and not allowed.cut
    # the bound is the weighted mean of the lengths plus quantisation: aligned updates come close to it
    weights = np.array([round(c / MAX_WEIGHT * LEVELS) for c, _ in claims], dtype=np.float64)
    mean = float(weights @ [n for _, n in claims] / weights.sum())
    assert mean <= allowed.claims < mean * 1.001 + 0.02


def test_nodes_that_send_back_what_they_got_are_within_quantisation_alone():
    """With every update 0 the bound is the quantisation term alone: under one step per node and weight, which
    grows with the square root of the number of weights."""
    sent, trained, claims = _federation(5, 4, [0.0] * 4)
    allowed = _allowed(claims)
    assert [n for _, n in claims] == [0.0] * 4
    assert 0 < _moved(sent, trained, claims) <= allowed.claims
    weights = sum(round(c / MAX_WEIGHT * LEVELS) for c, _ in claims)
    assert allowed.claims == pytest.approx(np.sqrt(20_000) * 4 * 2 * CLIP / weights)


def test_a_node_that_masks_another_update_is_seen_in_the_average():
    sent, trained, claims = _federation(7, 4, [0.15] * 4)
    allowed = _allowed(claims)
    assert _moved(sent, trained, claims) <= allowed.claims
    # 1e-2 added to each scaled weight of one node moves each weight of the average by 1e-2 over the total factor
    # (5.5 here): about 0.26 over the 20 000 weights, where each update is 0.15 long
    assert _moved(sent, trained, claims, shift=1e-2) > 1.5 * allowed.claims


def test_update_bound_cuts_a_claim_to_k_lower_medians_of_the_claims_that_moved():
    claims = [(4, 1.0), (4, 1.2), (4, 0.0), (4, 0.0), (4, 0.9), (4, 300.0)]  # two nodes sent back what they got
    allowed = _allowed(claims, 100, bound=3.0)
    # the claims above 0 are 0.9, 1.0, 1.2, 300: the lower median is 1.0 (with the zeros it would be 0.9)
    assert allowed.cut == [(5, 300.0, 3.0)]
    assert allowed.bound == pytest.approx((1.0 + 1.2 + 0.9 + 3.0) / 6, rel=1e-3)
    assert allowed.claims == pytest.approx((1.0 + 1.2 + 0.9 + 300.0) / 6, rel=1e-3)
    unbounded = _allowed(claims, 100)
    assert unbounded.cut == [] and unbounded.bound == unbounded.claims


@pytest.mark.parametrize("claim", [float("nan"), float("inf"), -1.0])
def test_a_claim_that_is_not_a_length_counts_as_none(claim):
    assert _allowed([(4, 1.0), (4, 1.0), (4, claim)], 100).claims == pytest.approx(2 / 3, rel=1e-3)


def test_a_claim_counts_for_at_most_the_longest_update_a_node_can_carry():
    """Each scaled weight moves by at most the width of [-8, 8], so a node whose factor is w / 2**22 can move each
    weight by at most 16 * 2**22 / w: a claim of 1e308 counts for that, and the allowance stays finite."""
    size, count = 100, 4
    allowed = _allowed([(count, 1e308)], size)
    factor = round(count / MAX_WEIGHT * LEVELS)
    assert allowed.claims == pytest.approx(np.sqrt(size) * 2 * CLIP * LEVELS / factor, rel=1e-3)


def test_weight_factors_that_sum_to_0_give_no_average():
    with pytest.raises(ValueError, match="weight factors sum to 0: secagg-max-weight 1e.09 is too large"):
        allowed_update([(1, 1.0), (1, 1.0)], max_weight=1e9, levels=LEVELS, clip=CLIP, size=10)


@pytest.mark.parametrize(
    ("sent", "counted"),
    [(1.5, 1.5), (2, 2.0), (True, 0.0), ("1e6", 0.0), (float("nan"), 0.0), (None, 0.0), (10**400, 0.0)],
)
def test_a_claim_is_read_as_the_servers_metric_checks_take_a_metric(sent, counted):
    """A claim sent as a bool, a text, NaN, nothing, or an int beyond float's range counts as no claim (0)."""
    from server.secagg_average import _claimed_norm

    metrics = {} if sent is None else {"update-norm": sent}
    assert _claimed_norm(metrics) == counted
