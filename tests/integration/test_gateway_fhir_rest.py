"""FHIR R4 REST on the gateway over HTTPS with client certificates, into real PostgreSQL: the shared
Synthea bundles as batch and transaction and as a bulk NDJSON import; every answer validated
against FHIR R4 with `fhir.resources` (its R4B models: R4B changed none of these resources)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from starlette.applications import Starlette

from fibemrss.db.pool import Database
from fibemrss.platform.authorization import hospital_policy
from fibemrss.platform.config import EdgeListen, TlsFiles
from fibemrss.platform.http_server import start_http
from fibemrss.platform.tls import client_ssl_context
from fibemrss.tools.bench.edge_ingest_bench import as_ndjson
from fibemrss.tools.certs import init_pki
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.use_cases import Gateway
from services.emr_gateway.edges.fhir_rest import FhirRest
from tests.conftest import SHARED_DATA, shared_file
from tests.waiting import wait_until

HOSPITAL = "h"
KEY = b"fhir-rest-test-pseudonym-key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    init_pki(out, [f"gateway@{HOSPITAL}", f"operator@{HOSPITAL}", f"agent@{HOSPITAL}", "operator@other"])
    return out


def tls(pki: Path, identity: str) -> TlsFiles:
    return TlsFiles(str(pki / "ca.crt"), str(pki / f"{identity}.crt"), str(pki / f"{identity}.key"))


@dataclass
class Fhir:
    base: str
    url: str
    pki: Path

    def client(self, identity: str = f"operator@{HOSPITAL}") -> httpx.Client:
        return httpx.Client(
            base_url=self.base, verify=client_ssl_context(tls(self.pki, identity)), timeout=120
        )

    def count(self, table: str) -> int:
        with psycopg2.connect(self.url) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return int(cur.fetchone()[0])


@pytest.fixture
def fhir_server(fresh_database: Callable[[str], str], pki: Path) -> Iterator[Fhir]:
    url = fresh_database("hospital")
    db = Database(url)
    rest = FhirRest(Gateway(GatewayStore(db), Pseudonymizer(KEY)), hospital_policy(HOSPITAL))
    http = start_http(
        "fhir-test",
        Starlette(routes=rest.routes()),
        EdgeListen("127.0.0.1", 0, tls(pki, f"gateway@{HOSPITAL}")),
    )
    try:
        yield Fhir(http.base_url + "/fhir", url, pki)
    finally:
        http.stop()
        rest.close()
        db.close()


def synthea() -> list[dict[str, Any]]:
    shared_file("fhir_r4")
    return [json.loads(p.read_text()) for p in sorted((SHARED_DATA / "fhir_r4").glob("*.json"))]


def valid_bundle(doc: dict[str, Any]) -> Bundle:
    bundle = Bundle.model_validate(doc)
    for entry in doc["entry"]:
        OperationOutcome.model_validate(entry["response"]["outcome"])
    return bundle


def test_capability_statement_is_valid_r4(fhir_server: Fhir) -> None:
    with fhir_server.client() as client:
        r = client.get("/metadata")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    cs = CapabilityStatement.model_validate(r.json())
    assert cs.fhirVersion == "4.0.1"
    assert {i.code for i in cs.rest[0].interaction} == {"batch", "transaction"}


def test_synthea_bundles_as_batch_then_transaction(fhir_server: Fhir) -> None:
    bundles = synthea()
    fates: Counter[str] = Counter()
    with fhir_server.client() as client:
        for bundle in bundles:
            r = client.post("", json={**bundle, "type": "batch"})
            assert r.status_code == 200, r.text[:500]
            doc = r.json()
            valid_bundle(doc)
            assert doc["type"] == "batch-response"
            assert len(doc["entry"]) == len(bundle["entry"])
            for request, answer in zip(bundle["entry"], doc["entry"], strict=True):
                status = answer["response"]["status"]
                fates[status] += 1
                if request["resource"]["resourceType"] == "Patient":
                    assert status in ("201 Created", "202 Accepted")
                    assert (
                        answer["response"].get("location", "").startswith("Patient/")
                        or status == "202 Accepted"
                    )
        patients = fhir_server.count("patients") + fhir_server.count("quarantine")
        assert patients == len(bundles)
        before = (fhir_server.count("source_records"), fhir_server.count("observations"))
        for bundle in bundles:
            r = client.post("", json=bundle)  # Synthea's own type: transaction
            assert r.status_code == 200
            doc = r.json()
            valid_bundle(doc)
            assert doc["type"] == "transaction-response" and len(doc["entry"]) == len(bundle["entry"])
            patient = next(
                a
                for q, a in zip(bundle["entry"], doc["entry"], strict=True)
                if q["resource"]["resourceType"] == "Patient"
            )
            assert patient["response"]["status"] in ("200 OK", "202 Accepted")  # already stored
        assert (fhir_server.count("source_records"), fhir_server.count("observations")) == before
    assert fates["201 Created"] > 0 and fates["200 OK"] > 0  # stored, and not-mapped types said so


def test_ndjson_import_gives_one_outcome_per_line(fhir_server: Fhir) -> None:
    bundles = synthea()
    body = as_ndjson(bundles)
    n_lines = body.count(b"\n")
    with fhir_server.client() as client:
        r = client.post("/$import", content=body, headers={"Content-Type": "application/fhir+ndjson"})
        assert r.status_code == 202, r.text
        OperationOutcome.model_validate(r.json())
        status_url = r.headers["Content-Location"]

        def finished() -> httpx.Response | None:
            answer = client.get(status_url)
            assert answer.status_code != 202 or "X-Progress" in answer.headers
            return answer if answer.status_code != 202 else None

        r = wait_until(finished, 120, "the import's status")
        assert r.status_code == 200, r.text
        manifest = r.json()
        assert manifest["extension"]["lines"] == n_lines
        outcomes = client.get(manifest["output"][0]["url"]).text.splitlines()
    assert len(outcomes) == n_lines == manifest["output"][0]["count"]
    docs = [json.loads(line) for line in outcomes]
    for doc in docs:
        OperationOutcome.model_validate(doc)
    assert [d["id"] for d in docs] == [f"line-{i}" for i in range(1, n_lines + 1)]
    assert fhir_server.count("patients") + fhir_server.count("quarantine") == len(bundles)
    patient_lines = [
        d
        for d, line in zip(docs, body.splitlines(), strict=True)
        if b'"resourceType": "Patient"' in line[:40]
    ]
    assert len(patient_lines) == len(bundles)
    assert all(d["issue"][0]["code"] in ("informational", "business-rule") for d in patient_lines)
    rejected = [d for d in docs if d["issue"][0]["severity"] == "error"]
    assert manifest["extension"]["rejected"] == len(rejected)
    # Re-importing the same lines changes nothing: every record is a duplicate.
    before = (fhir_server.count("source_records"), fhir_server.count("observations"))
    with fhir_server.client() as client:
        status_url = client.post("/$import", content=body).headers["Content-Location"]
        r = wait_until(
            lambda: (answer := client.get(status_url)).status_code != 202 and answer,
            120,
            "the import's status",
        )
        fates = r.json()["extension"]["fates"]
    assert "accepted" not in fates and fates["duplicate"] > 0
    assert (fhir_server.count("source_records"), fhir_server.count("observations")) == before


BAD_BUNDLE = {
    "resourceType": "Bundle",
    "type": "batch",
    "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"}},
        {
            "resource": {
                "resourceType": "Observation",
                "id": "o1",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
                "subject": {"reference": "Patient/p1"},
                "valueQuantity": {
                    "value": "abc",
                    "unit": "mg/dL",
                    "system": "http://unitsofmeasure.org",
                    "code": "mg/dL",
                },
            }
        },
        {"resource": {"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1960-05-05"}},
    ],
}


def test_a_bad_field_rejects_its_patient_naming_the_field(fhir_server: Fhir) -> None:
    with fhir_server.client() as client:
        doc = client.post("", json=BAD_BUNDLE).json()
        valid_bundle(doc)
        statuses = [e["response"]["status"] for e in doc["entry"]]
        assert statuses == ["400 Bad Request", "400 Bad Request", "201 Created"]
        expressions = [
            x for i in doc["entry"][1]["response"]["outcome"]["issue"] for x in i.get("expression", [])
        ]
        assert "Bundle.entry[1].resource.valueQuantity.value" in expressions
        assert fhir_server.count("patients") == 1

        # As a transaction: all or nothing, one OperationOutcome naming the field.
        r = client.post("", json={**BAD_BUNDLE, "type": "transaction"})
        assert r.status_code == 400
        outcome = OperationOutcome.model_validate(r.json())
        assert any(
            "Bundle.entry[1].resource.valueQuantity.value" in (i.expression or []) for i in outcome.issue
        )
        assert fhir_server.count("patients") == 1

        r = client.post("", content=b"{not json")
        assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Bundle"]


def test_single_resources(fhir_server: Fhir) -> None:
    patient = BAD_BUNDLE["entry"][0]["resource"]
    with fhir_server.client() as client:
        r = client.post("/Patient", json=patient)
        assert r.status_code == 201 and r.headers["Location"] == "Patient/p1"
        OperationOutcome.model_validate(r.json())
        assert client.post("/Patient", json=patient).status_code == 200  # a duplicate
        r = client.post("/Observation", json=BAD_BUNDLE["entry"][1]["resource"])
        assert r.status_code == 400
        expressions = [x for i in r.json()["issue"] for x in i.get("expression", [])]
        assert "Observation.subject.reference" in expressions
        assert client.post("/Claim", json={"resourceType": "Claim"}).status_code == 404
        r = client.post("/Patient", json={"resourceType": "Observation"})
        assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Patient.resourceType"]


@pytest.mark.parametrize("identity", [f"agent@{HOSPITAL}", "operator@other"])
def test_only_the_hospitals_operator_may_ingest(fhir_server: Fhir, identity: str) -> None:
    with fhir_server.client(identity) as client:
        r = client.post("", json=BAD_BUNDLE)
    assert r.status_code == 403
    assert OperationOutcome.model_validate(r.json()).issue[0].code == "forbidden"
    assert fhir_server.count("source_records") == 0


def consent(cid: str, decision: str, when: str, patient: str = "Patient/p1") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "dateTime": when,
        "provision": {"type": decision},
    }


def exported(fhir: Fhir) -> set[str]:
    db = Database(fhir.url)
    try:
        gateway = Gateway(GatewayStore(db), Pseudonymizer(KEY))
        return {e.patient_key for e in gateway.training_examples("agent@h", "heart-disease-v1", "training")}
    finally:
        db.close()


def test_a_research_denial_removes_the_patient_from_training_until_permitted(fhir_server: Fhir) -> None:
    with fhir_server.client() as client:
        ok = {**BAD_BUNDLE, "entry": [BAD_BUNDLE["entry"][0], BAD_BUNDLE["entry"][2]]}
        doc = client.post("", json=ok).json()
        assert [e["response"]["status"] for e in doc["entry"]] == ["201 Created", "201 Created"]
        everyone = exported(fhir_server)
        assert len(everyone) == 2

        r = client.post("/Consent", json=consent("c1", "deny", "2026-01-01T10:00:00Z"))
        assert r.status_code == 201, r.text
        OperationOutcome.model_validate(r.json())
        assert client.post("/Consent", json=consent("c1", "deny", "2026-01-01T10:00:00Z")).status_code == 200
        remaining = exported(fhir_server)
        assert len(remaining) == 1 and remaining < everyone
        (denied,) = everyone - remaining

        r = client.post("/Consent", json=consent("c2", "permit", "2026-02-01T10:00:00Z"))
        assert r.status_code == 201
        assert exported(fhir_server) == everyone

        # Bad Consents name the field; one about a patient never seen says so.
        bad = {**consent("c3", "maybe", "yesterday"), "status": "draft"}
        r = client.post("/Consent", json=bad)
        assert r.status_code == 400
        fields = {x for i in r.json()["issue"] for x in i.get("expression", [])}
        assert fields == {"Consent.status", "Consent.provision.type", "Consent.dateTime"}
        r = client.post("/Consent", json=consent("c4", "deny", "2026-03-01T10:00:00Z", "Patient/nobody"))
        assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Consent.patient.reference"]
    with psycopg2.connect(fhir_server.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT action, subject FROM audit_log WHERE action LIKE 'consent%%' ORDER BY id")
        rows = cur.fetchall()
    assert ("consent_deny", denied) in rows and ("consent_permit", denied) in rows
    assert any(action == "consent_excluded" for action, _ in rows)
    assert fhir_server.count("consents") == 2


def test_imports_beyond_the_pending_cap_are_refused_before_their_body_is_held(
    fresh_database: Callable[[str], str], pki: Path
) -> None:
    """Each accepted import holds its body (up to 512 MiB) until it runs: with one import still
    running, the next is 429 with an OperationOutcome saying why (`throttled`); once it finished, a
    new one is taken. The cap is 2 in service; 1 here, so one long import is enough."""
    url = fresh_database("hospital")
    db = Database(url)
    rest = FhirRest(
        Gateway(GatewayStore(db), Pseudonymizer(KEY)), hospital_policy(HOSPITAL), max_pending_imports=1
    )
    http = start_http(
        "fhir-test",
        Starlette(routes=rest.routes()),
        EdgeListen("127.0.0.1", 0, tls(pki, f"gateway@{HOSPITAL}")),
    )
    fhir = Fhir(http.base_url + "/fhir", url, pki)
    body = as_ndjson(synthea() * 3)  # seconds of work for the one import runner
    try:
        with fhir.client() as client:
            first = client.post("/$import", content=body)
            assert first.status_code == 202, first.text
            refused = client.post("/$import", content=b"{}\n")
            assert refused.status_code == 429, refused.text
            outcome = OperationOutcome.model_validate(refused.json())
            assert outcome.issue[0].code == "throttled" and "still running" in (
                outcome.issue[0].diagnostics or ""
            )
            wait_until(
                lambda: client.get(first.headers["Content-Location"]).status_code != 202,
                120,
                "the first import's status",
            )
            assert (
                client.post("/$import", content=b'{"resourceType": "Patient", "id": "late"}\n').status_code
                == 202
            )
    finally:
        http.stop()
        rest.close()
        db.close()


def test_an_import_of_more_lines_than_the_cap_is_refused_naming_the_body(
    fresh_database: Callable[[str], str], pki: Path
) -> None:
    """Lines are counted as the body arrives: one more than the cap (2,000,000 in service; 5 here)
    is 400 on `body` and nothing is stored; as many as the cap, the last without its newline, run."""
    url = fresh_database("hospital")
    db = Database(url)
    rest = FhirRest(
        Gateway(GatewayStore(db), Pseudonymizer(KEY)), hospital_policy(HOSPITAL), max_import_lines=5
    )
    http = start_http(
        "fhir-test",
        Starlette(routes=rest.routes()),
        EdgeListen("127.0.0.1", 0, tls(pki, f"gateway@{HOSPITAL}")),
    )
    fhir = Fhir(http.base_url + "/fhir", url, pki)
    lines = [
        json.dumps({"resourceType": "Patient", "id": f"l{i}", "gender": "male"}).encode() for i in range(6)
    ]
    try:
        with fhir.client() as client:
            for body in (b"\n".join(lines), b"\n".join(lines[:5]) + b"\n\n"):
                refused = client.post("/$import", content=body)
                assert refused.status_code == 400, refused.text
                outcome = OperationOutcome.model_validate(refused.json())
                assert outcome.issue[0].expression == ["Bundle.body"]
                assert (outcome.issue[0].diagnostics or "").startswith("more than 5 lines")
            assert fhir.count("source_records") == 0
            accepted = client.post("/$import", content=b"\n".join(lines[:5]))
            assert accepted.status_code == 202, accepted.text
            r = wait_until(
                lambda: (answer := client.get(accepted.headers["Content-Location"])).status_code != 202
                and answer,
                60,
                "the import's status",
            )
            assert r.json()["extension"]["fates"] == {"accepted": 5}
    finally:
        http.stop()
        rest.close()
        db.close()
