"""Federated statistics and feature encoding: missing stays missing, every hospital encodes alike."""

from __future__ import annotations

import numpy as np

from fibemrss.domain.feature_encoding import (
    encode,
    global_stats_from_average,
    input_dim,
    input_names,
    local_stats_vector,
    numeric_features,
)
from fibemrss.domain.feature_extraction import extract
from fibemrss.domain.records import UCI_HEART, Code, Observation, PatientRecord, Provenance
from fibemrss.domain.tasks import HEART_DISEASE_V1 as TASK
from services.hospital_agent.core.local_data import Example, LocalData, is_test


def row(age: float | None, chol: float | None) -> list:
    values: list = [None] * len(TASK.features)
    values[0] = age
    values[[f.name for f in TASK.features].index("cholesterol")] = chol
    return values


def test_weighted_average_of_local_stats_gives_the_pooled_mean_and_std() -> None:
    hospital_a = [row(40.0, 200.0), row(60.0, None)]
    hospital_b = [row(50.0, 260.0), row(70.0, 300.0), row(None, 240.0)]
    average = (local_stats_vector(TASK, hospital_a) * 2 + local_stats_vector(TASK, hospital_b) * 3) / 5
    stats = global_stats_from_average(TASK, average)
    ages = [40, 60, 50, 70]
    chols = [200, 260, 300, 240]
    chol_slot = numeric_features(TASK).index([f.name for f in TASK.features].index("cholesterol"))
    assert np.isclose(stats.means[0], np.mean(ages)) and np.isclose(stats.stds[0], np.std(ages))
    assert np.isclose(stats.means[chol_slot], np.mean(chols)) and np.isclose(
        stats.stds[chol_slot], np.std(chols)
    )
    assert np.isclose(stats.present_fraction[chol_slot], 4 / 5)


def test_a_missing_value_is_imputed_with_the_mean_and_flagged_never_encoded_as_zero_cholesterol() -> None:
    stats = global_stats_from_average(TASK, local_stats_vector(TASK, [row(50.0, 200.0), row(60.0, 300.0)]))
    x = encode(TASK, stats, [row(55.0, None), row(55.0, 0.0)])
    names = input_names(TASK)
    assert x.shape == (2, input_dim(TASK))
    assert x[0, names.index("cholesterol")] == 0.0 and x[0, names.index("cholesterol_missing")] == 1.0
    # A real 0 would be far below the mean; it is not the same as missing.
    assert x[1, names.index("cholesterol")] < -3 and x[1, names.index("cholesterol_missing")] == 0.0


def test_extract_reads_codes_and_the_binary_label() -> None:
    record = PatientRecord(
        "p1",
        Provenance("s", "p1", "h"),
        sex="female",
        age_years=61.0,
        observations=(
            Observation(Code(UCI_HEART, "cp"), value_code=Code(UCI_HEART, "asymptomatic")),
            Observation(Code(UCI_HEART, "num"), value=2.0),
        ),
    )
    values, label = extract(TASK, record)
    assert values[0] == 61.0 and values[1] == "female" and values[2] == "asymptomatic"
    assert label == 1.0
    assert values[3] is None  # no blood pressure recorded: missing, not 0


def test_the_test_split_is_fixed_by_the_key_and_holds_about_the_asked_fraction() -> None:
    keys = [f"pk_{i}" for i in range(2000)]
    held_out = [k for k in keys if is_test(TASK, k)]
    assert 0.15 < len(held_out) / len(keys) < 0.25
    data = LocalData.split(TASK, [Example(k, tuple(row(50.0, 200.0)), 0.0) for k in reversed(keys)])
    assert {e.patient_key for e in data.test} == set(held_out)


def test_features_read_from_the_proto_equal_those_of_the_converted_record() -> None:
    from fibemrss.api.emr.v1 import emr_pb2
    from fibemrss.serde.records import feature_values_from_proto, record_from_proto, record_to_proto

    variants = [
        PatientRecord("p", Provenance("s", "p", "h")),
        PatientRecord(
            "p",
            Provenance("s", "p", "h"),
            sex="other",
            age_years=44.0,
            observations=(
                Observation(Code(UCI_HEART, "cp"), value_code=Code(UCI_HEART, "not-a-category")),
                Observation(Code(UCI_HEART, "thalach"), value=0.0, unit="/min"),
                Observation(Code(UCI_HEART, "thalach"), value=150.0, unit="/min"),  # the first one counts
                Observation(Code(UCI_HEART, "oldpeak")),  # made, but no value: missing
            ),
        ),
    ]
    for record in variants:
        msg = emr_pb2.PatientRecord.FromString(record_to_proto(record).SerializeToString())
        assert feature_values_from_proto(TASK, msg) == extract(TASK, record_from_proto(msg))[0]
