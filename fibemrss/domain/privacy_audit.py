"""The arithmetic of an empirical privacy audit (pure): from how often a distinguishing test says
"in" when the audited examples were in the training data (true positives) and when they were not
(false positives), the smallest epsilon that an (epsilon, delta)-DP mechanism could have, with
Clopper-Pearson confidence (Jagielski et al., "Auditing Differentially Private Machine Learning",
NeurIPS 2020; Nasr et al., "Adversary Instantiation", IEEE S&P 2021).

An (epsilon, delta)-DP mechanism bounds every test: TPR <= e^epsilon FPR + delta and
TNR <= e^epsilon FNR + delta. With k audited rows inserted together (a group of k), group privacy
gives (k epsilon, k e^((k-1) epsilon) delta) for the group, so the same inequalities with those
figures bound the per-example epsilon. The audit's figure is the smallest epsilon >= 0 that
satisfies both at the confidence bounds of the observed rates: a LOWER bound on the true epsilon
(the true one is at least this, at that confidence), never an estimate of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    total = 0.0
    for i in range(k + 1):
        total += math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
    return min(total, 1.0)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound on a binomial proportion at level 1 - alpha: the p
    where P(X >= successes; p) = alpha (0 when there are no successes)."""
    _check_counts(successes, trials, alpha)
    if successes == 0:
        return 0.0
    low, high = 0.0, successes / trials
    for _ in range(60):
        mid = (low + high) / 2
        if 1.0 - _binomial_cdf(successes - 1, trials, mid) > alpha:
            high = mid
        else:
            low = mid
    return low


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound at level 1 - alpha: the p where
    P(X <= successes; p) = alpha (1 when every trial succeeded)."""
    _check_counts(successes, trials, alpha)
    if successes == trials:
        return 1.0
    return 1.0 - clopper_pearson_lower(trials - successes, trials, alpha)


def _check_counts(successes: int, trials: int, alpha: float) -> None:
    if trials <= 0:
        raise ValueError(f"trials must be positive, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be within [0, trials={trials}], got {successes}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be within (0, 1), got {alpha}")


def epsilon_lower_bound_from_rates(tpr: float, fpr: float, delta: float, group_size: int = 1) -> float:
    """The smallest epsilon >= 0 for which a test with these true and false positive rates is
    possible under (epsilon, delta)-DP per example, the audited rows inserted as a group of
    `group_size` (0 when TPR <= FPR + the group's delta: nothing is shown)."""
    for name, value in (("tpr", tpr), ("fpr", fpr), ("delta", delta)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    k = group_size
    pairs = ((tpr, fpr), (1.0 - fpr, 1.0 - tpr))  # (TPR, FPR) and (TNR, FNR)

    def possible(eps: float) -> bool:
        # e^(k eps) <= e^700 keeps the arithmetic finite; beyond it any rate above 0 is possible
        if k * eps > 700:
            return all(hit == 0 or miss > 0 or delta > 0 for hit, miss in pairs)
        return all(
            hit <= math.exp(k * eps) * miss + k * math.exp((k - 1) * eps) * delta for hit, miss in pairs
        )

    if possible(0.0):
        return 0.0
    if k == 1:  # closed form: the larger of log((TPR - delta) / FPR) and log((TNR - delta) / FNR)
        return max(
            math.log((hit - delta) / miss) if miss > 0 else math.inf for hit, miss in pairs if hit > delta
        )
    low, high = 0.0, 1.0
    while not possible(high):
        low, high = high, high * 2
        if high > 1e6:  # only with delta 0 and a rate of 0 beside a positive one: no finite epsilon
            return math.inf
    for _ in range(100):
        mid = (low + high) / 2
        if possible(mid):
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class AuditBound:
    """An audit's outcome at a confidence: the Clopper-Pearson bounds on its rates and the epsilon
    lower bound they imply."""

    true_positives: int
    false_negatives: int
    false_positives: int
    true_negatives: int
    confidence: float
    tpr_lower: float
    fpr_upper: float
    epsilon_lower_bound: float


def epsilon_lower_bound(
    true_positives: int,
    false_negatives: int,
    false_positives: int,
    true_negatives: int,
    delta: float,
    confidence: float = 0.95,
    group_size: int = 1,
) -> AuditBound:
    """The epsilon lower bound at `confidence` from a test's counts over independent trials: a
    one-sided Clopper-Pearson lower bound on the TPR and upper bound on the FPR, each at level
    1 - (1 - confidence) / 2 so that both hold together at `confidence` (union bound); the
    TNR and FNR bounds follow from the same two."""
    alpha = (1.0 - confidence) / 2
    tpr_lower = clopper_pearson_lower(true_positives, true_positives + false_negatives, alpha)
    fpr_upper = clopper_pearson_upper(false_positives, false_positives + true_negatives, alpha)
    bound = epsilon_lower_bound_from_rates(tpr_lower, fpr_upper, delta, group_size)
    return AuditBound(
        true_positives,
        false_negatives,
        false_positives,
        true_negatives,
        confidence,
        tpr_lower,
        fpr_upper,
        bound,
    )


def best_threshold(
    member_scores: Sequence[float],
    non_member_scores: Sequence[float],
    delta: float,
    group_size: int = 1,
    confidence: float = 0.95,
) -> float:
    """The threshold t ("in" when score >= t) whose counts on these trials give the largest
    Clopper-Pearson epsilon bound (so a threshold that only looks good on a handful of trials is
    not preferred); ties: the largest TPR - FPR, then the lowest t. Choose it on trials that are
    not then counted, or the bound is biased upwards."""
    if not member_scores or not non_member_scores:
        raise ValueError("both member and non-member scores are needed to choose a threshold")
    values = sorted(set(member_scores) | set(non_member_scores))
    candidates = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    candidates.append(values[-1] + 1.0)
    m, n = len(member_scores), len(non_member_scores)

    def rank(t: float) -> tuple[float, float, float]:
        tp = sum(s >= t for s in member_scores)
        fp = sum(s >= t for s in non_member_scores)
        bound = epsilon_lower_bound(tp, m - tp, fp, n - fp, delta, confidence, group_size)
        return (bound.epsilon_lower_bound, tp / m - fp / n, -t)

    return max(candidates, key=rank)
