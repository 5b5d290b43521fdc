"""Keyed hashes of identifiers: patient keys and source-id hashes, under one per-hospital secret."""

from __future__ import annotations

import pytest

from services.emr_gateway.core.pseudonym import Pseudonymizer

A = Pseudonymizer(b"hospital-a-pseudonym-key")
B = Pseudonymizer(b"hospital-b-pseudonym-key")


def test_a_source_id_hash_is_deterministic_per_key_and_system() -> None:
    h = A.source_id("fhir", "MRN12345")
    assert h == A.source_id("fhir", "MRN12345")
    assert h.startswith("sid_") and len(h) == 36 and "MRN12345" not in h
    assert h != A.source_id("hl7", "MRN12345")  # ids are unique within a system only
    assert h != B.source_id("fhir", "MRN12345")  # another hospital's key
    assert A.source_id("fhir", "") == ""  # no id stays no id


def test_the_two_hashes_of_one_identifier_do_not_link() -> None:
    """The source-id key is derived under its own label: the same input gives unrelated hashes."""
    key = A.patient_key("fhir", "MRN12345")
    sid = A.source_id("fhir", "MRN12345")
    assert key.startswith("pk_") and key[3:] != sid[4:]


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Pseudonymizer(b"short")
