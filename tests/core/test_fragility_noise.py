"""The noise floor of retraining: the reliability estimate, the attenuation bound and the
lack-of-fit test behind "within noise", against simulations where the truth and the noise are
known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.fragility import noise_bound
from core.validation import agreement


def _measured(truth: np.ndarray, noise_sd: float, seeds: int, rng) -> np.ndarray:
    return truth[None, :] + rng.normal(0.0, noise_sd, size=(seeds, truth.size))


def test_reliability_and_ceiling_match_the_known_noise():
    """With signal variance 1 and per-seed noise variance 1.5, the mean of 3 seeds has noise
    variance 0.5: reliability 1 / 1.5 = 0.667 and ceiling sqrt of it. Over many draws the
    estimate is unbiased enough, and perfect scores' correlation sits at the ceiling."""
    rng = np.random.default_rng(0)
    reliabilities, correlations = [], []
    for _ in range(300):
        truth = rng.normal(size=40)
        measured = _measured(truth, math.sqrt(1.5), 3, rng)
        bound = noise_bound(truth, measured)
        reliabilities.append(bound.reliability)
        correlations.append(agreement(truth, measured.mean(0)).pearson)
    assert np.mean(reliabilities) == pytest.approx(1 / 1.5, abs=0.03)
    assert np.mean(correlations) == pytest.approx(math.sqrt(1 / 1.5), abs=0.03)


def test_perfect_scores_are_within_noise_and_unrelated_scores_are_not():
    rng = np.random.default_rng(1)
    within_perfect, within_random = [], []
    for _ in range(200):
        truth = rng.normal(size=40)
        measured = _measured(truth, 0.7, 2, rng)
        perfect = noise_bound(2.0 * truth + 1.0, measured)  # right up to scale and offset
        within_perfect.append(perfect.within_noise)
        within_random.append(noise_bound(rng.normal(size=40), measured).within_noise)
        pearson = agreement(truth, measured.mean(0)).pearson
        assert perfect.within_noise == (pearson >= perfect.pearson_floor)  # the floor is the test
    # A 5% test: perfect scores are judged within noise 95% of the time (binomial sd 1.5%).
    assert 0.91 <= np.mean(within_perfect) <= 0.99
    assert np.mean(within_random) == 0.0
    # Scores with the wrong sign are never within noise, however linear.
    truth = rng.normal(size=40)
    assert not noise_bound(-truth, _measured(truth, 0.7, 2, rng)).within_noise


def test_noiseless_ground_truth_has_reliability_one():
    truth = np.linspace(-1.0, 2.0, 30) ** 3
    bound = noise_bound(truth, np.stack([truth, truth]))
    assert bound.reliability == 1.0 and bound.pearson_ceiling == 1.0
    assert bound.pearson_floor == 1.0 and bound.within_noise and bound.lack_of_fit_p == 1.0
    # Monotone but not linear: Pearson < 1 is not within noise when there is no noise.
    assert not noise_bound(np.cbrt(truth), np.stack([truth, truth])).within_noise


def test_pure_noise_has_a_low_ceiling_and_a_low_floor():
    rng = np.random.default_rng(2)
    ceilings, floors = [], []
    for _ in range(100):
        measured = rng.normal(size=(3, 40))  # no signal shared between seeds
        bound = noise_bound(rng.normal(size=40), measured)
        ceilings.append(bound.pearson_ceiling)
        floors.append(bound.pearson_floor)
    # Reliability is clipped at 0, so its mean is a little above 0.
    assert np.mean(ceilings) < 0.35 and np.mean(floors) < 0.1


def test_one_seed_gives_only_its_own_correlation():
    rng = np.random.default_rng(3)
    predicted = rng.normal(size=20)
    measured = (predicted + 0.3 * rng.normal(size=20))[None]
    bound = noise_bound(predicted, measured)
    assert math.isnan(bound.reliability) and not bound.within_noise
    assert bound.seed_pearson_range[0] == pytest.approx(agreement(predicted, measured[0]).pearson)
