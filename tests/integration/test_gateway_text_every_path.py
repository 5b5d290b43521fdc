"""Text PostgreSQL cannot store (a NUL character, a lone surrogate) is refused naming its field
on every path a record can take, not only on the accepted one: a coded value's display used to be
checked nowhere, so the same record was accepted when plausible (the display is not kept) and
crashed the whole batch as INTERNAL when it went to quarantine (kept as sent, display and all)."""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg2
import pytest

from fibemrss.db.pool import Database
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.use_cases import Gateway


def patient(pid: str, display: str, systolic: float) -> list[dict[str, object]]:
    """A patient with a blood pressure (implausible at 900: quarantine) and a coded observation."""
    subject = {"reference": f"urn:uuid:{pid}"}
    return [
        {
            "fullUrl": f"urn:uuid:{pid}",
            "resource": {"resourceType": "Patient", "id": pid, "gender": "male", "birthDate": "1960-01-01"},
        },
        {
            "fullUrl": f"urn:uuid:{pid}-bp",
            "resource": {
                "resourceType": "Observation",
                "id": f"{pid}-bp",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "subject": subject,
                "effectiveDateTime": "2020-01-01T00:00:00Z",
                "valueQuantity": {
                    "value": systolic,
                    "unit": "mm[Hg]",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                },
            },
        },
        {
            "fullUrl": f"urn:uuid:{pid}-smoke",
            "resource": {
                "resourceType": "Observation",
                "id": f"{pid}-smoke",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
                "subject": subject,
                "effectiveDateTime": "2020-01-01T00:00:00Z",
                "valueCodeableConcept": {
                    "coding": [{"system": "http://snomed.info/sct", "code": "8517006", "display": display}]
                },
            },
        },
    ]


@pytest.mark.parametrize("bad", ["never\u0000smoked", "lone \ud800 surrogate"])
@pytest.mark.parametrize("systolic", [120.0, 900.0], ids=["accepted-path", "quarantine-path"])
def test_a_display_postgresql_cannot_store_is_refused_on_every_path(
    fresh_database: Callable[[str], str], bad: str, systolic: float
) -> None:
    url = fresh_database("hospital")
    db = Database(url)
    gateway = Gateway(GatewayStore(db), Pseudonymizer(b"text-on-every-path-key"))
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": patient("p1", bad, systolic) + patient("p2", "ok", systolic),
    }
    try:
        result = gateway.ingest_payload("fhir", json.dumps(bundle).encode())
    finally:
        db.close()
    fates = [o.fate for o in result.outcomes]
    assert fates[0] == "rejected", fates
    assert [v.field for v in result.outcomes[0].violations] == ["observations[1].value_code"]
    # The batch goes on: the other patient takes the path its values give it, and is stored.
    assert fates[1] == ("accepted" if systolic < 300 else "quarantined")
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM source_records) + (SELECT count(*) FROM quarantine)")
        assert cur.fetchone()[0] == 1
    conn.close()
