"""The gateway's PostgreSQL adapter: idempotent record storage, quarantine, reads and audit.

Write path: one transaction per ingest batch. The batch is first written with set-based
statements in as few round trips as the data allows (which of its payloads are stored already;
then the patients, the superseded versions and the new versions in one multi-statement request;
then one COPY per child table), because a batch of a few MLLP messages spends more time waiting on
round trips than on rows. If any of them fails (a concurrent writer stored the same payload
first, for example), that transaction is rolled back and the batch is written again in a new one,
every record on its own savepoint, so one bad record never takes the batch's good records with it
and a rejected record is never partly written.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2.extras import execute_values

from fibemrss.db.pool import Database, one_row
from fibemrss.db.text_copy import copy_rows
from fibemrss.domain.errors import FailedPrecondition, NotFound
from fibemrss.domain.records import Code, Condition, Encounter, Observation, PatientRecord, Provenance
from services.emr_gateway.adapters.record_json import record_from_json, record_to_json
from services.emr_gateway.core.ingestion import StoreOutcome, Write
from services.emr_gateway.core.parsers.fhir_consent import ConsentDecision
from services.emr_gateway.core.use_cases import QuarantineEntry, QuarantineStatus

Cursor = psycopg2.extensions.cursor
_PAGE = 1000  # rows per statement of execute_values


def _obs_row(record_id: Any, key: str, o: Observation) -> tuple[Any, ...]:
    return (
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


def _cond_row(record_id: Any, key: str, c: Condition) -> tuple[Any, ...]:
    return (
        record_id,
        key,
        c.code.system,
        c.code.code,
        c.code.display,
        c.onset,
        c.clinical_status,
        c.source_id,
    )


def _enc_row(record_id: Any, key: str, e: Encounter) -> tuple[Any, ...]:
    return (record_id, key, e.source_id, e.class_code, e.start, e.end)


# The child rows of each stored record version go in by COPY (fibemrss/db/text_copy.py).
_OBS_COLUMNS = (
    "record_id", "patient_key", "code_system", "code", "display", "value", "unit",
    "value_system", "value_code", "effective", "source_id",
)  # fmt: skip
_COND_COLUMNS = (
    "record_id", "patient_key", "code_system", "code", "display", "onset", "clinical_status", "source_id",
)  # fmt: skip
_ENC_COLUMNS = ("record_id", "patient_key", "source_id", "class_code", "start_at", "end_at")
_UPSERT_PATIENTS = (
    "INSERT INTO patients (patient_key, sex, birth_date, age_years) VALUES %s "
    "ON CONFLICT (patient_key) DO UPDATE SET sex=COALESCE(EXCLUDED.sex, patients.sex), "
    "birth_date=COALESCE(EXCLUDED.birth_date, patients.birth_date), "
    "age_years=COALESCE(EXCLUDED.age_years, patients.age_years), updated_at=now()"
)
# The new versions: the current one of each source record superseded, the next number inserted.
# `{values}` is filled with quoted rows; child inserts may follow as further CTEs before the end.
_NEW_VERSIONS_CTES = (
    "v(s, i, h, k) AS (VALUES {values}), "
    "previous AS (UPDATE source_records r SET superseded_at = now() FROM v "
    "WHERE r.source_system = v.s AND r.source_id = v.i AND r.superseded_at IS NULL "
    "RETURNING r.source_system, r.source_id, r.version), "
    "ins AS (INSERT INTO source_records (source_system, source_id, payload_sha256, patient_key, version) "
    "SELECT v.s, v.i, v.h, v.k, coalesce(p.version, 0) + 1 FROM v "
    "LEFT JOIN previous p ON p.source_system = v.s AND p.source_id = v.i "
    "RETURNING source_system, source_id, id)"
)
_NEW_VERSIONS = "WITH " + _NEW_VERSIONS_CTES
_NEW_VERSIONS_END = " SELECT source_system, source_id, id FROM ins"
# A batch with at most this many child rows writes them in the same request as its versions
# (an MLLP group: one round trip instead of three COPYs); more go in by COPY.
INLINE_CHILD_ROWS = 64
# Each child table's columns after record_id, with their SQL types (for the inline arrays).
_CHILD_TYPES = {
    "observations": ("text", "text", "text", "text", "float8", "text", "text", "text", "timestamptz", "text"),
    "conditions": ("text", "text", "text", "text", "timestamptz", "text", "text"),
    "encounters": ("text", "text", "text", "timestamptz", "timestamptz"),
}
_QUARANTINE_INSERT = (
    "INSERT INTO quarantine (source_system, source_id, payload_sha256, patient_key, record_json, reasons) "
    "VALUES {values} ON CONFLICT DO NOTHING RETURNING source_system, source_id, payload_sha256"
)
_QUARANTINE_ROW = "(%s, %s, %s, %s, %s::jsonb, %s::text[])"
_QUARANTINE_COLUMNS = (
    "id, patient_key, record_json, reasons, status, created_at, resolved_at, resolved_by, resolution_reason"
)


def quarantine_json(record: PatientRecord, patient_key: str) -> str:
    """The record as the quarantine stores it: the core hands it over with every source id
    already a keyed hash (`ingestion.at_rest`); the patient id is the key here again, so that
    nothing else can put a raw one in."""
    return json.dumps(record_to_json(replace(record, source_patient_id=patient_key)))


def _inline_insert(
    cur: Cursor, n: int, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> str:
    """A CTE of `_NEW_VERSIONS` inserting `rows` (each keyed by its (source system, source id)) with
    the id of their new version, one array per column, in their order (ids follow it)."""
    types = _CHILD_TYPES[table]
    names = [f"c{j}" for j in range(len(types))]
    arrays = ", ".join(f"%s::{t}[]" for t in ("text", "text", *types))
    sql = (
        f", {table[0]}{n} AS (INSERT INTO {table} ({', '.join(columns)}) "
        f"SELECT ins.id, {', '.join(names)} FROM unnest({arrays}) WITH ORDINALITY "
        f"AS u(s, i, {', '.join(names)}, ord) "
        "JOIN ins ON ins.source_system = u.s AND ins.source_id = u.i ORDER BY u.ord)"
    )
    system_ids = [row[0][0] for row in rows]
    source_ids = [row[0][1] for row in rows]
    columns_of_rows = [list(column) for column in zip(*(row[1:] for row in rows), strict=True)]
    return cur.mogrify(sql, [system_ids, source_ids, *columns_of_rows]).decode()


def _values(cur: Cursor, template: str, rows: Sequence[tuple[Any, ...]]) -> bytes:
    """`rows` as the comma-separated list of a VALUES clause, each quoted by psycopg2."""
    return b",".join(cur.mogrify(template, row) for row in rows)


def _patient_rows(writes: Sequence[Write]) -> list[tuple[Any, ...]]:
    """One row per patient key (a statement may not upsert a row twice): later values win,
    as they would with one upsert per record. In key order, so that concurrent batches lock
    the rows of patients they share in the same order and cannot deadlock."""
    merged: dict[str, list[Any]] = {}
    for w in writes:
        r = w.record
        row = merged.setdefault(w.patient_key, [w.patient_key, None, None, None])
        for i, value in enumerate((r.sex, r.birth_date, r.age_years), start=1):
            if value is not None:
                row[i] = value
    return [tuple(merged[key]) for key in sorted(merged)]


def _children(writes: Sequence[Write]) -> dict[str, tuple[tuple[str, ...], list[tuple[Any, ...]]]]:
    """Each child table's columns and rows of `writes`, each row keyed by its record's (source
    system, source id) until the id of its new version is known."""
    children: dict[str, tuple[tuple[str, ...], list[tuple[Any, ...]]]] = {
        "observations": (_OBS_COLUMNS, []),
        "conditions": (_COND_COLUMNS, []),
        "encounters": (_ENC_COLUMNS, []),
    }
    for w in writes:
        key, source = w.patient_key, (w.record.provenance.source_system, w.record.provenance.source_id)
        children["observations"][1].extend(_obs_row(source, key, o) for o in w.record.observations)
        children["conditions"][1].extend(_cond_row(source, key, c) for c in w.record.conditions)
        children["encounters"][1].extend(_enc_row(source, key, e) for e in w.record.encounters)
    return children


def _child_rows(writes: Sequence[Write]) -> int:
    return sum(
        len(w.record.observations) + len(w.record.conditions) + len(w.record.encounters) for w in writes
    )


def _fits_one_request(writes: Sequence[Write]) -> bool:
    """Whether `GatewayStore._one_request` can write the batch: its child rows are few enough to go
    inline (more go by COPY), and no two of its versions name one source record (their order
    matters: the checked path writes them one by one)."""
    saves = [w.record.provenance for w in writes if not w.quarantined]
    if len({(p.source_system, p.source_id) for p in saves}) != len(saves):
        return False
    return _child_rows([w for w in writes if not w.quarantined]) <= INLINE_CHILD_ROWS


def _quarantine_row(w: Write) -> tuple[Any, ...]:
    p = w.record.provenance
    return (
        p.source_system,
        p.source_id,
        p.payload_sha256,
        w.patient_key,
        quarantine_json(w.record, w.patient_key),
        list(w.reasons),
    )


def _held_outcomes(writes: Sequence[Write], inserted: Sequence[tuple[Any, ...]]) -> list[StoreOutcome]:
    """Each write's outcome once its batch committed: a saved version is new ("accepted": a stored
    payload would have failed the batch); a quarantined record is new when the insert returned
    it, and the same record twice in one batch is stored once, the second a duplicate."""
    new = set(inserted)
    outcomes: list[StoreOutcome] = []
    for w in writes:
        if not w.quarantined:
            outcomes.append("accepted")
            continue
        p = w.record.provenance
        triple = (p.source_system, p.source_id, p.payload_sha256)
        outcomes.append("accepted" if triple in new else "duplicate")
        new.discard(triple)
    return outcomes


class GatewayStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- writes ----------------------------------------------------------------------------------
    def write_batch(self, writes: Sequence[Write]) -> list[StoreOutcome]:
        """Stores each write (a new record version, or a quarantined record; its record already
        in its form at rest, identifiers hashed) or finds it already
        stored; returns "accepted" or "duplicate" for each, in order."""
        if not writes:
            return []
        if _fits_one_request(writes):
            try:
                with self._db.one_request() as cur:
                    cur.execute(self._one_request(cur, writes))
                    return _held_outcomes(writes, cur.fetchall())
            except psycopg2.IntegrityError:
                pass  # a payload stored already, or by a concurrent writer: the checked path decides
        try:
            # No savepoint around the fast path: its two round trips cost more, batch after
            # batch, than starting the rare failed batch again in a fresh transaction.
            with self._db.transaction() as cur:
                return self._write_set_based(cur, writes)
        except psycopg2.IntegrityError:
            pass
        with self._db.transaction() as cur:
            return [self._write_one(cur, w) for w in writes]

    def _one_request(self, cur: Cursor, writes: Sequence[Write]) -> str:
        """The whole batch as one request that is its own transaction (`Database.one_request`):
        the quarantined records, the patients, the new versions and their child rows, committed
        in a single round trip (a group of MLLP messages otherwise waits on five: BEGIN, the
        quarantine, the check for stored payloads, the versions, COMMIT). It assumes that no
        payload of the batch is stored yet: one that is breaks a unique key, the server rolls
        everything back, and `_write_set_based` writes the batch again, checking first."""
        held = [w for w in writes if w.quarantined]
        saves = [w for w in writes if not w.quarantined]
        ctes: list[str] = []
        if held:
            rows = _values(cur, _QUARANTINE_ROW, [_quarantine_row(w) for w in held])
            ctes.append("q AS (" + _QUARANTINE_INSERT.replace("{values}", rows.decode()) + ")")
        upsert = ""
        if saves:
            upsert, versions = self._versions_sql(cur, saves, inline=True)
            ctes.append(versions)
        final = (
            " SELECT source_system, source_id, payload_sha256 FROM q"
            if held
            else " SELECT NULL::text, NULL::text, NULL::text WHERE false"
        )
        return (upsert + "; " if upsert else "") + "WITH " + ", ".join(ctes) + final

    def _write_one(self, cur: Cursor, w: Write) -> StoreOutcome:
        cur.execute("SAVEPOINT one")
        try:
            outcome = self._quarantine_rows(cur, [w])[0] if w.quarantined else self._save_one(cur, w)
        except psycopg2.errors.UniqueViolation:
            # A concurrent call stored the same payload first: that is a duplicate, not an error.
            cur.execute("ROLLBACK TO SAVEPOINT one")
            return "duplicate"
        cur.execute("RELEASE SAVEPOINT one")
        return outcome

    def _save_one(self, cur: Cursor, w: Write) -> StoreOutcome:
        p = w.record.provenance
        cur.execute(
            "SELECT 1 FROM source_records WHERE source_system=%s AND source_id=%s AND payload_sha256=%s",
            (p.source_system, p.source_id, p.payload_sha256),
        )
        if cur.fetchone() is not None:
            return "duplicate"
        self._insert_new(cur, [w])
        return "accepted"

    def _write_set_based(self, cur: Cursor, writes: Sequence[Write]) -> list[StoreOutcome]:
        outcomes: list[StoreOutcome] = ["duplicate"] * len(writes)
        held = [i for i, w in enumerate(writes) if w.quarantined]
        for i, outcome in zip(held, self._quarantine_rows(cur, [writes[i] for i in held]), strict=True):
            outcomes[i] = outcome
        saves = [i for i, w in enumerate(writes) if not w.quarantined]
        if not saves:
            return outcomes
        sources = [writes[i].record.provenance for i in saves]
        if len({(p.source_system, p.source_id) for p in sources}) != len(sources):
            # Two versions of one source record in one call: their order matters, go one by one.
            for i in saves:
                outcomes[i] = self._write_one(cur, writes[i])
            return outcomes
        stored = execute_values(
            cur,
            "SELECT r.source_system, r.source_id, r.payload_sha256 FROM source_records r "
            "JOIN (VALUES %s) AS v(s, i, h) ON r.source_system = v.s AND r.source_id = v.i "
            "AND r.payload_sha256 = v.h",
            [(p.source_system, p.source_id, p.payload_sha256) for p in sources],
            page_size=_PAGE,
            fetch=True,
        )
        known = set(stored)
        new = [
            i
            for i, p in zip(saves, sources, strict=True)
            if (p.source_system, p.source_id, p.payload_sha256) not in known
        ]
        self._insert_new(cur, [writes[i] for i in new])
        for i in new:
            outcomes[i] = "accepted"
        return outcomes

    def _insert_new(self, cur: Cursor, writes: Sequence[Write]) -> None:
        """Writes new versions of distinct source records (none of them stored yet)."""
        if not writes:
            return
        inline = _child_rows(writes) <= INLINE_CHILD_ROWS
        upsert, versions = self._versions_sql(cur, writes, inline)
        # One request, two statements: the patients upserted (the versions refer to them), then the
        # versions (with their child rows when few). Only the last statement's rows come back:
        # the new versions' ids.
        cur.execute(upsert + "; WITH " + versions + _NEW_VERSIONS_END)
        if inline:
            return
        record_ids = {(s, i): rid for s, i, rid in cur.fetchall()}
        for table, (columns, rows) in _children(writes).items():
            copy_rows(cur, table, columns, [(record_ids[row[0]], *row[1:]) for row in rows])

    @staticmethod
    def _versions_sql(cur: Cursor, writes: Sequence[Write], inline: bool) -> tuple[str, str]:
        """(the patients' upsert, the CTEs of the new versions): the current version of each
        source record superseded and the new one inserted with the next number (a changed
        payload under the same source id is a new version; history is kept); with `inline`, the
        child rows inserted in the same statement."""
        patients = _values(cur, "(%s, %s, %s, %s)", _patient_rows(writes))
        sources = _values(
            cur,
            "(%s, %s, %s, %s)",
            [
                (w.record.provenance.source_system, w.record.provenance.source_id,
                 w.record.provenance.payload_sha256, w.patient_key)
                for w in writes
            ],
        )  # fmt: skip
        versions = _NEW_VERSIONS_CTES.replace("{values}", sources.decode())
        if inline:
            versions += "".join(
                _inline_insert(cur, n, table, columns, rows)
                for n, (table, (columns, rows)) in enumerate(_children(writes).items())
                if rows
            )
        return _UPSERT_PATIENTS.replace("%s", patients.decode()), versions

    @staticmethod
    def _quarantine_rows(cur: Cursor, writes: Sequence[Write]) -> list[StoreOutcome]:
        if not writes:
            return []
        inserted = execute_values(
            cur,
            _QUARANTINE_INSERT.replace("{values}", "%s"),
            [_quarantine_row(w) for w in writes],
            template=_QUARANTINE_ROW,
            page_size=_PAGE,
            fetch=True,
        )
        return _held_outcomes(writes, inserted)

    # -- quarantine review ---------------------------------------------------------------------
    def list_quarantine(
        self, status: QuarantineStatus = "open", after_id: int = 0, limit: int = 100
    ) -> list[QuarantineEntry]:
        with self._db.transaction() as cur:
            cur.execute(
                f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine WHERE status = %s AND id > %s "  # noqa: S608
                "ORDER BY id LIMIT %s",
                (status, after_id, limit),
            )
            return [_entry(row) for row in cur.fetchall()]

    def get_quarantined(self, entry_id: int) -> QuarantineEntry:
        with self._db.transaction() as cur:
            cur.execute(f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine WHERE id = %s", (entry_id,))  # noqa: S608
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no quarantined record {entry_id}")
        return _entry(row)

    def resolve_quarantine(
        self,
        entry_id: int,
        accepted: PatientRecord | None,
        actor: str,
        reason: str,
        expected_sha256: str,
    ) -> tuple[QuarantineEntry, StoreOutcome | None]:
        """Accepts (storing `accepted` as a new version) or, when `accepted` is None, rejects an
        open entry; the resolution, the write and the audit row commit together or not at all."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT status, patient_key, payload_sha256 FROM quarantine WHERE id = %s FOR UPDATE",
                (entry_id,),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no quarantined record {entry_id}")
            status, key, sha = row
            if status != "open":
                raise FailedPrecondition(f"quarantined record {entry_id} is already {status}")
            if sha != expected_sha256:
                raise FailedPrecondition(f"quarantined record {entry_id} changed while it was reviewed")
            outcome: StoreOutcome | None = None
            record_id = None
            if accepted is not None:
                outcome = self._save_one(cur, Write(accepted, key))
                p = accepted.provenance
                cur.execute(
                    "SELECT id FROM source_records WHERE source_system=%s AND source_id=%s "
                    "AND payload_sha256=%s",
                    (p.source_system, p.source_id, p.payload_sha256),
                )
                record_id = one_row(cur)[0]
            new_status = "accepted" if accepted is not None else "rejected"
            cur.execute(
                "UPDATE quarantine SET status=%s, resolution=%s, resolved_at=now(), resolved_by=%s, "
                f"resolution_reason=%s, resolved_record_id=%s WHERE id=%s RETURNING {_QUARANTINE_COLUMNS}",
                (new_status, new_status, actor, reason, record_id, entry_id),
            )
            entry = _entry(one_row(cur))
            self._audit(cur, actor, f"resolve_quarantine:{new_status}", reason, f"quarantine/{entry_id}")
        return entry, outcome

    # -- audit and reads -------------------------------------------------------------------------
    @staticmethod
    def _audit(cur: Cursor, actor: str, action: str, purpose: str, subject: str) -> None:
        cur.execute(
            "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,%s,%s,%s)",
            (actor, action, purpose, subject),
        )

    # -- consent -----------------------------------------------------------------------------------
    def patient_key_for_source(self, source_system: str, source_id: str) -> str | None:
        """The patient of the stored record with this (hashed) source id, if any."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT patient_key FROM source_records WHERE source_system = %s AND source_id = %s "
                "ORDER BY version DESC LIMIT 1",
                (source_system, source_id),
            )
            row = cur.fetchone()
        return str(row[0]) if row else None

    def record_consent(self, patient_key: str, c: ConsentDecision, actor: str) -> StoreOutcome:
        """Stores the decision and its audit row in one transaction; the same Consent again is a
        duplicate (nothing written, nothing audited)."""
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO consents (patient_key, decision, decided_at, source_system, source_id, "
                "payload_sha256, recorded_by) VALUES (%s,%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (source_system, source_id, payload_sha256) DO NOTHING RETURNING id",
                (
                    patient_key,
                    c.decision,
                    c.decided_at,
                    c.source_system,
                    c.source_id,
                    c.payload_sha256,
                    actor,
                ),
            )
            if cur.fetchone() is None:
                return "duplicate"
            self._audit(cur, actor, f"consent_{c.decision}", "research", patient_key)
        return "accepted"

    def research_denied(self) -> set[str]:
        """Patients whose latest research Consent (by its dateTime, else its arrival) denies."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT patient_key FROM (SELECT DISTINCT ON (patient_key) patient_key, decision "
                "FROM consents WHERE purpose = 'research' "
                "ORDER BY patient_key, coalesce(decided_at, recorded_at) DESC, id DESC) latest "
                "WHERE decision = 'deny'"
            )
            return {str(key) for (key,) in cur.fetchall()}

    def audit(self, actor: str, action: str, purpose: str, subject: str = "") -> None:
        with self._db.transaction() as cur:
            self._audit(cur, actor, action, purpose, subject)

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
                out[table] = int(one_row(cur)[0])
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


def _entry(row: tuple[Any, ...]) -> QuarantineEntry:
    entry_id, key, record_json, reasons, status, created, resolved_at, resolved_by, why = row
    data = record_json if isinstance(record_json, dict) else json.loads(record_json)
    return QuarantineEntry(
        id=entry_id,
        patient_key=key,
        record=record_from_json(data),
        reasons=tuple(reasons),
        status=status,
        created_at=created,
        resolved_at=resolved_at,
        resolved_by=resolved_by or "",
        resolution_reason=why or "",
    )
