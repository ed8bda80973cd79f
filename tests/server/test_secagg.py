"""The bound on SecAgg+'s unmasked average (server.secagg.allowed_update), against Flower's own quantisation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from server.secagg import CLIP, LEVELS, allowed_update

MAX_WEIGHT = 10.0


def _unmasked_average(sent: np.ndarray, updates: list[np.ndarray], counts: list[int], shift: float = 0.0):
    """What the workflow unmasks: each node's weights scaled by its quantised weight factor and quantised (Flower's
    stochastic rounding), summed, dequantised and divided by the total factor; ``shift`` is added to the last node's
    scaled weights, as a node that masks another update would."""
    factors = [round(c / MAX_WEIGHT * LEVELS) for c in counts]
    summed = np.zeros(sent.shape, np.int64)
    for i, (update, factor) in enumerate(zip(updates, factors, strict=True)):
        scaled = (sent + update) * (factor / LEVELS) + (shift if i == len(updates) - 1 else 0.0)
        summed += quantize([scaled], CLIP, LEVELS)[0]
    (values,) = dequantize([summed], CLIP, LEVELS)
    return (values - (len(updates) - 1) * CLIP) * LEVELS / sum(factors)


def _claims(updates: list[np.ndarray], counts: list[int]) -> list[tuple[int, float]]:
    return [(c, float(np.linalg.norm(u))) for u, c in zip(updates, counts, strict=True)]


def _allowed(claims, size: int, bound: float = 0.0):
    return allowed_update(claims, max_weight=MAX_WEIGHT, levels=LEVELS, clip=CLIP, size=size, bound=bound)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_an_honest_average_is_within_what_the_claims_allow(seed, aligned):
    """However the nodes' updates point (all the same way: the triangle inequality is tight, and only the
    quantisation term keeps an honest round in), and whatever their case counts and lengths."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # noqa: NPY002 - Flower's stochastic rounding draws from NumPy's global generator
    size, nodes = 20_000, 3 + seed
    sent = rng.normal(0, 0.5, size)
    direction = rng.normal(0, 1, size)
    updates = [(direction if aligned else rng.normal(0, 1, size)) * rng.uniform(1e-4, 1e-2) for _ in range(nodes)]
    counts = [int(c) for c in rng.integers(1, 16, nodes)]  # scaled weights stay inside [-8, 8]
    sent32 = sent.astype(np.float32).astype(np.float64)
    average = _unmasked_average(sent32, updates, counts)
    allowed, cut = _allowed(_claims(updates, counts), size)
    assert np.linalg.norm(average - sent32) <= allowed and not cut
    # the bound is the weighted mean of the lengths plus quantisation: aligned updates come close to it
    weights = np.array([round(c / MAX_WEIGHT * LEVELS) for c in counts], dtype=np.float64)
    mean = float(weights @ [np.linalg.norm(u) for u in updates] / weights.sum())
    assert mean <= allowed < mean * 1.01 + 0.02


def test_a_node_that_masks_another_update_is_seen_in_the_average():
    rng = np.random.default_rng(7)
    np.random.seed(7)  # noqa: NPY002 - as above
    size = 20_000
    sent = rng.normal(0, 0.5, size).astype(np.float32).astype(np.float64)
    updates = [rng.normal(0, 1e-3, size) for _ in range(4)]
    counts = [8, 4, 2, 1]
    allowed, _ = _allowed(_claims(updates, counts), size)
    assert np.linalg.norm(_unmasked_average(sent, updates, counts) - sent) <= allowed
    # 1e-2 added to each scaled weight of one node moves each weight of the average by 1e-2 / 1.5 (the total factor),
    # some 7 times an honest update's 1e-3
    average = _unmasked_average(sent, updates, counts, shift=1e-2)
    assert np.linalg.norm(average - sent) > 4 * allowed


def test_update_bound_cuts_a_claim_to_k_lower_medians_of_the_claims_that_moved():
    claims = [(4, 1.0), (4, 1.2), (4, 0.0), (4, 0.9), (4, 1e6)]  # one node sent back what it got
    allowed, cut = _allowed(claims, 100, bound=3.0)
    assert cut == [(4, 1e6, 3.0)]  # the claims above 0 are 0.9, 1.0, 1.2, 1e6: the lower median is 1.0
    assert allowed == pytest.approx((1.0 + 1.2 + 0.0 + 0.9 + 3.0) / 5, rel=1e-3)
    unbounded, none = _allowed(claims, 100)
    assert none == [] and unbounded > 1e5


@pytest.mark.parametrize("claim", [float("nan"), float("inf"), -1.0])
def test_a_claim_that_is_not_a_length_counts_as_none(claim):
    allowed, _ = _allowed([(4, 1.0), (4, 1.0), (4, claim)], 100)
    assert allowed == pytest.approx(2 / 3, rel=1e-3)
