"""A FHIR `$import` is written a batch of patient groups at a time, each batch one transaction: a
gateway killed (SIGKILL) in the middle of an import leaves whole batches stored and nothing of the
others, and the same import sent again to the restarted gateway stores the rest, answering the
stored records `duplicate` and writing nothing twice. A real gateway process over loopback."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg2
import pytest

from fibemrss.db.admin import ensure_database
from fibemrss.tools.service_process import ServiceProcess, base_env
from services.emr_gateway.edges.fhir_rest import GROUPS_PER_WRITE
from tests.waiting import wait_until

PATIENTS = 12 * GROUPS_PER_WRITE  # twelve batches: time to kill the gateway between two of them


def _ndjson(patients: int) -> bytes:
    lines = []
    for p in range(patients):
        pid = f"crash-{p}"
        lines.append({"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1960-01-01"})
        for code, unit, value in (
            ("8867-4", "/min", 72),
            ("2093-3", "mg/dL", 210),
            ("8480-6", "mm[Hg]", 128),
        ):
            lines.append(
                {
                    "resourceType": "Observation",
                    "id": f"{pid}-{code}",
                    "status": "final",
                    "subject": {"reference": f"Patient/{pid}"},
                    "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                    "effectiveDateTime": "2020-01-01T00:00:00Z",
                    "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit},
                }
            )
    # One file per resource type, as bulk exports write them: a patient's lines far apart.
    lines.sort(key=lambda r: r["resourceType"] != "Patient")
    return b"".join(json.dumps(r).encode() + b"\n" for r in lines)


def _count(url: str, table: str) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 - a table name of this test
        (n,) = cur.fetchone()
    conn.close()
    return int(n)


@pytest.fixture
def gateway_env(postgres_server: str) -> Iterator[dict[str, str]]:
    env = base_env()
    env.update(
        DATABASE_URL=ensure_database(postgres_server, f"crash_{uuid.uuid4().hex[:12]}"),
        FIBEMRSS_PSEUDONYM_KEY="2" * 64,
        FIBEMRSS_HOSPITAL="crash",
        FIBEMRSS_HTTP_PLAINTEXT_LISTEN="127.0.0.1:0",
    )
    yield env


def _import(base: str, body: bytes) -> str:
    r = httpx.post(f"{base}/$import", content=body, timeout=120)
    assert r.status_code == 202, r.text
    return str(r.headers["Content-Location"])


def test_a_gateway_killed_mid_import_keeps_whole_batches_and_the_retry_writes_nothing_twice(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    body = _ndjson(PATIENTS)
    url = gateway_env["DATABASE_URL"]
    with ServiceProcess("gateway@crash", gateway_env, tmp_path / "first") as gateway:
        status = _import(gateway.edges["fhir"], body)
        deadline = time.monotonic() + 300
        while True:  # until at least one batch is written, then the process is killed at once
            r = httpx.get(status, timeout=30)
            assert r.status_code == 202, "the import finished before the gateway could be killed"
            done = int(r.headers["X-Progress"].split()[0])
            if done > 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert gateway.process is not None
        gateway.process.kill()
        gateway.process.wait(timeout=30)
    stored = _count(url, "source_records")
    # Whole batches only: every patient of a batch, with every observation of each.
    assert 0 < stored < PATIENTS and stored % GROUPS_PER_WRITE == 0, stored
    assert _count(url, "observations") == 3 * stored
    with ServiceProcess("gateway@crash", gateway_env, tmp_path / "second") as gateway:
        status = _import(gateway.edges["fhir"], body)
        r = wait_until(
            lambda: (answer := httpx.get(status, timeout=30)).status_code != 202 and answer,
            300,
            "the import's status",
        )
        assert r.status_code == 200, r.text
        fates = r.json()["extension"]["fates"]
    # Lines: a Patient line and three Observation lines per patient, each with its patient's fate.
    assert fates == {"duplicate": 4 * stored, "accepted": 4 * (PATIENTS - stored)}, fates
    assert _count(url, "source_records") == _count(url, "patients") == PATIENTS
    assert _count(url, "observations") == 3 * PATIENTS
