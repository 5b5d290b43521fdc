"""The gateway's PostgreSQL adapter: idempotent record storage, quarantine, reads and audit.

Each record is written in its own transaction, so one bad record never takes a batch's good
records with it, and a rejected record is never partly written.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from typing import Literal

import psycopg2
import psycopg2.errors

from fibemrss.db.pool import Database
from fibemrss.errors import NotFound
from fibemrss.records import Code, Condition, Encounter, Observation, PatientRecord, Provenance

StoreOutcome = Literal["accepted", "duplicate"]


class GatewayStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def save(self, record: PatientRecord, patient_key: str) -> StoreOutcome:
        """Stores a new record version, or does nothing if this exact payload is already stored."""
        p = record.provenance
        try:
            with self._db.transaction() as cur:
                cur.execute(
                    "SELECT 1 FROM source_records WHERE source_system=%s AND source_id=%s AND payload_sha256=%s",
                    (p.source_system, p.source_id, p.payload_sha256),
                )
                if cur.fetchone() is not None:
                    return "duplicate"
                cur.execute(
                    "INSERT INTO patients (patient_key, sex, birth_date, age_years) VALUES (%s,%s,%s,%s) "
                    "ON CONFLICT (patient_key) DO UPDATE SET sex=COALESCE(EXCLUDED.sex, patients.sex), "
                    "birth_date=COALESCE(EXCLUDED.birth_date, patients.birth_date), "
                    "age_years=COALESCE(EXCLUDED.age_years, patients.age_years), updated_at=now()",
                    (patient_key, record.sex, record.birth_date, record.age_years),
                )
                # A changed payload under the same source id is a new version; history is kept.
                cur.execute(
                    "UPDATE source_records SET superseded_at=now() WHERE source_system=%s AND source_id=%s "
                    "AND superseded_at IS NULL RETURNING version",
                    (p.source_system, p.source_id),
                )
                previous = cur.fetchone()
                cur.execute(
                    "INSERT INTO source_records (source_system, source_id, payload_sha256, patient_key, version) "
                    "VALUES (%s,%s,%s,%s,%s) RETURNING id",
                    (
                        p.source_system,
                        p.source_id,
                        p.payload_sha256,
                        patient_key,
                        (previous[0] + 1) if previous else 1,
                    ),
                )
                record_id = cur.fetchone()[0]
                self._insert_children(cur, record_id, patient_key, record)
        except psycopg2.errors.UniqueViolation:
            # A concurrent call stored the same payload first: that is a duplicate, not an error.
            return "duplicate"
        return "accepted"

    @staticmethod
    def _insert_children(
        cur: psycopg2.extensions.cursor, record_id: int, key: str, record: PatientRecord
    ) -> None:
        if record.observations:
            cur.executemany(
                "INSERT INTO observations (record_id, patient_key, code_system, code, display, value, unit, "
                "value_system, value_code, effective, source_id) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [
                    (
                        record_id,
                        key,
                        o.code.system,
                        o.code.code,
                        o.code.display,
                        o.value,
                        o.unit,
                        o.value_code.system if o.value_code else None,
                        o.value_code.code if o.value_code else None,
                        o.effective,
                        o.source_id,
                    )
                    for o in record.observations
                ],
            )
        if record.conditions:
            cur.executemany(
                "INSERT INTO conditions (record_id, patient_key, code_system, code, display, onset, "
                "clinical_status, source_id) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                [
                    (
                        record_id,
                        key,
                        c.code.system,
                        c.code.code,
                        c.code.display,
                        c.onset,
                        c.clinical_status,
                        c.source_id,
                    )
                    for c in record.conditions
                ],
            )
        if record.encounters:
            cur.executemany(
                "INSERT INTO encounters (record_id, patient_key, source_id, class_code, start_at, end_at) "
                "VALUES (%s,%s,%s,%s,%s,%s)",
                [(record_id, key, e.source_id, e.class_code, e.start, e.end) for e in record.encounters],
            )

    def quarantine(self, record: PatientRecord, reasons: list[str]) -> StoreOutcome:
        p = record.provenance
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO quarantine (source_system, source_id, payload_sha256, record_json, reasons) "
                "VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING id",
                (
                    p.source_system,
                    p.source_id,
                    p.payload_sha256,
                    json.dumps(asdict(record), default=str),
                    reasons,
                ),
            )
            return "accepted" if cur.fetchone() else "duplicate"

    def audit(self, actor: str, action: str, purpose: str, subject: str = "") -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,%s,%s,%s)",
                (actor, action, purpose, subject),
            )

    def stats(self) -> dict[str, int]:
        with self._db.transaction() as cur:
            out: dict[str, int] = {}
            for table in (
                "patients",
                "observations",
                "conditions",
                "encounters",
                "quarantine",
                "source_records",
            ):
                cur.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed table names
                out[table] = int(cur.fetchone()[0])
            return out

    def get_patient(self, patient_key: str) -> PatientRecord:
        records = list(self._current_records(patient_key))
        if not records:
            raise NotFound(f"no patient with key {patient_key}")
        return records[0]

    def current_patients(self) -> Iterator[tuple[str, PatientRecord]]:
        """Every patient with the data of their current (not superseded) record versions."""
        for record in self._current_records(None):
            yield record.source_patient_id, record

    def _current_records(self, patient_key: str | None) -> Iterator[PatientRecord]:
        where, args = ("AND r.patient_key = %s", (patient_key,)) if patient_key else ("", ())
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT o.patient_key, o.code_system, o.code, o.display, o.value, o.unit, o.value_system, "
                "o.value_code, o.effective, o.source_id FROM observations o JOIN source_records r "
                f"ON r.id = o.record_id WHERE r.superseded_at IS NULL {where} ORDER BY o.id",
                args,
            )
            observations: dict[str, list[Observation]] = defaultdict(list)
            for key, system, code, display, value, unit, v_system, v_code, effective, source_id in cur:
                observations[key].append(
                    Observation(
                        Code(system, code, display),
                        value,
                        unit,
                        Code(v_system, v_code) if v_code is not None else None,
                        effective,
                        source_id,
                    )
                )
            cur.execute(
                "SELECT c.patient_key, c.code_system, c.code, c.display, c.onset, c.clinical_status, c.source_id "
                f"FROM conditions c JOIN source_records r ON r.id = c.record_id WHERE r.superseded_at IS NULL {where}",
                args,
            )
            conditions: dict[str, list[Condition]] = defaultdict(list)
            for key, system, code, display, onset, status, source_id in cur:
                conditions[key].append(Condition(Code(system, code, display), onset, status, source_id))
            cur.execute(
                "SELECT e.patient_key, e.source_id, e.class_code, e.start_at, e.end_at FROM encounters e "
                f"JOIN source_records r ON r.id = e.record_id WHERE r.superseded_at IS NULL {where}",
                args,
            )
            encounters: dict[str, list[Encounter]] = defaultdict(list)
            for key, source_id, class_code, start, end in cur:
                encounters[key].append(Encounter(source_id, class_code, start, end))
            where_p = "WHERE patient_key = %s" if patient_key else ""
            cur.execute(
                f"SELECT patient_key, sex, birth_date, age_years FROM patients {where_p} ORDER BY patient_key",
                args,
            )
            patients = cur.fetchall()
        for key, sex, birth_date, age in patients:
            # The stored record carries the pseudonym where the source id was: raw ids are never kept.
            yield PatientRecord(
                source_patient_id=key,
                provenance=Provenance("", "", ""),
                sex=sex,
                birth_date=birth_date,
                age_years=age,
                observations=tuple(observations[key]),
                conditions=tuple(conditions[key]),
                encounters=tuple(encounters[key]),
            )
