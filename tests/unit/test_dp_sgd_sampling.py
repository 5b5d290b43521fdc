"""DP-SGD samples its batches the way its accountant assumes: every step a Poisson sample (each
row independently with probability q) drawn from the OS's randomness, never from a seed, and the
clipped sum normalised by the EXPECTED batch size q n.

The probe: n rows x_i = e_i (one-hot), label 1, a logistic regression from zeros, no noise and a
clipping norm far below every example's gradient norm. Each sampled row's clipped gradient is
then exactly -C (e_i, 1) / sqrt(2), so after training weight i is u x (the number of steps that
sampled row i), with u = lr C / (sqrt(2) q n), and the bias is u x (the sum of the batch sizes).
The trained vector therefore shows which rows each step took, without looking inside training.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fibemrss.domain.privacy_accounting import steps_per_round
from fibemrss.domain.task_spec import DpSpec, HyperParameters
from fibemrss.domain.tasks import HEART_DISEASE_V1_DP
from fibemrss.domain.torch_models import initial_vector
from services.hospital_agent.core.training import poisson_sample, train_local, train_local_dp

N = 400
CLIP = 0.01  # every example's gradient norm stays above 0.3 here: clipping always binds
UNIT = 1e-3  # u, the weight change per inclusion


def _probe(rate: float, steps: int, round_number: int = 7) -> tuple[np.ndarray, int]:
    """(inclusions per row, total sampled rows over the steps) of one train_local_dp call."""
    x = np.eye(N, dtype=np.float32)
    y = np.ones(N, dtype=np.float32)
    lr = UNIT * math.sqrt(2) * rate * N / CLIP
    dp = DpSpec(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=CLIP, sample_rate=rate)
    out = train_local_dp(
        "logistic_regression",
        np.zeros(N + 1),
        x,
        y,
        HyperParameters(learning_rate=lr),
        dp,
        0.0,
        steps,
        round_number,
    )
    weights, bias = out[:N] / UNIT, out[N] / UNIT
    counts = np.rint(weights)
    # Every weight is a whole number of inclusions (normalised by q n, never by the batch's size).
    assert np.allclose(weights, counts, atol=1e-3)
    assert bias == pytest.approx(counts.sum(), abs=1e-2)
    return counts.astype(int), int(round(bias))


def test_the_inclusion_rate_over_a_round_is_the_accountants_sample_rate() -> None:
    task, dp = HEART_DISEASE_V1_DP, HEART_DISEASE_V1_DP.dp
    assert dp is not None
    steps = steps_per_round(task, dp)  # what the agent passes, and what the accountant composes
    counts, total = _probe(dp.sample_rate, steps)
    trials = N * steps
    rate = total / trials
    assert abs(rate - dp.sample_rate) < 5 * math.sqrt(dp.sample_rate * (1 - dp.sample_rate) / trials)
    # A round is local_epochs passes in expectation, as the accountant's steps = epochs / q says.
    assert counts.mean() == pytest.approx(task.hyper.local_epochs, abs=0.15)
    # Each row's count is Binomial(steps, q) (independent draws), not the exactly-once of a
    # shuffled epoch: its variance is steps q (1 - q), about 0.95 here.
    expected_var = steps * dp.sample_rate * (1 - dp.sample_rate)
    assert counts.var() == pytest.approx(expected_var, abs=0.3)
    assert (counts == 0).any() and (counts >= 2).any()


def test_batches_vary_in_size_are_never_replayed_from_the_round_and_are_normalised_by_q_n() -> None:
    rate = 0.05
    batches = []
    for _ in range(30):
        counts, total = _probe(rate, steps=1, round_number=3)  # the same round every time
        assert set(np.unique(counts)) <= {0, 1} and counts.sum() == total
        batches.append(counts)
    sizes = [int(b.sum()) for b in batches]
    # The same round number gives a different batch each time (equal by chance: < 2^-400 x 30^2).
    assert len({tuple(np.flatnonzero(b)) for b in batches}) == len(batches)
    # The batch size is Binomial(n, q): it varies (mean q n = 20, sd 4.4), and every included
    # row moved by the same u whatever its batch's size (checked in _probe: normalised by q n).
    assert len(set(sizes)) > 1
    assert abs(np.mean(sizes) - rate * N) < 5 * math.sqrt(N * rate * (1 - rate) / len(sizes))


def test_poisson_sample_draws_each_row_independently_at_the_rate() -> None:
    n = 200_000
    for rate in (0.01, 0.05, 0.5):
        mask = poisson_sample(n, rate).numpy()
        assert mask.dtype == np.bool_ and mask.shape == (n,)
        assert abs(mask.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    assert poisson_sample(1000, 1.0).numpy().all()
    assert not poisson_sample(1000, 0.0).numpy().any()
    assert not np.array_equal(poisson_sample(1000, 0.5).numpy(), poisson_sample(1000, 0.5).numpy())


def test_training_without_dp_stays_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.float32)
    start = initial_vector("logistic_regression", 5)
    hyper = HyperParameters(learning_rate=0.1, local_epochs=2)
    a = train_local("logistic_regression", start, x, y, hyper, seed=4)
    b = train_local("logistic_regression", start, x, y, hyper, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, train_local("logistic_regression", start, x, y, hyper, seed=5))
