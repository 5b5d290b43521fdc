"""UCUM unit spellings and conversions for the quantities the gateway checks and the models use.

This is not a general UCUM engine: it knows a closed table of units (mass, length, pressure,
rates, temperature, blood concentrations, age) and the spellings EHR exports use for them.
Unknown units are left alone by `normalize_unit` and refused by `canonical_unit` / `convert`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class UnitError(ValueError):
    """A unit is unknown, or two units cannot be converted into each other (and why)."""


@dataclass(frozen=True)
class _Unit:
    """A known unit: value_in_base = value * factor + offset, in the base unit of `dimension`."""

    dimension: str
    factor: float
    offset: float = 0.0


# Canonical UCUM code -> definition. Base units: g, m, mm[Hg], /min, Cel, mg/dL, mmol/L, %, a.
_UNITS: dict[str, _Unit] = {
    # mass
    "g": _Unit("mass", 1.0),
    "kg": _Unit("mass", 1000.0),
    "mg": _Unit("mass", 1e-3),
    "[lb_av]": _Unit("mass", 453.59237),
    "[oz_av]": _Unit("mass", 28.349523125),
    # length
    "m": _Unit("length", 1.0),
    "cm": _Unit("length", 0.01),
    "mm": _Unit("length", 0.001),
    "[in_i]": _Unit("length", 0.0254),
    "[ft_i]": _Unit("length", 0.3048),
    # pressure (base mm[Hg]; 1 kPa = 7.50062 mm[Hg])
    "mm[Hg]": _Unit("pressure", 1.0),
    "kPa": _Unit("pressure", 7.500615758),
    # counts per time (heart rate, respiratory rate)
    "/min": _Unit("rate", 1.0),
    "/s": _Unit("rate", 60.0),
    "/h": _Unit("rate", 1.0 / 60.0),
    # temperature (base Cel)
    "Cel": _Unit("temperature", 1.0),
    "[degF]": _Unit("temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": _Unit("temperature", 1.0, -273.15),
    # mass concentration (base mg/dL)
    "mg/dL": _Unit("mass_concentration", 1.0),
    "g/dL": _Unit("mass_concentration", 1000.0),
    "g/L": _Unit("mass_concentration", 100.0),
    "mg/L": _Unit("mass_concentration", 0.1),
    "g/mL": _Unit("mass_concentration", 100000.0),
    # substance concentration (base mmol/L)
    "mmol/L": _Unit("substance_concentration", 1.0),
    "umol/L": _Unit("substance_concentration", 1e-3),
    # body mass index
    "kg/m2": _Unit("bmi", 1.0),
    # fractions
    "%": _Unit("fraction", 1.0),
    "mmol/mol": _Unit("ifcc_fraction", 1.0),
    # age and durations (base years; a = 365.25 d in UCUM)
    "a": _Unit("time", 1.0),
    "mo": _Unit("time", 1.0 / 12.0),
    "wk": _Unit("time", 7.0 / 365.25),
    "d": _Unit("time", 1.0 / 365.25),
}

# Spellings seen in exports (lower-cased, spaces removed) -> canonical UCUM code. UCUM itself
# is case-sensitive; folding case is safe here because no two units of this closed table
# differ only by case.
_ALIASES: dict[str, str] = {
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "gm/dl": "g/dL",
    "g/l": "g/L",
    "mg/l": "mg/L",
    "g/ml": "g/mL",
    "mmol/l": "mmol/L",
    "mm/l": "mmol/L",
    "umol/l": "umol/L",
    "µmol/l": "umol/L",
    "μmol/l": "umol/L",
    "mmhg": "mm[Hg]",
    "mm[hg]": "mm[Hg]",
    "mm_hg": "mm[Hg]",
    "kpa": "kPa",
    "/min": "/min",
    "1/min": "/min",
    "min-1": "/min",
    "/mn": "/min",
    "permin": "/min",
    "bpm": "/min",
    "beats/min": "/min",
    "{beats}/min": "/min",
    "{beat}/min": "/min",
    "beatsperminute": "/min",
    "breaths/min": "/min",
    "{breaths}/min": "/min",
    "{breath}/min": "/min",
    "rpm": "/min",
    "/s": "/s",
    "/h": "/h",
    "cel": "Cel",
    "°c": "Cel",
    "degc": "Cel",
    "celsius": "Cel",
    "[degf]": "[degF]",
    "°f": "[degF]",
    "degf": "[degF]",
    "fahrenheit": "[degF]",
    "k": "K",
    "kelvin": "K",
    "g": "g",
    "gm": "g",
    "gram": "g",
    "grams": "g",
    "kg": "kg",
    "kgs": "kg",
    "kilogram": "kg",
    "kilograms": "kg",
    "mg": "mg",
    "[lb_av]": "[lb_av]",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "pound": "[lb_av]",
    "pounds": "[lb_av]",
    "[oz_av]": "[oz_av]",
    "oz": "[oz_av]",
    "m": "m",
    "cm": "cm",
    "mm": "mm",
    "[in_i]": "[in_i]",
    "in": "[in_i]",
    "inch": "[in_i]",
    "inches": "[in_i]",
    "[in_us]": "[in_i]",  # differs from [in_i] by 2 ppm: below any clinical precision
    "[ft_i]": "[ft_i]",
    "ft": "[ft_i]",
    "kg/m2": "kg/m2",
    "kg/m^2": "kg/m2",
    "kg/m²": "kg/m2",
    "kg/(m2)": "kg/m2",
    "%": "%",
    "percent": "%",
    "mmol/mol": "mmol/mol",
    "a": "a",
    "yr": "a",
    "yrs": "a",
    "y": "a",
    "year": "a",
    "years": "a",
    "mo": "mo",
    "month": "mo",
    "months": "mo",
    "wk": "wk",
    "week": "wk",
    "weeks": "wk",
    "d": "d",
    "day": "d",
    "days": "d",
}

# Molar-mass factors for mass <-> substance concentration: mg/dL = mmol/L * factor. They depend
# on the analyte, so a conversion between the two needs the LOINC code of what was measured.
_CHOLESTEROL = 38.67
_GLUCOSE = 18.016
_TRIGLYCERIDES = 88.57
MOLAR_FACTORS: dict[str, float] = {
    "2093-3": _CHOLESTEROL,  # Cholesterol [Mass/volume] in Serum or Plasma
    "14647-2": _CHOLESTEROL,  # Cholesterol [Moles/volume] in Serum or Plasma
    "18262-6": _CHOLESTEROL,  # LDL cholesterol, direct assay
    "13457-7": _CHOLESTEROL,  # LDL cholesterol, calculated
    "2089-1": _CHOLESTEROL,  # LDL cholesterol
    "22748-8": _CHOLESTEROL,  # LDL cholesterol [Moles/volume]
    "2085-9": _CHOLESTEROL,  # HDL cholesterol
    "14646-4": _CHOLESTEROL,  # HDL cholesterol [Moles/volume]
    "2345-7": _GLUCOSE,  # Glucose [Mass/volume] in Serum or Plasma
    "2339-0": _GLUCOSE,  # Glucose [Mass/volume] in Blood
    "41653-7": _GLUCOSE,  # Glucose [Mass/volume] in Capillary blood by Glucometer
    "14749-6": _GLUCOSE,  # Glucose [Moles/volume] in Serum or Plasma
    "15074-8": _GLUCOSE,  # Glucose [Moles/volume] in Blood
    "2571-8": _TRIGLYCERIDES,  # Triglyceride [Mass/volume] in Serum or Plasma
    "14927-8": _TRIGLYCERIDES,  # Triglyceride [Moles/volume] in Serum or Plasma
}

# HbA1c: NGSP % and IFCC mmol/mol are linked by the IFCC-NGSP master equation,
# NGSP% = 0.09148 * IFCC + 2.152, so the conversion is affine and only valid for HbA1c.
_HBA1C_CODES = frozenset({"4548-4", "17856-6", "59261-8"})


def _key(unit: str) -> str:
    return "".join(unit.split()).lower()


def canonical_unit(unit: str) -> str:
    """The canonical UCUM code of a known unit spelling ("mg/dl" -> "mg/dL", "bpm" -> "/min").

    Raises UnitError for an empty or unknown unit.
    """
    if not isinstance(unit, str) or not unit.strip():
        raise UnitError("no unit given")
    stripped = unit.strip()
    if stripped in _UNITS:
        return stripped
    found = _ALIASES.get(_key(stripped))
    if found is None:
        raise UnitError(f"unknown unit {stripped!r}: not in the gateway's unit table")
    return found


def normalize_unit(unit: str | None) -> str | None:
    """Best effort for parsers: the canonical code of a known unit, else the unit as given
    (stripped), else None for an empty one. Never raises: unknown units may still be valid
    UCUM that this table does not cover ("10*3/uL", "{score}")."""
    if unit is None or not unit.strip():
        return None
    try:
        return canonical_unit(unit)
    except UnitError:
        return unit.strip()


def is_known_unit(unit: str) -> bool:
    try:
        canonical_unit(unit)
    except UnitError:
        return False
    return True


def dimension(unit: str) -> str:
    """The dimension name of a known unit ("mass", "mass_concentration", ...)."""
    return _UNITS[canonical_unit(unit)].dimension


def convert(value: float, from_unit: str, to_unit: str, loinc_code: str | None = None) -> float:
    """Convert `value` from one unit to another.

    Conversions between mass and substance concentration (mg/dL <-> mmol/L) and between NGSP %
    and IFCC mmol/mol need `loinc_code`, because the factor depends on the analyte.
    Raises UnitError with the reason when the units are unknown or not convertible.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnitError(f"value must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise UnitError("value is not a finite number")
    src_code, dst_code = canonical_unit(from_unit), canonical_unit(to_unit)
    if src_code == dst_code:
        return float(value)
    src, dst = _UNITS[src_code], _UNITS[dst_code]
    if src.dimension == dst.dimension:
        return _from_base(_to_base(float(value), src), dst)
    dims = {src.dimension, dst.dimension}
    if dims == {"mass_concentration", "substance_concentration"}:
        return _convert_molar(float(value), src_code, dst_code, loinc_code)
    if dims == {"fraction", "ifcc_fraction"}:
        return _convert_hba1c(float(value), src_code, dst_code, loinc_code)
    raise UnitError(
        f"cannot convert {src_code} ({src.dimension.replace('_', ' ')}) "
        f"to {dst_code} ({dst.dimension.replace('_', ' ')})"
    )


def _to_base(value: float, unit: _Unit) -> float:
    return value * unit.factor + unit.offset


def _from_base(value: float, unit: _Unit) -> float:
    return (value - unit.offset) / unit.factor


def _convert_molar(value: float, src_code: str, dst_code: str, loinc_code: str | None) -> float:
    if loinc_code is None:
        raise UnitError(
            f"cannot convert {src_code} to {dst_code} without the analyte: the factor depends on "
            "the substance measured (pass its LOINC code)"
        )
    factor = MOLAR_FACTORS.get(loinc_code)
    if factor is None:
        raise UnitError(
            f"cannot convert {src_code} to {dst_code} for LOINC {loinc_code}: no molar mass known "
            "for that analyte"
        )
    src, dst = _UNITS[src_code], _UNITS[dst_code]
    base = _to_base(value, src)
    if src.dimension == "mass_concentration":  # mg/dL -> mmol/L
        return _from_base(base / factor, dst)
    return _from_base(base * factor, dst)  # mmol/L -> mg/dL


def _convert_hba1c(value: float, src_code: str, dst_code: str, loinc_code: str | None) -> float:
    if loinc_code not in _HBA1C_CODES:
        what = f"LOINC {loinc_code}" if loinc_code else "an unnamed analyte"
        raise UnitError(f"cannot convert {src_code} to {dst_code} for {what}: only HbA1c has one")
    if src_code == "mmol/mol":
        return 0.09148 * value + 2.152
    return (value - 2.152) / 0.09148
