"""The plain-Python check of small KServe batches (`EncodedLimits._small_rows_pass`) accepts
exactly what the vectorized check accepts: every rule of docs/inference.md "Input limits",
attacked one element at a time and with random rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.tools.bench.inference_bench import sample_encoded_rows, sample_model_version
from services.inference.core.input_limits import SMALL_BATCH_ELEMENTS, EncodedLimits, element_fields

TASK = HEART_DISEASE_V1
STATS = sample_model_version(TASK).model.stats
LIMITS = EncodedLimits.build(TASK, STATS)
# The same limits with no per-column table: `problems` then takes the numpy path only.
VECTORIZED = dataclasses.replace(LIMITS, columns=())
FIELDS = element_fields(True)


def _agree(x: np.ndarray) -> list[object]:
    fast, slow = LIMITS.problems(x, FIELDS), VECTORIZED.problems(x, FIELDS)
    assert fast == slow
    return fast


def _valid() -> np.ndarray:
    x = sample_encoded_rows(TASK, STATS, 3, seed=7)
    assert x.size <= SMALL_BATCH_ELEMENTS
    assert _agree(x) == []
    return x


@pytest.mark.parametrize(
    "value", [np.nan, np.inf, -np.inf, 2.0, -1.0, 0.5, 1e30, -1e30, np.finfo(np.float32).max, -0.0, 1.0, 0.0]
)
def test_each_column_refuses_what_the_vectorized_check_refuses(value: float) -> None:
    for col in range(LIMITS.binary.size):
        x = _valid()
        x[1, col] = value
        _agree(x)


def test_a_value_beside_its_missing_indicator_and_two_one_hot_columns_are_refused() -> None:
    x = _valid()
    value_col, missing_col = LIMITS.pairs[0]
    x[0, missing_col], x[0, value_col] = 1.0, 0.25
    assert _agree(x)
    x = _valid()
    start, end = LIMITS.groups[0]
    x[2, start:end] = 0.0
    x[2, start], x[2, start + 1] = 1.0, 1.0
    assert _agree(x)


def test_random_rows_are_judged_alike() -> None:
    rng = np.random.default_rng(3)
    refused = 0
    for _ in range(300):
        x = _valid()
        for _ in range(int(rng.integers(0, 3))):
            x[rng.integers(0, x.shape[0]), rng.integers(0, x.shape[1])] = rng.choice(
                [rng.normal(0, 3), 0.0, 1.0, np.nan, rng.normal(0, 1e6)]
            )
        refused += bool(_agree(x))
    assert 0 < refused < 300  # both verdicts were exercised
