"""Classifier metrics for the report (pure numpy): ROC, AUC with a bootstrap interval, calibration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every distinct score, from (0,0) to (1,1)."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    # The last index of each run of equal scores: ties move together.
    distinct = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives]


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (the Mann-Whitney statistic). NaN without both classes."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    i = 0
    while i < len(p):  # average ranks over ties
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auc_interval(
    y: np.ndarray, p: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the AUC over resamples of the test patients (with replacement)."""
    rng = np.random.default_rng(seed)
    y, p = np.asarray(y), np.asarray(p)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), size=len(y))
        value = auc(y[idx], p[idx])
        if value == value:
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


@dataclass(frozen=True)
class Calibration:
    bin_edges: np.ndarray  # bins + 1 edges over [0, 1]
    mean_predicted: np.ndarray  # per bin; NaN for an empty bin
    observed_rate: np.ndarray
    counts: np.ndarray

    @property
    def expected_calibration_error(self) -> float:
        filled = self.counts > 0
        weights = self.counts[filled] / self.counts.sum()
        gaps = np.abs(self.mean_predicted[filled] - self.observed_rate[filled])
        return float((weights * gaps).sum())


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> Calibration:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=bins) / counts
        rate = np.bincount(which, weights=y, minlength=bins) / counts
    return Calibration(edges, mean_p, rate, counts)
