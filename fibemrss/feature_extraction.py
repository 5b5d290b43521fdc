"""Reads a task's features and label out of a shared-schema PatientRecord (pure)."""

from __future__ import annotations

from fibemrss.records import PatientRecord
from fibemrss.task_spec import FeatureSpec, TaskSpec

FeatureValue = float | str | None  # a number, a category code, or missing


def feature_value(spec: FeatureSpec, record: PatientRecord) -> FeatureValue:
    if spec.source == "age":
        return record.age_years
    if spec.source == "sex":
        return record.sex if record.sex in spec.categories else None
    obs = record.observation(spec.system, spec.code)
    if obs is None:
        return None
    if spec.source == "numeric":
        return obs.value
    if obs.value_code is not None and obs.value_code.code in spec.categories:
        return obs.value_code.code
    return None


def extract(task: TaskSpec, record: PatientRecord) -> tuple[list[FeatureValue], float | None]:
    """The task's feature values in spec order and the binary label (None when unknown)."""
    values = [feature_value(spec, record) for spec in task.features]
    label_obs = record.observation(task.label.system, task.label.code)
    label = None
    if label_obs is not None and label_obs.value is not None:
        label = 1.0 if label_obs.value > task.label.positive_above else 0.0
    return values, label
