"""The FeTS convergence score (FeTS Challenge Task 1) of a federated run: the area under its best-so-far
validation Dice over one simulated week, normalised, with round times drawn from the FeTS example timing
distributions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

T_MAX = 7 * 24 * 3600.0
"""The FeTS convergence score's time budget: one simulated week."""
FETS_TIME_SEED = 0xFEEDFACE
# (mean, sd) in seconds of the FeTS challenge's example timing distributions
TRAIN_PER_CASE, VAL_PER_CASE, DOWNLOAD, UPLOAD = (6.71, 0.87), (23.1, 2.6), (112.4, 14.5), (192.3, 21.5)


def simulated_round_times(
    train_cases: Sequence[int], val_cases: Sequence[int], rounds: int, epochs: float
) -> np.ndarray:
    """Simulated wall time of each round (FeTS Task 1): the slowest collaborator's download,
    validation, training and upload, each drawn per case from a normal distribution (clamped to
    >= 1 s), seeded by the round number. Every collaborator uses the FeTS example distributions."""
    times = []
    for r in range(1, rounds + 1):
        rng = np.random.default_rng([FETS_TIME_SEED, r])
        slowest = 0.0
        for n_train, n_val in zip(train_cases, val_cases, strict=True):
            t_train, t_val, down, up = (
                max(1.0, rng.normal(*d)) for d in (TRAIN_PER_CASE, VAL_PER_CASE, DOWNLOAD, UPLOAD)
            )
            slowest = max(slowest, down + 2 * n_val * t_val + epochs * n_train * t_train + up)
        times.append(slowest)
    return np.asarray(times)


def convergence_score(dice: Sequence[float], round_times: Sequence[float], t_max: float = T_MAX) -> float:
    """FeTS convergence score after the last round: ``[(T_max - t_r) best_r + AUC_r] / T_max``.

    ``dice[r]`` is the validation Dice of the model that round ``r + 1`` starts from (as in FeTS, where
    a round first validates the incoming model), ``best_r`` the best of them so far, ``AUC_r`` the sum of
    ``best_i x roundtime_i``. As in the FeTS experiment loop, the round that crosses ``T_max`` still
    counts and ends the experiment (``t_r`` is then capped at ``T_max``)."""
    best = auc = elapsed = 0.0
    for value, seconds in zip(dice, round_times, strict=True):
        best = max(best, float(value))
        auc += best * float(seconds)
        elapsed += float(seconds)
        if elapsed > t_max:
            break
    return ((t_max - min(elapsed, t_max)) * best + auc) / t_max
