"""The FeTS convergence score and simulated round times (simulations.convergence)."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.convergence import convergence_score, simulated_round_times


def test_convergence_score_by_hand():
    # two rounds of 1 h: best 0.5 then 0.7; T_max = 10 h
    hour = 3600.0
    auc = 0.5 * hour + 0.7 * hour
    expected = ((10 * hour - 2 * hour) * 0.7 + auc) / (10 * hour)
    assert convergence_score([0.5, 0.7], [hour, hour], t_max=10 * hour) == pytest.approx(expected)
    # a worse later round does not lower best-so-far
    assert convergence_score([0.7, 0.2], [hour, hour], t_max=10 * hour) == pytest.approx(
        ((8 * hour) * 0.7 + 1.4 * hour) / (10 * hour)
    )
    # the round that crosses the budget still counts, and ends the experiment
    assert convergence_score([0.5, 0.9, 1.0], [6 * hour, 6 * hour, 6 * hour], t_max=10 * hour) == pytest.approx(
        (0.5 * 6 * hour + 0.9 * 6 * hour) / (10 * hour)
    )


def test_simulated_round_times_follow_the_slowest_site():
    small = simulated_round_times([2], [1], rounds=3, epochs=1.0)
    both = simulated_round_times([2, 200], [1, 20], rounds=3, epochs=1.0)
    assert small.shape == (3,) and np.all(both > small)
    # download + upload alone average about 305 s; 200 cases x 6.7 s add about 1,340 s more
    assert 250 < small.mean() < 600 and both.mean() > 1500
    assert np.array_equal(both, simulated_round_times([2, 200], [1, 20], rounds=3, epochs=1.0))  # seeded
