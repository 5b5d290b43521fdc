"""Plausible value ranges per observation code, and the checks that send a value to quarantine.

The ranges are physiological limits, not reference (normal) ranges: a value outside them is
almost certainly a typing or unit mistake, not a sick patient. They are deliberately wide, and
the body-size ranges cover newborns too, because hospitals send paediatric records as well (the
shared Synthea set has patients aged 0 to 71). A failed check quarantines the observation's
record with the reason; it never rejects or drops it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fibemrss.domain.records import LOINC, UCI_HEART, Observation, PatientRecord

from . import ucum


@dataclass(frozen=True)
class PlausibleRange:
    """Inclusive plausible range of a coded quantity, in its canonical UCUM unit.

    `mistaken_units` are units a sender plausibly meant when a value is out of range in the
    unit it wrote (for example mmol/L for a cholesterol sent as mg/dL).
    """

    display: str
    unit: str
    low: float
    high: float
    mistaken_units: tuple[str, ...] = ()


# Keyed by (code system, code). Sources for the limits: physiological extremes reported in the
# clinical literature, rounded outwards; see the comment of each entry where it is not obvious.
PLAUSIBLE: dict[tuple[str, str], PlausibleRange] = {
    # Body size: a 45 cm newborn to the tallest recorded adults; a preterm infant to 500 kg.
    (LOINC, "8302-2"): PlausibleRange("Body height", "cm", 20, 275, ("m", "[in_i]", "mm")),
    (LOINC, "29463-7"): PlausibleRange("Body weight", "kg", 0.2, 500, ("[lb_av]", "g")),
    (LOINC, "39156-5"): PlausibleRange("Body mass index", "kg/m2", 7, 150),
    # Vital signs.
    (LOINC, "8480-6"): PlausibleRange("Systolic blood pressure", "mm[Hg]", 30, 320, ("kPa",)),
    (LOINC, "8462-4"): PlausibleRange("Diastolic blood pressure", "mm[Hg]", 10, 220, ("kPa",)),
    (LOINC, "8867-4"): PlausibleRange("Heart rate", "/min", 15, 350, ("/s",)),
    (LOINC, "8310-5"): PlausibleRange("Body temperature", "Cel", 20, 46, ("[degF]", "K")),
    (LOINC, "9279-1"): PlausibleRange("Respiratory rate", "/min", 2, 120),
    # Lipids (US mg/dL; European labs send mmol/L, the classic unit mistake).
    # Total cholesterol: homozygous familial hypercholesterolaemia reaches 1000 mg/dL, and the
    # real Hungarian UCI file has a 603; the lower bound is what catches mmol/L sent as mg/dL.
    (LOINC, "2093-3"): PlausibleRange("Total cholesterol", "mg/dL", 50, 1000, ("mmol/L",)),
    (LOINC, "18262-6"): PlausibleRange("LDL cholesterol", "mg/dL", 10, 500, ("mmol/L",)),
    (LOINC, "2085-9"): PlausibleRange("HDL cholesterol", "mg/dL", 5, 200, ("mmol/L",)),
    # Triglycerides above 5000 mg/dL occur in chylomicronaemia but are exceedingly rare.
    (LOINC, "2571-8"): PlausibleRange("Triglycerides", "mg/dL", 10, 5000, ("mmol/L",)),
    (LOINC, "2345-7"): PlausibleRange("Glucose in serum or plasma", "mg/dL", 10, 2000, ("mmol/L",)),
    (LOINC, "2339-0"): PlausibleRange("Glucose in blood", "mg/dL", 10, 2000, ("mmol/L",)),
    (LOINC, "4548-4"): PlausibleRange("Hemoglobin A1c", "%", 2, 20, ("mmol/mol",)),
    (LOINC, "718-7"): PlausibleRange("Hemoglobin", "g/dL", 1, 26, ("g/L", "g/mL")),
    (LOINC, "30525-0"): PlausibleRange("Age", "a", 0, 120, ("mo", "d")),
    # UCI heart-disease attributes without an exact LOINC code.
    (UCI_HEART, "thalach"): PlausibleRange("Maximum heart rate achieved", "/min", 30, 250),
    (UCI_HEART, "oldpeak"): PlausibleRange("ST depression induced by exercise", "mm", -5, 10),
}


# Unit-less quantities (UCUM "1"), inclusive: where a model reads them (inference checks every
# value it is sent), not yet at ingestion, whose unit table has no "1".
PLAUSIBLE_UNITLESS: dict[tuple[str, str], tuple[str, float, float]] = {
    # The number of major vessels coloured by fluoroscopy, 0 to 3 (UCI "ca").
    (UCI_HEART, "ca"): ("Major vessels coloured by fluoroscopy", 0, 3),
}


def plausible_limits(system: str, code: str, unit: str) -> tuple[float, float] | None:
    """The inclusive plausible range of (system, code) expressed in `unit`, or None when the
    tables do not list it or the unit cannot express it."""
    rng = PLAUSIBLE.get((system, code))
    if rng is not None:
        if not unit or unit == rng.unit:
            return rng.low, rng.high
        try:
            return ucum.convert(rng.low, rng.unit, unit, code), ucum.convert(rng.high, rng.unit, unit, code)
        except ucum.UnitError:
            return None
    unitless = PLAUSIBLE_UNITLESS.get((system, code))
    if unitless is not None and unit in ("", "1"):
        return unitless[1], unitless[2]
    return None


def check_observation(obs: Observation) -> list[str]:
    """The reasons this observation's value is implausible; empty when it is fine or when there
    is nothing to check (an unlisted code, a coded value, no value)."""
    rng = PLAUSIBLE.get((obs.code.system, obs.code.code))
    if rng is None or obs.value is None:
        return []
    value, code = obs.value, obs.code.code
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [f"value of {code} is not a number"]
    if not math.isfinite(value):
        return [f"value of {code} is not a finite number"]
    if not obs.unit:
        return [f"value {_num(value)} for {code} has no unit (expected {rng.unit})"]
    try:
        canonical = ucum.convert(value, obs.unit, rng.unit, code)
    except ucum.UnitError as exc:
        return [f"unit {obs.unit!r} cannot be used for {code} (expected {rng.unit}): {exc}"]
    if rng.low <= canonical <= rng.high:
        return []
    shown = ucum.normalize_unit(obs.unit) or obs.unit
    reason = (
        f"value {_num(value)} {shown} is implausible for {code} "
        f"(plausible {_num(rng.low)}-{_num(rng.high)} {rng.unit})"
    )
    guess = _mistaken_unit(value, shown, rng, code)
    if guess is not None:
        unit, converted = guess
        reason += f"; it looks like a {unit} value ({_round3(converted)} {rng.unit})"
    return [reason]


def _mistaken_unit(value: float, written: str, rng: PlausibleRange, code: str) -> tuple[str, float] | None:
    """The first unit in which `value` would be plausible, when the sender wrote another one."""
    for unit in (rng.unit, *rng.mistaken_units):
        if unit == written:
            continue
        try:
            converted = ucum.convert(value, unit, rng.unit, code)
        except ucum.UnitError:
            continue
        if rng.low <= converted <= rng.high:
            return unit, converted
    return None


def to_canonical_unit(obs: Observation) -> Observation:
    """The observation with its value in the table's canonical unit, when the code is listed and
    the unit converts; otherwise unchanged. Keeps the models' features in one unit per code."""
    rng = PLAUSIBLE.get((obs.code.system, obs.code.code))
    if rng is None or obs.value is None or not obs.unit:
        return obs
    try:
        value = ucum.convert(obs.value, obs.unit, rng.unit, obs.code.code)
    except ucum.UnitError:
        return obs
    return replace(obs, value=value, unit=rng.unit)


def _num(value: float) -> str:
    return f"{value:g}"


def _round3(value: float) -> str:
    """Three significant figures, never in exponent form (201.08 -> "201", 37.02 -> "37")."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = 2 - math.floor(math.log10(abs(value)))
    text = f"{round(value, decimals):.{max(decimals, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def canonical(record: PatientRecord) -> PatientRecord:
    """The record with every listed quantity in its code's canonical UCUM unit (one unit per code)."""
    converted = tuple(to_canonical_unit(o) for o in record.observations)
    if converted == record.observations:
        return record
    return replace(record, observations=converted)
