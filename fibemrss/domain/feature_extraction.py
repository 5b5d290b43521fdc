"""Reads a task's features and label out of a shared-schema patient (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fibemrss.domain.records import PatientRecord
from fibemrss.domain.task_spec import TaskSpec

FeatureValue = float | str | None  # a number, a category code, or missing
# What one observation says: its quantity and its coded answer (either may be missing).
ObservedValue = tuple[float | None, str | None]


def values_from(
    task: TaskSpec, age: float | None, sex: str | None, observed: Mapping[tuple[str, str], ObservedValue]
) -> list[FeatureValue]:
    """The task's feature values in spec order, from demographics and the first observation of
    each code. Both a PatientRecord and a protobuf patient (fibemrss.serde.records) come here, so
    the two paths cannot disagree on what a feature is."""
    out: list[FeatureValue] = []
    for spec in task.features:
        if spec.source == "age":
            out.append(age)
        elif spec.source == "sex":
            out.append(sex if sex in spec.categories else None)
        else:
            seen = observed.get((spec.system, spec.code))
            if seen is None:
                out.append(None)
            elif spec.source == "numeric":
                out.append(seen[0])
            else:
                out.append(seen[1] if seen[1] in spec.categories else None)
    return out


def observed_values(record: PatientRecord) -> dict[tuple[str, str], ObservedValue]:
    """The first observation of each code, as PatientRecord.observation() would find it."""
    observed: dict[tuple[str, str], ObservedValue] = {}
    for obs in record.observations:
        key = (obs.code.system, obs.code.code)
        if key not in observed:
            observed[key] = (obs.value, obs.value_code.code if obs.value_code is not None else None)
    return observed


def label_from(task: TaskSpec, observed: Mapping[tuple[str, str], ObservedValue]) -> float | None:
    seen = observed.get((task.label.system, task.label.code))
    if seen is None or seen[0] is None:
        return None
    return 1.0 if seen[0] > task.label.positive_above else 0.0


def extract(task: TaskSpec, record: PatientRecord) -> tuple[list[FeatureValue], float | None]:
    """The task's feature values in spec order and the binary label (None when unknown)."""
    observed = observed_values(record)
    return values_from(task, record.age_years, record.sex, observed), label_from(task, observed)


@dataclass(frozen=True)
class TrainingExample:
    """One patient's features for a task, under the pseudonymous key; label None when unknown."""

    patient_key: str
    values: tuple[FeatureValue, ...]
    label: float | None


def training_example(task: TaskSpec, patient_key: str, record: PatientRecord) -> TrainingExample:
    values, label = extract(task, record)
    return TrainingExample(patient_key, tuple(values), label)
