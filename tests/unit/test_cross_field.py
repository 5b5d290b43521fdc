"""Cross-field plausibility: one test per rule of the table, each firing and each holding still."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime

import pytest

from fibemrss.domain.normalize.cross_field import (
    CROSS_FIELD_RULES,
    age_at_date,
    blood_pressure_order,
    bmi_matches_height_and_weight,
    cross_field_reasons,
    dated_before_birth,
    max_heart_rate_for_age,
    pregnancy_and_sex,
)
from fibemrss.domain.records import (
    ICD10_CM,
    LOINC,
    SNOMED,
    UCI_HEART,
    Code,
    Condition,
    Encounter,
    Observation,
    PatientRecord,
    Provenance,
)

T1 = datetime(2024, 3, 1, 10, tzinfo=UTC)
T2 = datetime(2024, 4, 1, 10, tzinfo=UTC)


def obs(code: str, value: float, unit: str, when: datetime | None = T1, system: str = LOINC) -> Observation:
    return Observation(Code(system, code), value, unit, effective=when)


def record(*observations: Observation, **fields: object) -> PatientRecord:
    base = PatientRecord("p", Provenance("s", "r", "h"), sex="female", birth_date=date(1970, 5, 1))
    return replace(base, observations=observations, **fields)  # type: ignore[arg-type]  # test fields


def test_every_rule_has_a_name_and_its_fields() -> None:
    names = [r.name for r in CROSS_FIELD_RULES]
    assert len(set(names)) == len(names) == 6
    assert all(r.fields for r in CROSS_FIELD_RULES)


def test_diastolic_not_below_systolic_of_the_same_time() -> None:
    bad = record(obs("8480-6", 80, "mm[Hg]"), obs("8462-4", 95, "mm[Hg]"))
    assert blood_pressure_order(bad) == [
        "diastolic blood pressure observations[1] (8462-4) 95 mm[Hg] is not below systolic blood "
        "pressure observations[0] (8480-6) 80 mm[Hg] of the same time"
    ]
    # Equal is impossible too; units are compared converted (12 kPa = 90 mm[Hg]).
    assert blood_pressure_order(record(obs("8480-6", 90, "mm[Hg]"), obs("8462-4", 12, "kPa")))
    # Plausible pairs, and values of different times, are left alone.
    assert blood_pressure_order(record(obs("8480-6", 120, "mm[Hg]"), obs("8462-4", 80, "mm[Hg]"))) == []
    assert blood_pressure_order(record(obs("8480-6", 80, "mm[Hg]"), obs("8462-4", 95, "mm[Hg]", T2))) == []
    # A CSV row: both undated, one of each, the same visit.
    assert blood_pressure_order(record(obs("8480-6", 80, "mm[Hg]", None), obs("8462-4", 95, "mm[Hg]", None)))
    # Two systolic values at one time: which pairs with the diastolic is not guessed.
    twice = record(obs("8480-6", 80, "mm[Hg]"), obs("8480-6", 130, "mm[Hg]"), obs("8462-4", 95, "mm[Hg]"))
    assert blood_pressure_order(twice) == []
    # A unit that does not convert is the single-field check's business.
    assert blood_pressure_order(record(obs("8480-6", 80, "mg"), obs("8462-4", 95, "mm[Hg]"))) == []


def test_max_heart_rate_above_what_the_age_allows() -> None:
    thalach = obs("thalach", 240, "/min", None, UCI_HEART)
    old = record(thalach, birth_date=None, age_years=63.0)
    assert max_heart_rate_for_age(old) == [
        "maximum heart rate achieved observations[0] (thalach) 240 /min is above 220 - age + 40 = 197 "
        "/min for the age 63 years of age_years"
    ]
    # The same rate is possible at 20 (limit 240), and the UCI data's largest excess (a 54-year-old
    # at 195/min, 29 above 220 - age) passes.
    assert max_heart_rate_for_age(record(thalach, birth_date=None, age_years=20.0)) == []
    assert max_heart_rate_for_age(record(obs("thalach", 195, "/min", None, UCI_HEART), age_years=54.0)) == []
    # With a birth date, the age at the measurement counts.
    dated = record(obs("thalach", 200, "/min", T1, UCI_HEART), birth_date=date(1944, 1, 1))
    assert "for the age 80.2 years of birth_date" in max_heart_rate_for_age(dated)[0]
    # No age known: nothing to compare.
    assert max_heart_rate_for_age(record(thalach, birth_date=None)) == []


def test_bmi_that_weight_and_height_do_not_give() -> None:
    bad = record(obs("29463-7", 70, "kg"), obs("8302-2", 175, "cm"), obs("39156-5", 30, "kg/m2"))
    assert bmi_matches_height_and_weight(bad) == [
        "body mass index observations[2] (39156-5) 30 kg/m2 does not match body weight observations[0] "
        "(29463-7) 70 kg and body height observations[1] (8302-2) 175 cm of the same time, which give "
        "22.9 kg/m2 (more than 10% apart)"
    ]
    good = record(obs("29463-7", 70, "kg"), obs("8302-2", 1.75, "m"), obs("39156-5", 22.86, "kg/m2"))
    assert bmi_matches_height_and_weight(good) == []
    # Weight in pounds converts (154.3 [lb_av] = 70 kg); a BMI of another day is not compared.
    pounds = record(obs("29463-7", 154.3, "[lb_av]"), obs("8302-2", 175, "cm"), obs("39156-5", 22.9, "kg/m2"))
    assert bmi_matches_height_and_weight(pounds) == []
    other_day = record(obs("29463-7", 70, "kg"), obs("8302-2", 175, "cm"), obs("39156-5", 30, "kg/m2", T2))
    assert bmi_matches_height_and_weight(other_day) == []


@pytest.mark.parametrize(
    ("system", "code"),
    [
        (SNOMED, "72892002"),
        (SNOMED, "161744009"),
        (ICD10_CM, "O80"),
        (ICD10_CM, "z34.00"),
        (ICD10_CM, "Z3A.20"),
    ],
)
def test_a_pregnancy_condition_for_a_male_patient(system: str, code: str) -> None:
    condition = Condition(Code(system, code, "pregnancy"))
    male = record(sex="male", conditions=(Condition(Code(SNOMED, "44054006")), condition))
    assert pregnancy_and_sex(male) == [f"condition conditions[1] ({code}) is a pregnancy but sex is male"]
    for sex in ("female", "other", "unknown", None):
        assert pregnancy_and_sex(replace(male, sex=sex)) == []


def test_no_pregnancy_code_for_a_male_patient_is_fine() -> None:
    male = record(
        sex="male", conditions=(Condition(Code(SNOMED, "44054006")), Condition(Code(ICD10_CM, "I10")))
    )
    assert pregnancy_and_sex(male) == []


def test_a_date_before_the_birth() -> None:
    bad = record(
        obs("8867-4", 70, "/min", datetime(1960, 1, 1, tzinfo=UTC)),
        conditions=(Condition(Code(SNOMED, "1"), onset=datetime(1969, 1, 1, tzinfo=UTC)),),
        encounters=(Encounter("e", start=datetime(1970, 4, 1, tzinfo=UTC)),),
    )
    assert dated_before_birth(bad) == [
        "observation 8867-4 is dated before the patient's birth (observations[0].effective before birth_date)",
        "condition 1 is dated before the patient's birth (conditions[0].onset before birth_date)",
        "encounter is dated before the patient's birth (encounters[0].start before birth_date)",
    ]
    # The day of birth, even an hour before midnight UTC of it, is not before it (time zones).
    on_the_day = record(obs("8867-4", 140, "/min", datetime(1970, 4, 30, 23, tzinfo=UTC)))
    assert dated_before_birth(on_the_day) == []
    assert dated_before_birth(replace(bad, birth_date=None)) == []


def test_a_date_meaning_an_age_over_125() -> None:
    bad = record(obs("8867-4", 70, "/min", datetime(2024, 3, 1, tzinfo=UTC)), birth_date=date(1898, 1, 1))
    assert age_at_date(bad) == [
        "observation 8867-4 is dated when the patient was over 125 years old (observations[0].effective "
        "2024-03-01, birth_date 1898-01-01)"
    ]
    assert age_at_date(replace(bad, birth_date=date(1900, 1, 1))) == []
    assert age_at_date(replace(bad, birth_date=None)) == []


def test_all_rules_together_in_the_tables_order() -> None:
    both = record(
        obs("8480-6", 80, "mm[Hg]", datetime(1960, 1, 1, tzinfo=UTC)),
        obs("8462-4", 95, "mm[Hg]", datetime(1960, 1, 1, tzinfo=UTC)),
        sex="male",
        conditions=(Condition(Code(SNOMED, "72892002")),),
    )
    reasons = cross_field_reasons(both)
    assert [r.split(" ")[0] for r in reasons] == ["diastolic", "condition", "observation", "observation"]
    assert cross_field_reasons(record(obs("8480-6", 120, "mm[Hg]"), obs("8462-4", 80, "mm[Hg]"))) == []


@pytest.mark.parametrize("birth", [date(1, 1, 1), date(9999, 12, 31)])
def test_dates_at_the_ends_of_the_calendar_raise_nothing(birth: date) -> None:
    extreme = record(
        obs("8867-4", 70, "/min", datetime(1, 1, 2, tzinfo=UTC)),
        obs("thalach", 1e308, "/min", datetime(9999, 12, 30, tzinfo=UTC), UCI_HEART),
        obs("29463-7", 1e308, "kg"),
        obs("8302-2", 1e-200, "cm"),
        obs("39156-5", 20, "kg/m2"),
        birth_date=birth,
    )
    for rule in CROSS_FIELD_RULES:
        assert isinstance(rule.check(extreme), list)
