"""Ingestion throughput: Synthea FHIR bundles through the gateway over gRPC into PostgreSQL (and,
in `edges`, MLLP, FHIR REST and NDJSON: `edge_ingest_bench.py`).

Run: `fibemrss bench ingest [--shared-data ../shared/data] [--json out.json]`.

The gateway runs as its own process (as deployed) over a fresh embedded PostgreSQL. The anchor is
PostgreSQL's own bulk path measured in the same run on the same server: `COPY` of exactly the rows
the gateway stored (patients, source records, observations, conditions, encounters) into empty
copies of those tables with the same indexes. `ratio` is how close the whole gateway (gRPC,
JSON parsing, normalization, validation, pseudonyms, idempotency checks, versioning) comes to it.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import psycopg2

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.domain.normalize import fhir_r4
from fibemrss.platform.channels import open_channel
from fibemrss.tools.bench.edge_ingest_bench import TimedStore, load_average, run_edge_ingest_bench
from fibemrss.tools.commands.ingest import throwaway_gateway
from services.emr_gateway import GatewayStore
from services.emr_gateway.core.candidates import bundle_candidates
from services.emr_gateway.core.ingestion import collector_paused, ingest
from services.emr_gateway.core.pseudonym import Pseudonymizer

TABLES = ("patients", "source_records", "observations", "conditions", "encounters")
GOAL_RATIO = 0.25  # of COPY of the same rows (issue 24)
MAPPED = ("Patient", "Encounter", "Observation", "Condition")


def _bundles(shared_data: Path) -> list[bytes]:
    files = sorted((shared_data / "fhir_r4").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no FHIR bundles under {shared_data / 'fhir_r4'}")
    return [f.read_bytes() for f in files]


def _count_resources(bundles: list[bytes]) -> tuple[int, int]:
    """(every resource in the bundles, the Patient/Encounter/Observation/Condition ones)."""
    total = mapped = 0
    for content in bundles:
        for entry in json.loads(content).get("entry", []):
            total += 1
            mapped += entry.get("resource", {}).get("resourceType") in MAPPED
    return total, mapped


def _copy_anchor(database_url: str) -> tuple[int, float]:
    """(rows, seconds) of COPY of the stored rows into empty copies of their tables."""
    conn = psycopg2.connect(database_url)
    try:
        dumps: dict[str, str] = {}
        with conn, conn.cursor() as cur:
            for table in TABLES:
                buf = io.StringIO()
                cur.copy_expert(f"COPY {table} TO STDOUT", buf)
                dumps[table] = buf.getvalue()
                cur.execute(f"CREATE TABLE bench_{table} (LIKE {table} INCLUDING ALL)")
        rows = sum(d.count("\n") for d in dumps.values())
        start = time.perf_counter()
        with conn, conn.cursor() as cur:
            for table in TABLES:
                cur.copy_expert(f"COPY bench_{table} FROM STDIN", io.StringIO(dumps[table]))
        seconds = time.perf_counter() - start
        with conn, conn.cursor() as cur:
            for table in TABLES:
                cur.execute(f"DROP TABLE bench_{table}")
        return rows, seconds
    finally:
        conn.close()


def phase_breakdown(bundles: list[bytes], server_url: str) -> dict[str, Any]:
    """Where one bundle's time goes, measured in process (no gRPC) on a fresh database of the same
    server: JSON decode, FHIR mapping to the shared schema, validation (required fields,
    plausibility, pseudonyms, canonical form, in-batch duplicates), and the database writes. The
    gRPC figure minus their sum is the transport and servicer (protobuf, the response)."""
    database_url = ensure_database(server_url, "ingest_phases")
    migrate(database_url, "hospital")
    db = Database(database_url)
    try:
        store = TimedStore(GatewayStore(db))
        pseudonyms = Pseudonymizer(b"ingest-bench-phases-key")
        decode = mapping = ingest_total = 0.0
        for content in bundles:
            # As the gateway ingests a payload: its decoder, the collector paused (`collector_paused`).
            with collector_paused():
                t0 = time.perf_counter()
                loaded = fhir_r4.read_json(content)
                t1 = time.perf_counter()
                candidates = bundle_candidates(fhir_r4.parse_bundle_object(loaded))
                t2 = time.perf_counter()
                ingest(candidates, store, pseudonyms)
                t3 = time.perf_counter()
            decode += t1 - t0
            mapping += t2 - t1
            ingest_total += t3 - t2
    finally:
        db.close()
    phases = {
        "decode_json_s": decode,
        "map_fhir_s": mapping,
        "validate_s": ingest_total - store.seconds,
        "write_s": store.seconds,
    }
    total = sum(phases.values())
    return {
        "seconds": {k: round(v, 4) for k, v in phases.items()},
        "fraction": {k.removesuffix("_s"): round(v / total, 3) for k, v in phases.items()},
        "in_process_total_s": round(total, 4),
        "note": "in process, one bundle per call as the gRPC bench sends them; fresh database",
    }


def run_ingest_bench(shared_data: Path, edges: bool = True) -> dict[str, Any]:
    """The gRPC figures, then (with `edges`) MLLP, FHIR REST and NDJSON over mutual TLS."""
    out = run_grpc_ingest_bench(shared_data)
    if edges:
        out["edges"] = run_edge_ingest_bench(shared_data)
        ndjson = out["edges"]["ndjson_import"]["resources_per_s"]
        out["edges"]["ndjson_vs_grpc"] = round(ndjson / out["resources_per_s"], 3)
    return out


def run_grpc_ingest_bench(shared_data: Path) -> dict[str, Any]:
    bundles = _bundles(shared_data)
    resources, mapped = _count_resources(bundles)
    load_before = load_average()
    with throwaway_gateway() as gateway, open_channel(gateway.address) as channel:
        stub = emr_pb2_grpc.EmrGatewayServiceStub(channel)
        # One small call first, so connection set-up is not timed.
        stub.GetIngestStats(emr_pb2.GetIngestStatsRequest(), timeout=30)
        start = time.perf_counter()
        accepted = 0
        for content in bundles:
            response = stub.Ingest(
                emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=content)), timeout=300
            )
            accepted += response.accepted
        seconds = time.perf_counter() - start
        rows, copy_seconds = _copy_anchor(gateway.database_url)
        phases = phase_breakdown(bundles, gateway.database_url)
    phases["grpc_transport_and_servicer_s"] = round(max(0.0, seconds - phases["in_process_total_s"]), 4)
    resources_per_s = resources / seconds
    copy_rows_per_s = rows / copy_seconds
    # The whole ingest may take this long at the goal: the phases beyond it hold the miss.
    budget = resources / (GOAL_RATIO * copy_rows_per_s)
    phases["budget_at_goal_s"] = round(budget, 4)
    phases["largest"] = max(phases["seconds"], key=phases["seconds"].get).removesuffix("_s")
    return {
        "bundles": len(bundles),
        "accepted": accepted,
        "resources": resources,
        "mapped_resources": mapped,
        "stored_rows": rows,
        "ingest_seconds": round(seconds, 3),
        "copy_seconds": round(copy_seconds, 4),
        "resources_per_s": round(resources_per_s, 1),
        "mapped_resources_per_s": round(mapped / seconds, 1),
        "stored_rows_per_s": round(rows / seconds, 1),
        "copy_rows_per_s": round(copy_rows_per_s, 1),
        "ratio": round(resources_per_s / copy_rows_per_s, 3),
        "goal_ratio": GOAL_RATIO,
        "goal_met": resources_per_s / copy_rows_per_s >= GOAL_RATIO,
        "load_average": {"before": load_before, "after": load_average()},
        "stored_rows_ratio": round((rows / seconds) / copy_rows_per_s, 3),
        "phases": phases,
    }

