"""Federated histograms of the numeric features, released only in bins of a minimum count (pure).

Every hospital bins each numeric feature on the same edges, fixed by the task spec before any data
is seen: `histogram_bins` equal bins over [0, HISTOGRAM_SPAN x scale) of the feature's unit, the
first bin also holding values below 0 and the last those above. It sends the fraction of its rows
in each bin beside the other statistics (fibemrss.domain.feature_encoding.local_stats_vector), so
the masked, encrypted weighted average of round 0 yields the global fractions and, times the
round's total weight, the global counts (exact with weighting "examples"; with "noised" weights
each hospital's bins count as its noised size, off by a few patients).

Release (as NVIDIA FLARE's statistics cleanser does): adjacent bins are merged from the low end
until each released bin holds at least `histogram_min_count` patients; a remainder below it joins
the last released bin, and a feature with fewer patients in all is not released at all. So no
released figure counts fewer than the minimum. (Every agent decrypts the raw aggregate, as it does
the means; what leaves the agent, in its status, the demo and the CLI, is the released form.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.feature_extraction import FeatureValue
from fibemrss.domain.task_spec import TaskSpec

HISTOGRAM_SPAN = 2.5  # in units of the feature's scale (its typical magnitude)


@dataclass(frozen=True)
class HistogramBin:
    low: float  # -inf for the first released bin
    high: float  # +inf for the last released bin
    count: int


@dataclass(frozen=True)
class FeatureHistogram:
    feature: str
    bins: tuple[HistogramBin, ...]  # empty: fewer than the minimum count in all
    suppressed: int  # original bins merged into a neighbour or withheld

    def to_json(self) -> dict[str, object]:
        return {
            "feature": self.feature,
            "bins": [{"low": b.low, "high": b.high, "count": b.count} for b in self.bins],
            "suppressed": self.suppressed,
        }


# `numeric` below: the indices of the task's numeric features, in order
# (fibemrss.domain.feature_encoding.numeric_features, which builds the whole statistics vector).


def bin_edges(task: TaskSpec, feature_index: int) -> np.ndarray:
    """The interior edges plus the outer ones, in the feature's own unit."""
    scale = task.features[feature_index].scale
    return np.linspace(0.0, HISTOGRAM_SPAN * scale, task.histogram_bins + 1)


def local_histogram_vector(
    task: TaskSpec, numeric: Sequence[int], rows: Sequence[Sequence[FeatureValue]]
) -> np.ndarray:
    """Per numeric feature, the fraction of ALL rows (missing values included in the total, as in
    the moments) whose value falls in each bin."""
    n = max(len(rows), 1)
    bins = task.histogram_bins
    out = np.zeros(bins * len(numeric))
    for j, i in enumerate(numeric):
        edges = bin_edges(task, i)
        xs = np.array([float(v) for r in rows if isinstance(v := r[i], float | int)], dtype=np.float64)
        if xs.size:
            which = np.clip(np.searchsorted(edges, xs, side="right") - 1, 0, bins - 1)
            out[j * bins : (j + 1) * bins] = np.bincount(which, minlength=bins) / n
    return out


def release(counts: Sequence[int], edges: np.ndarray, min_count: int) -> tuple[tuple[HistogramBin, ...], int]:
    """Merges adjacent bins from the low end until each holds >= min_count; (bins, suppressed)."""
    released: list[HistogramBin] = []
    start, running = 0, 0
    for k, c in enumerate(counts):
        running += c
        if running >= min_count:
            released.append(HistogramBin(float(edges[start]), float(edges[k + 1]), running))
            start, running = k + 1, 0
    if running and released:  # a remainder below the minimum joins the last released bin
        last = released[-1]
        released[-1] = HistogramBin(last.low, float(edges[-1]), last.count + running)
    if released:  # the outer bins also hold the values beyond the edges
        released[0] = HistogramBin(-math.inf, released[0].high, released[0].count)
        released[-1] = HistogramBin(released[-1].low, math.inf, released[-1].count)
    return tuple(released), len(counts) - len(released)


def global_histograms(
    task: TaskSpec, numeric: Sequence[int], average: np.ndarray, total_weight: int
) -> tuple[FeatureHistogram, ...]:
    """The released histograms from the decrypted average histogram fractions (`average` is the
    histogram part of round 0's average) and the round's total weight."""
    bins = task.histogram_bins
    out = []
    for j, i in enumerate(numeric):
        fractions = np.clip(np.asarray(average[j * bins : (j + 1) * bins], dtype=np.float64), 0.0, None)
        counts = [int(round(f * total_weight)) for f in fractions]
        released, suppressed = release(counts, bin_edges(task, i), task.histogram_min_count)
        out.append(FeatureHistogram(task.features[i].name, released, suppressed))
    return tuple(out)
