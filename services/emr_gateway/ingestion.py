"""Decides each parsed record's fate (accepted, duplicate, quarantined, rejected) and stores it.

Pure of transport: the servicer converts protobuf in and out; the store is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from fibemrss.errors import FieldProblem
from fibemrss.records import PatientRecord
from services.emr_gateway.plausibility import check_observation
from services.emr_gateway.pseudonym import Pseudonymizer

Fate = Literal["accepted", "duplicate", "quarantined", "rejected", "unsupported"]


class RecordStore(Protocol):
    def save(self, record: PatientRecord, patient_key: str) -> Literal["accepted", "duplicate"]: ...
    def quarantine(self, record: PatientRecord, reasons: list[str]) -> Literal["accepted", "duplicate"]: ...


@dataclass(frozen=True)
class Candidate:
    """A record as a parser produced it: either a record or the violations that reject it."""

    index: int
    source_id: str
    record: PatientRecord | None
    violations: tuple[FieldProblem, ...] = ()
    unsupported_reason: str = ""


@dataclass
class Outcome:
    index: int
    source_id: str
    fate: Fate
    reasons: list[str] = field(default_factory=list)
    violations: tuple[FieldProblem, ...] = ()
    patient_key: str = ""


def plausibility_reasons(record: PatientRecord) -> list[str]:
    reasons: list[str] = []
    for obs in record.observations:
        reasons.extend(check_observation(obs))
    if record.age_years is not None and not 0 <= record.age_years <= 120:
        reasons.append(f"age {record.age_years:g} years is outside the plausible range 0-120")
    return reasons


def ingest(candidates: Iterable[Candidate], store: RecordStore, pseudonyms: Pseudonymizer) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for c in candidates:
        if c.unsupported_reason:
            outcomes.append(Outcome(c.index, c.source_id, "unsupported", [c.unsupported_reason]))
            continue
        if c.record is None:
            outcomes.append(
                Outcome(c.index, c.source_id, "rejected", [v.description for v in c.violations], c.violations)
            )
            continue
        key = pseudonyms.patient_key(c.record.provenance.source_system, c.record.source_patient_id)
        reasons = plausibility_reasons(c.record)
        if reasons:
            # Suspicious, not wrong beyond doubt: kept with its reasons for a person to resolve.
            stored = store.quarantine(c.record, reasons)
            fate: Fate = "quarantined" if stored == "accepted" else "duplicate"
            outcomes.append(Outcome(c.index, c.source_id, fate, reasons, patient_key=key))
            continue
        outcomes.append(Outcome(c.index, c.source_id, store.save(c.record, key), patient_key=key))
    return outcomes
