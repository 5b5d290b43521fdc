"""Patient-level DP: our accountant's epsilon equals Opacus' for the same parameters, the noise
multiplier derived from a target reaches it, and DP-SGD bounds each example's influence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fibemrss.domain.privacy_accounting import (
    epsilon,
    epsilon_after_rounds,
    noise_multiplier,
    steps_per_round,
)
from fibemrss.domain.task_spec import DpSpec, HyperParameters
from fibemrss.domain.tasks import HEART_DISEASE_V1, HEART_DISEASE_V1_DP
from fibemrss.domain.torch_models import initial_vector
from services.hospital_agent.core.training import train_local_dp


@pytest.mark.parametrize(
    ("sigma", "rate", "steps", "delta"),
    [(1.1, 0.02, 1000, 1e-5), (2.68, 0.05, 300, 1e-3), (1.5, 0.05, 300, 1e-5), (5.0, 0.01, 20, 1e-3)],
)
def test_epsilon_equals_opacus_rdp_accountant(sigma: float, rate: float, steps: int, delta: float) -> None:
    reference = RDPAccountant()
    reference.history = [(sigma, rate, steps)]
    # Same orders and conversion: equal to 1e-4 (at epsilon >> 5 the optimum sits at the grid's edge,
    # where the two libraries treat non-converging fractional orders differently, < 1%).
    assert epsilon(sigma, rate, steps, delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-4)


def test_the_derived_noise_multiplier_spends_the_target_over_the_tasks_rounds() -> None:
    task, dp = HEART_DISEASE_V1_DP, HEART_DISEASE_V1_DP.dp
    assert dp is not None
    sigma = noise_multiplier(task, dp)
    steps = task.rounds * steps_per_round(task, dp)
    assert steps == 15 * 20
    assert epsilon(sigma, dp.sample_rate, steps, dp.target_delta) <= dp.target_epsilon
    assert epsilon(sigma * 0.99, dp.sample_rate, steps, dp.target_delta) > dp.target_epsilon
    spends = [epsilon_after_rounds(task, dp, r) for r in range(1, 16)]
    assert spends == sorted(spends) and spends[-1] == pytest.approx(1.0, abs=2e-3)
    fixed = dataclasses.replace(dp, noise_multiplier=1.5, target_epsilon=None)
    assert noise_multiplier(task, fixed) == 1.5


def test_dp_sgd_clips_each_example_so_one_outlier_moves_the_model_by_at_most_the_clip() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    start = initial_vector("logistic_regression", 6)
    hyper = HyperParameters(learning_rate=1.0)
    dp = DpSpec(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0)
    base = train_local_dp("logistic_regression", start, x, y, hyper, dp, 0.0, 1)
    x_out = x.copy()
    x_out[0] = 1e4  # one patient with absurd values
    moved = train_local_dp("logistic_regression", start, x_out, y, hyper, dp, 0.0, 1)
    # One step with every example sampled: the sum of clipped gradients changes by <= 2C, over
    # the expected batch of 50, times the learning rate.
    assert 0 < np.linalg.norm(moved - base) <= 2 * 0.5 / 50 + 1e-6
    # With noise, two runs differ (the noise is not replayable from the seed).
    noisy = dataclasses.replace(dp, noise_multiplier=1.0)
    a = train_local_dp("logistic_regression", start, x, y, hyper, noisy, 1.0, 1)
    b = train_local_dp("logistic_regression", start, x, y, hyper, noisy, 1.0, 1)
    assert not np.allclose(a, b)
    assert HEART_DISEASE_V1.dp is None  # DP is off by default
