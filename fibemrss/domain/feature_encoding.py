"""Turns feature values into model inputs with federation-wide statistics (pure, numpy only).

Numeric features are standardized with the global mean and standard deviation, and a missing
value becomes the global mean plus a "was missing" indicator; categorical features are one-hot
with all zeros for missing. Every hospital uses the same global statistics, obtained through
the encrypted statistics round, so the same patient encodes identically everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.feature_extraction import FeatureValue
from fibemrss.domain.histograms import FeatureHistogram, global_histograms, local_histogram_vector
from fibemrss.domain.task_spec import TaskSpec


def numeric_features(task: TaskSpec) -> list[int]:
    return [i for i, f in enumerate(task.features) if f.source in ("age", "numeric")]


def stats_vector_length(task: TaskSpec) -> int:
    """Moments (3 per numeric feature), then the histogram bins (fibemrss.domain.histograms)."""
    return (3 + task.histogram_bins) * len(numeric_features(task))


def local_stats_vector(task: TaskSpec, rows: Sequence[Sequence[FeatureValue]]) -> np.ndarray:
    """Per numeric feature: fraction present, mean of x/scale and of (x/scale)^2 over ALL rows.

    Averaging these vectors across hospitals weighted by row count gives the global fractions
    and moments exactly, so one weighted-average HE round yields the global statistics. Scaling
    keeps the values near 1, well inside the fixed-point range of the HE codec.
    """
    n = max(len(rows), 1)
    out = np.zeros(stats_vector_length(task))
    for j, i in enumerate(numeric_features(task)):
        scale = task.features[i].scale
        xs = [float(v) / scale for r in rows if isinstance(v := r[i], float | int)]
        out[3 * j] = len(xs) / n
        out[3 * j + 1] = sum(xs) / n
        out[3 * j + 2] = sum(x * x for x in xs) / n
    out[3 * len(numeric_features(task)) :] = local_histogram_vector(task, numeric_features(task), rows)
    return out


def global_histograms_from_average(
    task: TaskSpec, average: np.ndarray, total_weight: int
) -> tuple[FeatureHistogram, ...]:
    """Round 0's released histograms (bins of at least the task's minimum count)."""
    numeric = numeric_features(task)
    return global_histograms(task, numeric, average[3 * len(numeric) :], total_weight)


@dataclass(frozen=True)
class GlobalStats:
    means: tuple[float, ...]  # in the feature's own unit, one per numeric feature
    stds: tuple[float, ...]
    present_fraction: tuple[float, ...]

    def to_json(self) -> dict[str, list[float]]:
        return {
            "means": list(self.means),
            "stds": list(self.stds),
            "present_fraction": list(self.present_fraction),
        }

    @classmethod
    def from_json(cls, data: dict[str, list[float]]) -> GlobalStats:
        return cls(tuple(data["means"]), tuple(data["stds"]), tuple(data["present_fraction"]))


def global_stats_from_average(task: TaskSpec, average: np.ndarray) -> GlobalStats:
    means, stds, present = [], [], []
    for j, i in enumerate(numeric_features(task)):
        scale = task.features[i].scale
        p, a, b = (float(v) for v in average[3 * j : 3 * j + 3])
        if p <= 1e-9:
            means.append(0.0)
            stds.append(1.0)
        else:
            mean = a / p
            var = max(b / p - mean * mean, 0.0)
            means.append(mean * scale)
            stds.append(max(math.sqrt(var), 1e-6) * scale)
        present.append(max(min(p, 1.0), 0.0))
    return GlobalStats(tuple(means), tuple(stds), tuple(present))


def input_names(task: TaskSpec) -> list[str]:
    names: list[str] = []
    for f in task.features:
        if f.source in ("age", "numeric"):
            names += [f.name, f"{f.name}_missing"]
        else:
            names += [f"{f.name}={c}" for c in f.categories]
    return names


def input_dim(task: TaskSpec) -> int:
    return len(input_names(task))


def encode(task: TaskSpec, stats: GlobalStats, rows: Sequence[Sequence[FeatureValue]]) -> np.ndarray:
    x = np.zeros((len(rows), input_dim(task)), dtype=np.float32)
    numeric_slot = {i: j for j, i in enumerate(numeric_features(task))}
    for r, row in enumerate(rows):
        col = 0
        for i, f in enumerate(task.features):
            value = row[i]
            if i in numeric_slot:
                j = numeric_slot[i]
                if isinstance(value, float | int):
                    x[r, col] = (float(value) - stats.means[j]) / stats.stds[j]
                else:
                    x[r, col + 1] = 1.0  # imputed with the global mean (z = 0)
                col += 2
            else:
                if isinstance(value, str) and value in f.categories:
                    x[r, col + f.categories.index(value)] = 1.0
                col += len(f.categories)
    return x


def imputed_features(task: TaskSpec, row: Sequence[FeatureValue]) -> list[str]:
    return [f.name for f, v in zip(task.features, row, strict=True) if v is None]
