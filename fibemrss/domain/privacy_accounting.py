"""The privacy spend of DP-SGD in local training (pure): an RDP accountant for the Poisson-
subsampled Gaussian mechanism, from Google's dp-accounting library.

One round of local training is local_epochs / sample_rate steps (rounded up), each a Poisson
sample of rate q followed by the Gaussian mechanism with noise multiplier sigma. After r rounds
the spend is the RDP composition of r x steps such steps, converted to (epsilon, delta). Only
the spec's fields and the round count enter, so every hospital of a task spends the same and the
figure reveals no dataset size.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
from dp_accounting import rdp

from fibemrss.domain.task_spec import DpSpec, TaskSpec

# Integer and fractional orders, the grid Opacus uses (its RDPAccountant DEFAULT_ALPHAS), so the
# two accountants agree (tests/unit/test_privacy_accounting.py).
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])


def steps_per_round(task: TaskSpec, dp: DpSpec) -> int:
    return max(1, math.ceil(task.hyper.local_epochs / dp.sample_rate))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """(epsilon at delta) after `steps` Poisson-sampled Gaussian steps."""
    if steps <= 0:
        return 0.0
    accountant = rdp.RdpAccountant(orders=list(ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_multiplier(task: TaskSpec, dp: DpSpec) -> float:
    """The spec's noise multiplier, or the smallest (to 0.1%) that keeps the whole task's rounds
    within (target_epsilon, target_delta)."""
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    if dp.target_epsilon is None:
        raise ValueError("a DP spec needs a noise_multiplier or a target_epsilon")
    steps = task.rounds * steps_per_round(task, dp)
    low, high = 0.3, 1.0
    while epsilon(high, dp.sample_rate, steps, dp.target_delta) > dp.target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError("no noise multiplier reaches the target epsilon")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if epsilon(mid, dp.sample_rate, steps, dp.target_delta) > dp.target_epsilon:
            low = mid
        else:
            high = mid
    return high


def epsilon_after_rounds(task: TaskSpec, dp: DpSpec, rounds: int) -> float:
    """What a hospital has spent on this task's data after training `rounds` rounds of it."""
    return epsilon(
        noise_multiplier(task, dp), dp.sample_rate, rounds * steps_per_round(task, dp), dp.target_delta
    )
