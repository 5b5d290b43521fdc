"""The report's ROC, AUC and calibration against brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fibemrss.tools.report.metrics import auc, bootstrap_auc_interval, calibration, roc_curve


def brute_auc(y: list[int], p: list[float]) -> float:
    pairs = [(a, b) for a, b in itertools.product(range(len(y)), repeat=2) if y[a] == 1 and y[b] == 0]
    return sum(1.0 if p[a] > p[b] else 0.5 if p[a] == p[b] else 0.0 for a, b in pairs) / len(pairs)


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])),
        min_size=2,
        max_size=40,
    ).filter(lambda rows: len({y for y, _ in rows}) == 2)
)
def test_auc_is_the_probability_a_positive_outranks_a_negative(rows: list[tuple[int, float]]) -> None:
    y = [r[0] for r in rows]
    p = [r[1] for r in rows]
    assert auc(np.array(y), np.array(p)) == pytest.approx(brute_auc(y, p))
    fpr, tpr = roc_curve(np.array(y), np.array(p))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auc(y, p))


def test_auc_needs_both_classes_and_the_interval_brackets_the_estimate() -> None:
    assert auc(np.array([1, 1]), np.array([0.2, 0.3])) != auc(np.array([1, 1]), np.array([0.2, 0.3]))
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    low, high = bootstrap_auc_interval(y, p, resamples=300)
    assert low < auc(y, p) < high and high - low < 0.2


def test_calibration_bins_report_rates_and_a_perfectly_calibrated_score_has_small_error() -> None:
    rng = np.random.default_rng(2)
    p = rng.random(20_000)
    y = (rng.random(20_000) < p).astype(float)
    cal = calibration(y, p, bins=10)
    assert cal.counts.sum() == 20_000 and len(cal.bin_edges) == 11
    assert cal.expected_calibration_error < 0.02
    overconfident = calibration(y, np.where(p > 0.5, 1.0, 0.0), bins=10)
    assert overconfident.expected_calibration_error > 0.2
