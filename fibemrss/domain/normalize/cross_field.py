"""Cross-field plausibility: values plausible alone but impossible beside the rest of their record.

A table of pure rules over one normalized `PatientRecord`, checked by the gateway's core for every
format alike (FHIR, HL7 v2, CSV) after each value passed its own range (`plausibility.py`). A rule
that fires sends the record to quarantine with a reason naming every field it compared, by its
place in the record as held (`observations[3]`, `birth_date`), so a reviewer can correct it by
that index; it never rejects or drops a record. Values are compared in their canonical units; a
value whose unit does not convert is left to the single-field check, which already holds it.

"The same time" is the same `effective` timestamp, or no timestamp on either in a record that has
exactly one of each code at that time (a CSV row is one visit); two measurements of one code at
one time are not paired with a guess.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from fibemrss.domain.records import ICD10, ICD10_CM, LOINC, SNOMED, UCI_HEART, Observation, PatientRecord

from . import ucum

SYSTOLIC = (LOINC, "8480-6")
DIASTOLIC = (LOINC, "8462-4")
BODY_HEIGHT = (LOINC, "8302-2")
BODY_WEIGHT = (LOINC, "29463-7")
BMI = (LOINC, "39156-5")
MAX_HEART_RATE = (UCI_HEART, "thalach")

# Maximum heart rate achieved: the age-predicted maximum (220 - age, Fox 1971) has a standard
# deviation of about 10 to 12 beats per minute; more than 40 above it (over 3 SD) is not a person.
# In the shared UCI data the largest excess is 29 (a 54-year-old at 195/min).
MAX_HEART_RATE_MARGIN = 40.0
# Body mass index against weight / height^2 measured at the same time: more than 10 % apart is a
# typing or unit mistake in one of the three (Synthea's agree within 0.4 %).
BMI_TOLERANCE = 0.10
# The oldest documented person reached 122 years; a date meaning an age over this at the time is
# a wrong date or a wrong birth date.
MAX_AGE_AT_DATE_YEARS = 125
# A birth date is a local calendar date and timestamps are UTC: a day of slack either way.
DATE_SLACK = timedelta(days=1)

# Conditions that only a pregnancy explains: SNOMED CT findings (the ones Synthea writes, and their
# common relatives) and ICD-10 chapter XV (O00-O9A) with the pregnancy-state codes Z33, Z34, Z3A.
PREGNANCY_SNOMED = frozenset(
    {
        "72892002",  # Normal pregnancy
        "77386006",  # Pregnancy
        "47200007",  # High risk pregnancy
        "16356006",  # Multiple pregnancy
        "79586000",  # Tubal pregnancy
        "19169002",  # Miscarriage in first trimester
        "156073000",  # Complete miscarriage
        "161744009",  # Past pregnancy history of miscarriage
        "11687002",  # Gestational diabetes mellitus
        "398254007",  # Pre-eclampsia
        "15938005",  # Eclampsia
        "198992004",  # Antepartum eclampsia
    }
)
PREGNANCY_ICD10_PREFIXES = ("O", "Z33", "Z34", "Z3A")


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule: its name, the fields it compares (for the docs), and its check."""

    name: str
    fields: str
    check: Callable[[PatientRecord], list[str]]


def _num(value: float) -> str:
    return f"{round(value, 1):g}"


def _canonical(obs: Observation, unit: str) -> float | None:
    """The observation's value in `unit`, or None when it has none or its unit does not convert."""
    if obs.value is None or not obs.unit:
        return None
    try:
        return ucum.convert(obs.value, obs.unit, unit, obs.code.code)
    except ucum.UnitError:
        return None


def _same_time(record: PatientRecord, *codes: tuple[str, str]) -> Iterator[dict[tuple[str, str], int]]:
    """Per time (see the module's note), the index of each of `codes` when every one of them was
    measured exactly once then."""
    by_time: dict[datetime | None, dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, o in enumerate(record.observations):
        key = (o.code.system, o.code.code)
        if key in codes and o.value is not None:
            by_time[o.effective][key].append(i)
    for found in by_time.values():
        if all(len(found[c]) == 1 for c in codes):
            yield {c: found[c][0] for c in codes}


def blood_pressure_order(record: PatientRecord) -> list[str]:
    reasons = []
    for at in _same_time(record, SYSTOLIC, DIASTOLIC):
        s, d = at[SYSTOLIC], at[DIASTOLIC]
        systolic = _canonical(record.observations[s], "mm[Hg]")
        diastolic = _canonical(record.observations[d], "mm[Hg]")
        if systolic is not None and diastolic is not None and diastolic >= systolic:
            reasons.append(
                f"diastolic blood pressure observations[{d}] (8462-4) {_num(diastolic)} mm[Hg] is not below "
                f"systolic blood pressure observations[{s}] (8480-6) {_num(systolic)} mm[Hg] of the same time"
            )
    return reasons


def _age_at(record: PatientRecord, when: datetime | None) -> tuple[float, str] | None:
    """The patient's age in years at `when` and the field it comes from: `age_years` (an age
    given as such, UCI data) or `birth_date` with the date."""
    if record.age_years is not None:
        return record.age_years, "age_years"
    if record.birth_date is not None and when is not None:
        return (when.date() - record.birth_date).days / 365.25, "birth_date"
    return None


def max_heart_rate_for_age(record: PatientRecord) -> list[str]:
    reasons = []
    for i, o in enumerate(record.observations):
        if (o.code.system, o.code.code) != MAX_HEART_RATE:
            continue
        rate = _canonical(o, "/min")
        age = _age_at(record, o.effective)
        if rate is None or age is None:
            continue
        years, field = age
        limit = 220 - years + MAX_HEART_RATE_MARGIN
        if rate > limit:
            reasons.append(
                f"maximum heart rate achieved observations[{i}] (thalach) {_num(rate)} /min is above "
                f"220 - age + {_num(MAX_HEART_RATE_MARGIN)} = {_num(limit)} /min for the age "
                f"{_num(years)} years of {field}"
            )
    return reasons


def bmi_matches_height_and_weight(record: PatientRecord) -> list[str]:
    reasons = []
    for at in _same_time(record, BMI, BODY_WEIGHT, BODY_HEIGHT):
        b, w, h = at[BMI], at[BODY_WEIGHT], at[BODY_HEIGHT]
        bmi = _canonical(record.observations[b], "kg/m2")
        weight = _canonical(record.observations[w], "kg")
        height = _canonical(record.observations[h], "m")
        if bmi is None or weight is None or height is None or height * height <= 0 or bmi <= 0:
            continue  # a height of 0 (or one whose square underflows) is the single-field check's
        computed = weight / (height * height)
        if abs(bmi - computed) > BMI_TOLERANCE * max(bmi, computed):
            reasons.append(
                f"body mass index observations[{b}] (39156-5) {_num(bmi)} kg/m2 does not match body weight "
                f"observations[{w}] (29463-7) {_num(weight)} kg and body height observations[{h}] (8302-2) "
                f"{_num(height * 100)} cm of the same time, which give {_num(computed)} kg/m2 "
                f"(more than {_num(BMI_TOLERANCE * 100)}% apart)"
            )
    return reasons


def _pregnancy(system: str, code: str) -> bool:
    if system == SNOMED:
        return code in PREGNANCY_SNOMED
    if system in (ICD10, ICD10_CM):
        return code.upper().startswith(PREGNANCY_ICD10_PREFIXES)
    return False


def pregnancy_and_sex(record: PatientRecord) -> list[str]:
    if record.sex != "male":
        return []
    return [
        f"condition conditions[{i}] ({c.code.code}) is a pregnancy but sex is male"
        for i, c in enumerate(record.conditions)
        if _pregnancy(c.code.system, c.code.code)
    ]


def _dated(record: PatientRecord) -> Iterator[tuple[str, str, datetime]]:
    """(what, field, when) of every dated item of the record."""
    for i, o in enumerate(record.observations):
        if o.effective is not None:
            yield f"observation {o.code.code}", f"observations[{i}].effective", o.effective
    for i, c in enumerate(record.conditions):
        if c.onset is not None:
            yield f"condition {c.code.code}", f"conditions[{i}].onset", c.onset
    for i, e in enumerate(record.encounters):
        if e.start is not None:
            yield "encounter", f"encounters[{i}].start", e.start


def _after_birth(birth: date, delta: timedelta) -> datetime | None:
    """Midnight UTC of the birth date shifted by `delta`; None beyond the calendar (year 1 or
    9999), where no date can be earlier or later."""
    try:
        return datetime(birth.year, birth.month, birth.day, tzinfo=UTC) + delta
    except OverflowError:
        return None


def dated_before_birth(record: PatientRecord) -> list[str]:
    earliest = None if record.birth_date is None else _after_birth(record.birth_date, -DATE_SLACK)
    if earliest is None:
        return []
    return [
        f"{what} is dated before the patient's birth ({field} before birth_date)"
        for what, field, when in _dated(record)
        if when < earliest
    ]


def age_at_date(record: PatientRecord) -> list[str]:
    if record.birth_date is None:
        return []
    latest = _after_birth(record.birth_date, timedelta(days=365.25 * MAX_AGE_AT_DATE_YEARS) + DATE_SLACK)
    if latest is None:
        return []
    return [
        f"{what} is dated when the patient was over {MAX_AGE_AT_DATE_YEARS} years old ({field} "
        f"{when.date().isoformat()}, birth_date {record.birth_date.isoformat()})"
        for what, field, when in _dated(record)
        if when > latest
    ]


CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        "blood-pressure-order",
        "diastolic (8462-4) and systolic (8480-6) blood pressure of the same time",
        blood_pressure_order,
    ),
    CrossFieldRule(
        "max-heart-rate-for-age",
        f"maximum heart rate achieved (thalach) against 220 - age + {MAX_HEART_RATE_MARGIN:g} "
        "(age_years, else birth_date at the measurement)",
        max_heart_rate_for_age,
    ),
    CrossFieldRule(
        "bmi-matches-height-and-weight",
        "body mass index (39156-5) against body weight (29463-7) / body height (8302-2)^2 of the same time",
        bmi_matches_height_and_weight,
    ),
    CrossFieldRule(
        "pregnancy-and-sex",
        "a pregnancy condition (SNOMED CT, ICD-10 O, Z33, Z34, Z3A) and sex",
        pregnancy_and_sex,
    ),
    CrossFieldRule(
        "dated-before-birth",
        "each observation's effective, condition's onset and encounter's start against birth_date",
        dated_before_birth,
    ),
    CrossFieldRule(
        "age-at-date",
        f"the age each of those dates means (birth_date) against {MAX_AGE_AT_DATE_YEARS} years",
        age_at_date,
    ),
)


def cross_field_findings(record: PatientRecord) -> list[tuple[str, str]]:
    """(rule name, reason) of every contradiction in this record, in the table's order."""
    return [(rule.name, reason) for rule in CROSS_FIELD_RULES for reason in rule.check(record)]


def cross_field_reasons(record: PatientRecord) -> list[str]:
    """Why values of this record contradict each other, every rule in the table's order; empty
    when none does."""
    return [reason for _, reason in cross_field_findings(record)]
