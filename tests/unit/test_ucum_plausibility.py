"""UCUM spellings and conversions, the plausibility table, and the quarantine reasons it gives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibemrss.domain.normalize import ucum
from fibemrss.domain.normalize.plausibility import (
    PLAUSIBLE,
    check_observation,
    plausible_limits,
    to_canonical_unit,
)
from fibemrss.domain.normalize.ucum import UnitError, canonical_unit, convert, normalize_unit
from fibemrss.domain.records import LOINC, UCI_HEART, Code, Observation

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def obs(code: str, value: float | None, unit: str | None, system: str = LOINC) -> Observation:
    return Observation(code=Code(system, code), value=value, unit=unit)


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("mg/dl", "mg/dL"),
        ("MG/DL", "mg/dL"),
        ("mg/dL", "mg/dL"),
        ("mmol/l", "mmol/L"),
        ("mmHg", "mm[Hg]"),
        ("mm Hg", "mm[Hg]"),
        ("mm[Hg]", "mm[Hg]"),
        ("bpm", "/min"),
        ("beats/min", "/min"),
        ("{beats}/min", "/min"),
        ("/min", "/min"),
        ("breaths/min", "/min"),
        ("kg/m2", "kg/m2"),
        ("kg/m^2", "kg/m2"),
        ("%", "%"),
        ("Cel", "Cel"),
        ("°C", "Cel"),
        ("degF", "[degF]"),
        ("[degF]", "[degF]"),
        ("lbs", "[lb_av]"),
        ("[lb_av]", "[lb_av]"),
        ("in", "[in_i]"),
        ("[in_i]", "[in_i]"),
        (" kg ", "kg"),
        ("years", "a"),
    ],
)
def test_canonical_unit_spellings(written: str, canonical: str) -> None:
    assert canonical_unit(written) == canonical


def test_unknown_or_empty_unit_is_refused_by_canonical_unit_but_kept_by_normalize_unit() -> None:
    with pytest.raises(UnitError, match="unknown unit"):
        canonical_unit("furlongs/fortnight")
    with pytest.raises(UnitError, match="no unit"):
        canonical_unit("  ")
    # Valid UCUM outside the table passes through untouched; empty becomes None.
    assert normalize_unit("10*3/uL") == "10*3/uL"
    assert normalize_unit("mg/dl") == "mg/dL"
    assert normalize_unit("") is None
    assert normalize_unit(None) is None


@pytest.mark.parametrize(
    ("value", "src", "dst", "loinc", "expected"),
    [
        (5.2, "mmol/L", "mg/dL", "2093-3", 201.084),  # cholesterol, factor 38.67
        (201.084, "mg/dl", "mmol/L", "2093-3", 5.2),
        (3.0, "mmol/L", "mg/dL", "18262-6", 116.01),  # LDL uses the cholesterol factor
        (100.0, "mg/dL", "mmol/L", "2345-7", 100 / 18.016),  # glucose
        (5.5, "mmol/L", "mg/dL", "2339-0", 99.088),
        (150.0, "mg/dL", "mmol/L", "2571-8", 150 / 88.57),  # triglycerides
        (98.6, "[degF]", "Cel", None, 37.0),
        (37.0, "Cel", "degF", None, 98.6),
        (310.15, "K", "Cel", None, 37.0),
        (150.0, "lb", "kg", None, 68.0388555),
        (2500.0, "g", "kg", None, 2.5),
        (70.0, "[in_i]", "cm", None, 177.8),
        (1.8, "m", "cm", None, 180.0),
        (120.0, "mmHg", "kPa", None, 15.9987),
        (1.2, "/s", "/min", None, 72.0),
        (12.5, "g/dL", "g/L", None, 125.0),
        (48.0, "mmol/mol", "%", "4548-4", 6.54304),  # HbA1c, IFCC -> NGSP
        (18.0, "mo", "a", None, 1.5),
    ],
)
def test_conversions(value: float, src: str, dst: str, loinc: str | None, expected: float) -> None:
    assert convert(value, src, dst, loinc) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("src", "dst", "loinc", "reason"),
    [
        ("mg/dL", "mmol/L", None, "without the analyte"),
        ("mg/dL", "mmol/L", "718-7", "no molar mass known"),
        ("kg", "cm", None, "cannot convert kg \\(mass\\) to cm \\(length\\)"),
        ("%", "mmol/mol", "2093-3", "only HbA1c"),
        ("stones", "kg", None, "unknown unit"),
    ],
)
def test_impossible_conversions_say_why(src: str, dst: str, loinc: str | None, reason: str) -> None:
    with pytest.raises(UnitError, match=reason):
        convert(1.0, src, dst, loinc)


def test_unit_error_is_a_value_error_and_rejects_non_numbers() -> None:
    assert issubclass(UnitError, ValueError)
    with pytest.raises(UnitError, match="finite"):
        convert(math.nan, "kg", "g")
    with pytest.raises(UnitError, match="number"):
        convert(True, "kg", "g")  # a bool is an int in Python, never a measurement


_LINEAR = [
    ("kg", "[lb_av]"),
    ("cm", "[in_i]"),
    ("mm[Hg]", "kPa"),
    ("Cel", "[degF]"),
    ("mg/dL", "g/L"),
    ("/min", "/s"),
    ("a", "d"),
]


@settings(max_examples=200, deadline=None)
@given(
    pair=st.sampled_from(_LINEAR),
    value=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
)
def test_round_trip_conversion_is_identity(pair: tuple[str, str], value: float) -> None:
    a, b = pair
    assert convert(convert(value, a, b), b, a) == pytest.approx(value, rel=1e-9, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    loinc=st.sampled_from(sorted(ucum.MOLAR_FACTORS)),
    value=st.floats(min_value=0, max_value=1e5, allow_nan=False),
)
def test_molar_round_trip_is_identity(loinc: str, value: float) -> None:
    there = convert(value, "mg/dL", "mmol/L", loinc)
    assert convert(there, "mmol/L", "mg/dL", loinc) == pytest.approx(value, rel=1e-9, abs=1e-9)


# --- plausibility ---------------------------------------------------------------------------


REQUIRED = {
    "8302-2": "cm",
    "29463-7": "kg",
    "39156-5": "kg/m2",
    "8480-6": "mm[Hg]",
    "8462-4": "mm[Hg]",
    "8867-4": "/min",
    "8310-5": "Cel",
    "9279-1": "/min",
    "2093-3": "mg/dL",
    "18262-6": "mg/dL",
    "2085-9": "mg/dL",
    "2571-8": "mg/dL",
    "2345-7": "mg/dL",
    "4548-4": "%",
    "718-7": "g/dL",
    "30525-0": "a",
}


def test_table_covers_the_required_codes_in_their_canonical_units() -> None:
    for code, unit in REQUIRED.items():
        assert PLAUSIBLE[(LOINC, code)].unit == unit, code
    thalach, oldpeak = PLAUSIBLE[(UCI_HEART, "thalach")], PLAUSIBLE[(UCI_HEART, "oldpeak")]
    assert (thalach.unit, thalach.low, thalach.high) == ("/min", 30, 250)
    assert (oldpeak.unit, oldpeak.low, oldpeak.high) == ("mm", -5, 10)
    age = PLAUSIBLE[(LOINC, "30525-0")]
    assert (age.low, age.high) == (0, 120)


def test_every_unit_of_the_table_is_known_and_canonical() -> None:
    for key, rng in PLAUSIBLE.items():
        assert canonical_unit(rng.unit) == rng.unit, key
        assert rng.low < rng.high, key
        for unit in rng.mistaken_units:
            # The mistaken unit must convert to the canonical one, or the detector is dead code.
            convert(1.0, unit, rng.unit, key[1])


def test_cholesterol_in_mmol_written_as_mg_dl_is_quarantined_with_the_likely_unit() -> None:
    reasons = check_observation(obs("2093-3", 5.2, "mg/dL"))
    assert reasons == [
        "value 5.2 mg/dL is implausible for 2093-3 (plausible 50-1000 mg/dL); "
        "it looks like a mmol/L value (201 mg/dL)"
    ]


@pytest.mark.parametrize(
    ("code", "value", "unit", "expected"),
    [
        ("8310-5", 98.6, "Cel", "it looks like a [degF] value (37 Cel)"),
        ("8302-2", 1.75, "cm", "it looks like a m value (175 cm)"),
        ("2345-7", 5.5, "mg/dL", "it looks like a mmol/L value (99.1 mg/dL)"),
        ("2093-3", 201.0, "mmol/L", "it looks like a mg/dL value (201 mg/dL)"),
        ("718-7", 125.0, "g/dL", "it looks like a g/L value (12.5 g/dL)"),
        ("4548-4", 48.0, "%", "it looks like a mmol/mol value (6.54 %)"),
    ],
)
def test_unit_mistake_detector(code: str, value: float, unit: str, expected: str) -> None:
    (reason,) = check_observation(obs(code, value, unit))
    assert reason.endswith(expected), reason


def test_plausible_values_in_any_convertible_unit_pass() -> None:
    assert check_observation(obs("2093-3", 201.0, "mg/dL")) == []
    assert check_observation(obs("2093-3", 603.0, "mg/dL")) == []  # a real Hungarian UCI patient
    assert check_observation(obs("2093-3", 5.2, "mmol/L")) == []
    assert check_observation(obs("29463-7", 165.0, "lbs")) == []
    assert check_observation(obs("8310-5", 98.6, "[degF]")) == []
    assert check_observation(obs("thalach", 150.0, "/min", UCI_HEART)) == []
    assert check_observation(obs("oldpeak", -0.5, "mm", UCI_HEART)) == []


def test_out_of_range_without_a_better_unit_still_gives_a_reason() -> None:
    (reason,) = check_observation(obs("thalach", 400.0, "/min", UCI_HEART))
    assert reason == "value 400 /min is implausible for thalach (plausible 30-250 /min)"


def test_missing_or_wrong_units_are_reasons_and_unchecked_things_are_not() -> None:
    assert check_observation(obs("8867-4", 72.0, None)) == ["value 72 for 8867-4 has no unit (expected /min)"]
    (reason,) = check_observation(obs("8867-4", 72.0, "kg"))
    assert "cannot be used for 8867-4" in reason
    assert check_observation(obs("8867-4", None, "/min")) == []  # no value: nothing to check
    assert check_observation(obs("99999-9", 1e9, "kg")) == []  # not in the table
    assert check_observation(obs("8867-4", math.inf, "/min")) == ["value of 8867-4 is not a finite number"]


def test_to_canonical_unit_converts_listed_codes_only() -> None:
    converted = to_canonical_unit(obs("2093-3", 5.2, "mmol/L"))
    assert converted.unit == "mg/dL"
    assert converted.value == pytest.approx(201.084)
    untouched = obs("26464-8", 4.2, "10*3/uL")
    assert to_canonical_unit(untouched) is untouched


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(sorted(PLAUSIBLE)),
    value=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    unit=st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["mg/dL", "mmol/L", "kg", "%", "/min"])),
)
def test_check_observation_never_raises(key: tuple[str, str], value: float | None, unit: str | None) -> None:
    reasons = check_observation(Observation(code=Code(*key), value=value, unit=unit))
    assert all(isinstance(r, str) and r for r in reasons)


def test_real_synthea_values_are_all_plausible() -> None:
    """The Synthea patients (aged 0 to 71) must pass: the ranges catch mistakes, not children."""
    if not (SHARED / "fhir_r4").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (checked out without ../shared/data)")
    from fibemrss.domain.normalize.fhir_r4 import parse_bundle

    checked = 0
    for path in sorted((SHARED / "fhir_r4").glob("*.json")):
        for record in parse_bundle(path.read_bytes()).records:
            for observation in record.observations:
                assert check_observation(observation) == [], (path.name, observation)
                checked += (observation.code.system, observation.code.code) in PLAUSIBLE
    assert checked > 1000


def test_plausible_limits_in_the_unit_asked_and_for_unit_less_counts() -> None:
    """What inference checks a feature against (services/inference/core/input_limits.py)."""
    assert plausible_limits(LOINC, "2093-3", "mg/dL") == (50, 1000)
    assert plausible_limits(LOINC, "2093-3", "") == (50, 1000)  # the table's own unit
    low, high = plausible_limits(LOINC, "2093-3", "mmol/L") or (0.0, 0.0)
    assert low == pytest.approx(convert(50, "mg/dL", "mmol/L", "2093-3"))
    assert high == pytest.approx(convert(1000, "mg/dL", "mmol/L", "2093-3"))
    assert plausible_limits(UCI_HEART, "ca", "1") == (0, 3) == plausible_limits(UCI_HEART, "ca", "")
    assert plausible_limits(UCI_HEART, "ca", "mg/dL") is None  # a count in no other unit
    assert plausible_limits(LOINC, "2093-3", "kg") is None  # a unit that cannot express it
    assert plausible_limits(LOINC, "0000-0", "") is None  # not listed
