"""What the core asks of the world outside it: a patient directory (the hospital's gateway)."""

from __future__ import annotations

from typing import Protocol

from fibemrss.domain.records import PatientRecord


class PatientSource(Protocol):
    """One patient's normalized record by key (`adapters.patient_directory.PatientDirectory`)."""

    def fetch(self, patient_key: str, on_behalf_of: str) -> PatientRecord:
        """The record, read for `on_behalf_of` (the caller's identity), which the source audits."""
        ...
