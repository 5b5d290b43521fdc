"""Federated histograms (fibemrss.domain.histograms): four hospitals' bins summed under pairwise
masks through the real HE codec equal the pooled counts exactly, and a bin with fewer patients
than the task's minimum count is never released on its own."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fibemrss.domain.feature_encoding import (
    global_histograms_from_average,
    local_stats_vector,
    numeric_features,
    stats_vector_length,
)
from fibemrss.domain.histograms import release
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import ChunkAccumulator, UpdateDecryptor, UpdateEncryptor, slot_count
from fibemrss.he.keys import generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.masking import MaskContext, MaskKeyPair, cohort_mask, round_key_seed

TASK = dataclasses.replace(HEART_DISEASE_V1, weighting="examples")
NUMERIC = numeric_features(TASK)
AGE = TASK.features.index(TASK.feature("age"))


def hospital_rows(seed: int, n: int) -> list[tuple[object, ...]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row: list[object] = [None] * len(TASK.features)
        for i in NUMERIC:
            if rng.random() < 0.1:
                continue  # missing: counted in no bin
            scale = TASK.features[i].scale
            row[i] = float(np.round(rng.uniform(-0.2, 2.8) * scale, 1))
        # Ages in [35, 75) only, plus 3 patients aged 110-120 (one bin of 112.5-125 holds 2 of them).
        row[AGE] = float(rng.integers(35, 75))
        rows.append(tuple(row))
    return rows


def masked_round_zero(per_hospital: dict[str, list[tuple[object, ...]]]) -> tuple[np.ndarray, int]:
    """Round 0 as the agents and the aggregator run it: masked, encrypted, summed, decrypted."""
    hospital_key, aggregator_key = generate_keys()
    key, agg = load_hospital_key(hospital_key), load_aggregator_key(aggregator_key)
    context = MaskContext(b"\x09" * 16, TASK.name, 0, 1)
    pairs = {h: MaskKeyPair(round_key_seed(h.encode() * 32, context)) for h in per_hospital}
    public = {h: p.public_key for h, p in pairs.items()}
    n = stats_vector_length(TASK)
    uploads = []
    for h, rows in per_hospital.items():
        mask = cohort_mask(
            pairs[h], h, public, context, slot_count(ChunkKind.WEIGHTED_UPDATE, n), key.params.plain_modulus
        )
        uploads.append(UpdateEncryptor(key).encrypt(local_stats_vector(TASK, rows), len(rows), mask))
    summed = []
    for i in range(len(uploads[0])):
        acc = ChunkAccumulator(agg)
        for u in uploads:
            acc.add(u[i])
        summed.append(acc.result())
    return UpdateDecryptor(key).decrypt_average(summed, n, min_parties=3)


def pooled_count(rows: list[tuple[object, ...]], i: int, low: float | None, high: float | None) -> int:
    return sum(
        1
        for r in rows
        if isinstance(v := r[i], float) and (low is None or v >= low) and (high is None or v < high)
    )


def test_histograms_summed_under_masking_equal_the_pooled_counts_and_hide_small_bins() -> None:
    per_hospital = {
        h: hospital_rows(s, n) for h, s, n in (("a", 1, 120), ("b", 2, 90), ("c", 3, 60), ("d", 4, 40))
    }
    per_hospital["d"] += [
        (*r[:AGE], age, *r[AGE + 1 :])
        for r, age in zip(per_hospital["d"][:3], (110.0, 113.0, 120.0), strict=True)
    ]
    pooled = [r for rows in per_hospital.values() for r in rows]
    average, total_weight = masked_round_zero(per_hospital)
    assert total_weight == len(pooled)
    histograms = {h.feature: h for h in global_histograms_from_average(TASK, average, total_weight)}
    assert set(histograms) == {TASK.features[i].name for i in NUMERIC}
    for i in NUMERIC:
        h = histograms[TASK.features[i].name]
        assert h.bins, h.feature
        present = pooled_count(pooled, i, None, None)
        assert sum(b.count for b in h.bins) == present
        assert h.bins[0].low == -math.inf and h.bins[-1].high == math.inf
        for b in h.bins:
            # Each released bin is exactly the pooled count between its edges (sum exact) ...
            low = None if b.low == -math.inf else b.low
            high = None if b.high == math.inf else b.high
            assert b.count == pooled_count(pooled, i, low, high), (h.feature, b)
            # ... and none holds fewer patients than the minimum.
            assert b.count >= TASK.histogram_min_count, (h.feature, b)
    # The three oldest patients: 110-112.5 (1) and 112.5-125 (2) are bins of the layout with
    # fewer than 10; no released bin starts above 75, so they only appear merged into a bin of more.
    age = histograms["age"]
    assert all(b.low == -math.inf or b.low < 75 for b in age.bins)
    assert age.suppressed > 0
    assert age.bins[-1].count > 3


def test_release_merges_from_the_low_end_and_withholds_a_feature_below_the_minimum() -> None:
    edges = np.arange(6.0)  # five bins
    bins, suppressed = release([3, 8, 20, 1, 2], edges, 10)
    assert [(b.low, b.high, b.count) for b in bins] == [(-math.inf, 2.0, 11), (2.0, math.inf, 23)]
    assert suppressed == 3
    assert release([2, 3, 0, 1, 3], edges, 10) == ((), 5)  # 9 patients in all: nothing released
    bins, _ = release([10, 10, 10, 10, 10], edges, 10)
    assert [b.count for b in bins] == [10] * 5


@pytest.mark.parametrize("min_count", [1, 25])
def test_the_minimum_count_is_the_task_setting(min_count: int) -> None:
    task = dataclasses.replace(TASK, histogram_min_count=min_count)
    rows = hospital_rows(5, 200)
    stats = local_stats_vector(task, rows)
    histograms = global_histograms_from_average(task, stats, len(rows))
    counts = [b.count for h in histograms for b in h.bins]
    assert min(counts) >= min_count
    if min_count == 1:  # every non-empty bin of the layout is its own released bin then
        assert any(c < 10 for c in counts)
