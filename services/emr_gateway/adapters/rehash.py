"""Start-up rehash of source identifiers written before they were kept as keyed hashes.

Migration 0025 marks every row written before it (`raw_source_ids`); only the gateway holds the
key, so it hashes them here, before it serves: a batch of marked rows at a time, each batch in one
transaction that hashes the rows (a source record with its observations, conditions and
encounters; a quarantined record with its JSON and reasons; a Consent) and clears their marks.
Safe to run twice and after a crash mid-way (a row is hashed and unmarked together or not at
all), and beside another gateway doing the same (marked rows are locked; a row another gateway
unmarked is skipped). A value that already has the shape of a keyed hash is never hashed again:
a row the new code wrote but a late-applied migration marked keeps its value.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from psycopg2.extras import execute_values

from fibemrss.db.pool import Database
from services.emr_gateway.core.pseudonym import Pseudonymizer

log = logging.getLogger(__name__)

_HASHED = re.compile(r"sid_[0-9a-f]{32}\Z")
_PATIENT_KEY = re.compile(r"pk_[0-9a-f]{32}\Z")
BATCH = 500


class SchemaTooOld(RuntimeError):
    """The hospital schema lacks migration 0025: run the migrations before starting the gateway."""


def _hasher(pseudonyms: Pseudonymizer, system: str) -> Callable[[str], str]:
    def hashed(source_id: str) -> str:
        return source_id if _HASHED.match(source_id) else pseudonyms.source_id(system, source_id)

    return hashed


def rehash_source_ids(db: Database, pseudonyms: Pseudonymizer, batch: int = BATCH) -> dict[str, int]:
    """Hashes every marked row; returns how many rows of each table it hashed."""
    with db.transaction() as cur:
        cur.execute(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'raw_source_ids' "
            "AND table_name IN ('source_records', 'quarantine', 'consents') "
            "AND table_schema = current_schema()"
        )
        row = cur.fetchone()
        if row is None or int(row[0]) != 3:
            raise SchemaTooOld(
                "the hospital schema lacks migration 0025_source_id_hashes; run the migrations "
                "(FIBEMRSS_MIGRATE=1) before starting the gateway"
            )
    done = {"source_records": 0, "quarantine": 0, "consents": 0}
    for table, step in (
        ("source_records", _records),
        ("quarantine", _quarantine),
        ("consents", _consents),
    ):
        while True:
            with db.transaction() as cur:
                n = step(cur, pseudonyms, batch)
            if n == 0:
                break
            done[table] += n
    if any(done.values()):
        log.info("source identifiers rehashed", extra={"rows": done})
    return done


def _update(cur: Any, table: str, rows: list[tuple[int, str]]) -> None:
    if rows:
        execute_values(
            cur,
            f"UPDATE {table} t SET source_id = v.h FROM (VALUES %s) AS v(id, h) WHERE t.id = v.id",  # noqa: S608 - fixed table names
            rows,
        )


def _records(cur: Any, pseudonyms: Pseudonymizer, batch: int) -> int:
    cur.execute(
        "SELECT id, source_system, source_id FROM source_records WHERE raw_source_ids "
        "ORDER BY id LIMIT %s FOR UPDATE",
        (batch,),
    )
    records = cur.fetchall()
    if not records:
        return 0
    systems = {rid: system for rid, system, _ in records}
    ids = list(systems)
    for child in ("observations", "conditions", "encounters"):
        cur.execute(f"SELECT id, record_id, source_id FROM {child} WHERE record_id = ANY(%s)", (ids,))  # noqa: S608 - fixed table names
        _update(
            cur, child, [(cid, _hasher(pseudonyms, systems[rid])(sid)) for cid, rid, sid in cur.fetchall()]
        )
    execute_values(
        cur,
        "UPDATE source_records t SET source_id = v.h, raw_source_ids = false FROM (VALUES %s) AS v(id, h) "
        "WHERE t.id = v.id",
        [(rid, _hasher(pseudonyms, system)(sid)) for rid, system, sid in records],
    )
    return len(records)


def _quarantine(cur: Any, pseudonyms: Pseudonymizer, batch: int) -> int:
    cur.execute(
        "SELECT id, source_system, source_id, patient_key, record_json, reasons FROM quarantine "
        "WHERE raw_source_ids ORDER BY id LIMIT %s FOR UPDATE",
        (batch,),
    )
    rows = cur.fetchall()
    for entry_id, system, source_id, patient_key, record_json, reasons in rows:
        hashed = _hasher(pseudonyms, system)
        data = record_json if isinstance(record_json, dict) else json.loads(record_json)
        key, data, reasons = held_record(pseudonyms, system, patient_key, data, list(reasons), hashed)
        cur.execute(
            "UPDATE quarantine SET source_id = %s, patient_key = %s, record_json = %s::jsonb, "
            "reasons = %s::text[], raw_source_ids = false WHERE id = %s",
            (hashed(source_id), key, json.dumps(data), reasons, entry_id),
        )
    return len(rows)


def held_record(
    pseudonyms: Pseudonymizer,
    system: str,
    patient_key: str,
    data: dict[str, Any],
    reasons: list[str],
    hashed: Callable[[str], str],
) -> tuple[str, dict[str, Any], list[str]]:
    """A quarantined record's (patient key, JSON, reasons) with every source identifier hashed:
    the record's and its items' source ids, a raw patient id that an old row kept, and encounter
    ids named in reasons (an encounter is now named by its place, `encounters[i]`)."""
    raw_patient = str(data.get("source_patient_id", ""))
    if not patient_key and raw_patient:
        patient_key = (
            raw_patient if _PATIENT_KEY.match(raw_patient) else pseudonyms.patient_key(system, raw_patient)
        )
    data["source_patient_id"] = patient_key
    provenance = data.get("provenance", {})
    provenance["source_id"] = hashed(str(provenance.get("source_id", "")))
    for kind in ("observations", "conditions"):
        for item in data.get(kind, []):
            item["source_id"] = hashed(str(item.get("source_id", "")))
    for i, encounter in enumerate(data.get("encounters", [])):
        raw = str(encounter.get("source_id", ""))
        if raw and not _HASHED.match(raw):
            reasons = [_encounter_reason(r, raw, i) for r in reasons]
        encounter["source_id"] = hashed(raw)
    return patient_key, data, reasons


def _encounter_reason(reason: str, raw: str, index: int) -> str:
    """An older reason naming encounter `raw` by its id, as the gateway words it now."""
    before_birth = f"encounter {raw} is dated before the patient's birth"
    if reason == before_birth:
        return f"encounter is dated before the patient's birth (encounters[{index}].start before birth_date)"
    return reason.replace(f"encounter {raw} ", f"encounters[{index}] ").replace(raw, f"encounters[{index}]")


def _consents(cur: Any, pseudonyms: Pseudonymizer, batch: int) -> int:
    cur.execute(
        "SELECT id, source_system, source_id FROM consents WHERE raw_source_ids ORDER BY id LIMIT %s FOR UPDATE",
        (batch,),
    )
    rows = cur.fetchall()
    if rows:
        execute_values(
            cur,
            "UPDATE consents t SET source_id = v.h, raw_source_ids = false FROM (VALUES %s) AS v(id, h) "
            "WHERE t.id = v.id",
            [(cid, _hasher(pseudonyms, system)(sid)) for cid, system, sid in rows],
        )
    return len(rows)
