"""Reads a task's features and label out of a shared-schema patient (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from fibemrss.domain.records import PatientRecord
from fibemrss.domain.task_spec import TaskSpec

FeatureValue = float | str | None  # a number, a category code, or missing
# What one observation says: its quantity and its coded answer (either may be missing).
ObservedValue = tuple[float | None, str | None]


# When each condition (system, code) was recorded as active: its onsets (None: onset unknown).
ConditionOnsets = Mapping[tuple[str, str], Sequence[datetime | None]]
INACTIVE_STATUSES = frozenset({"resolved", "inactive", "remission", "entered-in-error", "refuted"})


def _present(
    onsets: ConditionOnsets, key: tuple[str, str], within_days: int | None, reference: datetime | None
) -> bool:
    seen = onsets.get(key)
    if not seen:
        return False
    if within_days is None or reference is None:
        return True
    earliest = reference - timedelta(days=within_days)
    return any(onset is None or onset >= earliest for onset in seen)


def values_from(
    task: TaskSpec,
    age: float | None,
    sex: str | None,
    observed: Mapping[tuple[str, str], ObservedValue],
    conditions: ConditionOnsets | None = None,
    reference: datetime | None = None,
) -> list[FeatureValue]:
    """The task's feature values in spec order, from demographics, the first observation of
    each code and the recorded conditions. Every path comes here through `extract` (a protobuf
    patient too: fibemrss.serde.records converts it to a PatientRecord first), so no two
    transports can disagree on what a feature is."""
    out: list[FeatureValue] = []
    for spec in task.features:
        if spec.source == "age":
            out.append(age)
        elif spec.source == "sex":
            out.append(sex if sex in spec.categories else None)
        elif spec.source == "condition":
            key = (spec.system, spec.code)
            out.append(
                "present" if _present(conditions or {}, key, spec.within_days, reference) else "absent"
            )
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


def condition_onsets(record: PatientRecord) -> dict[tuple[str, str], list[datetime | None]]:
    onsets: dict[tuple[str, str], list[datetime | None]] = {}
    for c in record.conditions:
        if c.clinical_status.lower() not in INACTIVE_STATUSES:
            onsets.setdefault((c.code.system, c.code.code), []).append(c.onset)
    return onsets


def reference_time(record: PatientRecord) -> datetime | None:
    """The patient's latest dated entry: condition windows count back from it."""
    times = [o.effective for o in record.observations if o.effective is not None]
    times += [c.onset for c in record.conditions if c.onset is not None]
    times += [e.start for e in record.encounters if e.start is not None]
    return max(times) if times else None


def label_from(
    task: TaskSpec,
    observed: Mapping[tuple[str, str], ObservedValue],
    conditions: ConditionOnsets | None = None,
    reference: datetime | None = None,
) -> float | None:
    label = task.label
    if label.kind == "condition":
        present = _present(conditions or {}, (label.system, label.code), label.within_days, reference)
        return 1.0 if present else 0.0
    seen = observed.get((label.system, label.code))
    if seen is None or seen[0] is None:
        return None
    return 1.0 if seen[0] > label.positive_above else 0.0


def age_in_years(birth: date, at: datetime | None) -> float:
    """Whole years from `birth` to `at` (to today when the record has no dated entry)."""
    when = at.date() if at is not None else date.today()
    return float(when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day)))


def record_age(record: PatientRecord, reference: datetime | None) -> float | None:
    """The recorded age, or the age at the patient's latest dated entry from the birth date."""
    if record.age_years is not None:
        return record.age_years
    return age_in_years(record.birth_date, reference) if record.birth_date is not None else None


def extract(task: TaskSpec, record: PatientRecord) -> tuple[list[FeatureValue], float | None]:
    """The task's feature values in spec order and the binary label (None when unknown)."""
    observed = observed_values(record)
    onsets = condition_onsets(record)
    reference = reference_time(record)
    return (
        values_from(task, record_age(record, reference), record.sex, observed, onsets, reference),
        label_from(task, observed, onsets, reference),
    )


def in_cohort(task: TaskSpec, record: PatientRecord) -> bool:
    """Whether the study may read this patient at all (age range, required observations)."""
    cohort = task.cohort
    age = record_age(record, reference_time(record))
    if cohort.min_age is not None and (age is None or age < cohort.min_age):
        return False
    if cohort.max_age is not None and (age is None or age > cohort.max_age):
        return False
    if cohort.required:
        codes = {(o.code.system, o.code.code) for o in record.observations}
        if not all(tuple(r) in codes for r in cohort.required):
            return False
    return True


@dataclass(frozen=True)
class TrainingExample:
    """One patient's features for a task, under the pseudonymous key; label None when unknown."""

    patient_key: str
    values: tuple[FeatureValue, ...]
    label: float | None


def training_example(task: TaskSpec, patient_key: str, record: PatientRecord) -> TrainingExample:
    values, label = extract(task, record)
    return TrainingExample(patient_key, tuple(values), label)
