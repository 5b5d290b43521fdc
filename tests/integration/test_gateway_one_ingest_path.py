"""One ingest use case for every edge: HL7 v2 messages as MLLP batches them, FHIR bundles as the
REST and NDJSON edges group them, and the gRPC payloads all write through `Gateway._ingest`, so
every record's fate reaches the same hook (`on_outcomes`, which the service counts as
`fibemrss_ingested_records_total{fate}`: MLLP and REST traffic used to be missing from it), and
each unit's details are bounded as if it came alone. Real PostgreSQL, the shared test data."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence

from fibemrss.db.pool import Database
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.ingestion import Outcome
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.use_cases import Gateway
from tests.conftest import shared_file


def test_every_edge_counts_every_record_through_one_hook(fresh_database: Callable[[str], str]) -> None:
    hl7_files = sorted(shared_file("hl7v2").glob("*.hl7"))
    fhir_files = sorted(shared_file("fhir_r4").glob("*.json"))[:3]
    seen: Counter[str] = Counter()

    def count(outcomes: Sequence[Outcome]) -> None:
        seen.update(o.fate for o in outcomes)

    db = Database(fresh_database("hospital"))
    try:
        gateway = Gateway(GatewayStore(db), Pseudonymizer(b"one-ingest-path-test-key"), on_outcomes=count)
        answered: Counter[str] = Counter()
        # MLLP's batch of waiting messages
        for r in gateway.ingest_messages("hl7v2", [p.read_bytes() for p in hl7_files]):
            if not isinstance(r, Exception):
                answered.update(o.fate for o in r.outcomes)
        assert sum(seen.values()) == sum(answered.values()) > 0
        # FHIR REST batches and NDJSON groups
        bundles = [json.loads(p.read_text()) for p in fhir_files]
        for b in gateway.ingest_fhir_bundles(bundles):
            if not isinstance(b, Exception):
                answered.update(o.fate for o in b.outcomes)
        # the gRPC payload: the same bundles again, each record now a duplicate
        for p in fhir_files:
            answered.update(o.fate for o in gateway.ingest_payload("fhir", p.read_bytes()).outcomes)
    finally:
        db.close()
    assert seen == answered  # every fate of every edge, once
    assert seen["duplicate"] >= len(fhir_files) and seen["accepted"] > 0
