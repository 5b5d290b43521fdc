"""The privacy audit's arithmetic (fibemrss.domain.privacy_audit): the epsilon lower bound from
known rates, Clopper-Pearson bounds equal to scipy's beta quantiles, and the bound's monotonicity.
The audit itself (training, canaries) is a benchmark: `fibemrss bench privacy --audit-only`."""

from __future__ import annotations

import math

import pytest
from scipy.stats import beta

from fibemrss.domain.privacy_audit import (
    best_threshold,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lower_bound,
    epsilon_lower_bound_from_rates,
)


def test_the_bound_from_known_rates() -> None:
    # TPR <= e^eps FPR + delta: 0.5 against 0.05 needs eps >= ln 10 (the TNR side needs less).
    assert epsilon_lower_bound_from_rates(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    assert epsilon_lower_bound_from_rates(0.5, 0.05, 1e-3) == pytest.approx(math.log(0.499 / 0.05))
    # A positive TPR at FPR 0 beyond delta: no epsilon allows it.
    assert epsilon_lower_bound_from_rates(0.9, 0.0, 0.0) == math.inf
    assert epsilon_lower_bound_from_rates(0.9, 0.0, 0.01) == math.inf
    # The TNR / FNR side decides when the test is surer of its "out"s: TNR 0.5 against FNR 0.05.
    assert epsilon_lower_bound_from_rates(0.95, 0.5, 0.0) == pytest.approx(math.log(0.5 / 0.05))
    assert epsilon_lower_bound_from_rates(0.95, 0.5, 0.01) == pytest.approx(math.log(0.49 / 0.05))


def test_no_better_than_chance_shows_nothing() -> None:
    for tpr, fpr in ((0.3, 0.3), (0.2, 0.6), (0.0, 0.0), (1.0, 1.0), (0.5, 0.49999)):
        assert epsilon_lower_bound_from_rates(tpr, fpr, 1e-3) == 0.0
    # Within delta of chance is no evidence either.
    assert epsilon_lower_bound_from_rates(0.3005, 0.3, 1e-3) == 0.0


def test_the_bound_grows_with_tpr_and_falls_with_fpr_and_delta() -> None:
    by_tpr = [epsilon_lower_bound_from_rates(t, 0.05, 1e-3) for t in (0.06, 0.1, 0.3, 0.6, 0.9)]
    assert by_tpr == sorted(by_tpr) and by_tpr[0] > 0
    by_fpr = [epsilon_lower_bound_from_rates(0.6, f, 1e-3) for f in (0.01, 0.05, 0.2, 0.5)]
    assert by_fpr == sorted(by_fpr, reverse=True)
    by_delta = [epsilon_lower_bound_from_rates(0.6, 0.05, d) for d in (0.0, 1e-3, 0.1)]
    assert by_delta == sorted(by_delta, reverse=True)


def test_a_group_of_k_canaries_bounds_the_per_example_epsilon_by_group_privacy() -> None:
    # With delta 0 group privacy is exactly k eps: the per-example bound is the group's over k.
    group = epsilon_lower_bound_from_rates(0.5, 0.05, 0.0)
    assert epsilon_lower_bound_from_rates(0.5, 0.05, 0.0, group_size=4) == pytest.approx(group / 4, rel=1e-9)
    # With delta > 0 the group's delta k e^((k-1) eps) delta grows, so the bound is below group / k.
    one = epsilon_lower_bound_from_rates(0.5, 0.05, 1e-2)
    four = epsilon_lower_bound_from_rates(0.5, 0.05, 1e-2, group_size=4)
    assert 0 < four < one / 4
    # ... and it is the smallest epsilon for which both inequalities hold.
    k, eps = 4, four
    assert 0.5 == pytest.approx(math.exp(k * eps) * 0.05 + k * math.exp((k - 1) * eps) * 1e-2, rel=1e-6)
    assert epsilon_lower_bound_from_rates(0.3, 0.3, 1e-2, group_size=4) == 0.0


@pytest.mark.parametrize(
    ("successes", "trials"), [(0, 10), (3, 10), (10, 10), (17, 50), (480, 500), (1, 1000)]
)
def test_clopper_pearson_equals_the_beta_quantiles(successes: int, trials: int) -> None:
    alpha = 0.025
    lower = beta.ppf(alpha, successes, trials - successes + 1) if successes > 0 else 0.0
    upper = beta.ppf(1 - alpha, successes + 1, trials - successes) if successes < trials else 1.0
    assert clopper_pearson_lower(successes, trials, alpha) == pytest.approx(lower, abs=1e-9)
    assert clopper_pearson_upper(successes, trials, alpha) == pytest.approx(upper, abs=1e-9)


def test_the_confident_bound_is_below_the_rates_bound_and_tightens_with_trials() -> None:
    # 90% TPR at 5% FPR seen over n trials each way.
    rates = epsilon_lower_bound_from_rates(0.9, 0.05, 1e-3)
    bounds = [
        epsilon_lower_bound(9 * n, n, n // 2, 19 * n // 2, 1e-3).epsilon_lower_bound for n in (2, 10, 100)
    ]
    assert bounds == sorted(bounds) and bounds[-1] < rates
    assert rates - bounds[-1] < 0.5
    # Higher confidence, lower bound.
    at_95 = epsilon_lower_bound(90, 10, 5, 95, 1e-3, confidence=0.95)
    at_99 = epsilon_lower_bound(90, 10, 5, 95, 1e-3, confidence=0.99)
    assert at_99.epsilon_lower_bound < at_95.epsilon_lower_bound
    assert at_95.tpr_lower < 0.9 and at_95.fpr_upper > 0.05
    # Perfect separation over 25 trials each way is worth at most about 1.84 at 95%.
    perfect = epsilon_lower_bound(25, 0, 0, 25, 1e-3)
    assert perfect.epsilon_lower_bound == pytest.approx(
        math.log((0.025 ** (1 / 25) - 1e-3) / (1 - 0.025 ** (1 / 25)))
    )
    # Chance over many trials: nothing.
    assert epsilon_lower_bound(50, 50, 50, 50, 1e-3).epsilon_lower_bound == 0.0


def test_bad_counts_are_refused_with_their_name() -> None:
    with pytest.raises(ValueError, match="trials must be positive"):
        epsilon_lower_bound(0, 0, 1, 1, 1e-3)
    with pytest.raises(ValueError, match="tpr must be within"):
        epsilon_lower_bound_from_rates(1.5, 0.1, 1e-3)
    with pytest.raises(ValueError, match="group_size"):
        epsilon_lower_bound_from_rates(0.5, 0.1, 1e-3, group_size=0)


def test_the_threshold_is_the_one_with_the_best_confident_bound_on_the_calibration_trials() -> None:
    members = [float(v) for v in range(10, 30)]  # 20 members, 10..29
    others = [float(v) for v in range(0, 20)] + [35.0]  # 21 others, 0..19 and one outlier above all
    t = best_threshold(members, others, 1e-3)
    tp = sum(s >= t for s in members)
    fp = sum(s >= t for s in others)
    # Every (TP, FP) a threshold can give on these scores, and the best confident bound among them.
    achievable = {
        (sum(s >= c for s in members), sum(s >= c for s in others)) for c in (*members, *others, 99.0)
    }
    best = max(epsilon_lower_bound(a, 20 - a, b, 21 - b, 1e-3).epsilon_lower_bound for a, b in achievable)
    assert epsilon_lower_bound(tp, 20 - tp, fp, 21 - fp, 1e-3).epsilon_lower_bound == best > 0
    # Nothing to separate: the threshold still exists and the bound it gives is 0.
    flat = best_threshold([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 1e-3)
    tp = sum(s >= flat for s in [1.0, 2.0, 3.0])
    assert epsilon_lower_bound(tp, 3 - tp, tp, 3 - tp, 1e-3).epsilon_lower_bound == 0.0
