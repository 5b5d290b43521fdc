"""Ingestion over the hospital protocols: HL7 v2 over MLLP (messages per second, each answered
with its ACK, on 1 and 8 connections) and FHIR REST (batch Bundles) and bulk NDJSON (resources per
second), all over mutual TLS into a fresh gateway process and PostgreSQL each, as deployed.

`fibemrss bench ingest` runs these after the gRPC figures; `fibemrss bench edge-ingest` runs them
alone.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.domain.errors import InvalidArgument
from fibemrss.platform.config import TlsFiles
from fibemrss.platform.tls import client_ssl_context
from fibemrss.tools.certs import init_pki
from fibemrss.tools.commands.ingest import throwaway_gateway
from services.emr_gateway import GatewayStore
from services.emr_gateway.core.answers import hl7_ack
from services.emr_gateway.core.candidates import hl7_candidates
from services.emr_gateway.core.ingestion import Candidate, collector_paused, ingest
from services.emr_gateway.core.pseudonym import Pseudonymizer

HOSPITAL = "ingest-cli"  # the throwaway gateway's hospital
MLLP_ROUNDS = 40  # times each shared message is sent (with a fresh control id each time)
MLLP_GOAL = 1000.0  # messages per second with ACKs over 8 connections (issue 24)


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages: the benches share two cores with others."""
    return [round(x, 2) for x in os.getloadavg()]


class TimedStore:
    """The real GatewayStore, with the seconds spent in its writes added up."""

    def __init__(self, store: GatewayStore) -> None:
        self._store = store
        self.seconds = 0.0

    def write_batch(self, writes: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._store.write_batch(writes)
        finally:
            self.seconds += time.perf_counter() - start


def hl7_messages(shared_data: Path, rounds: int = MLLP_ROUNDS) -> list[bytes]:
    """The shared HL7 v2 messages, `rounds` times over, each with its own control id (MSH-10), so
    every one is a new message to store rather than a duplicate."""
    files = sorted((shared_data / "hl7v2").glob("*.hl7"))
    if not files:
        raise FileNotFoundError(f"no HL7 v2 messages under {shared_data / 'hl7v2'}")
    out: list[bytes] = []
    for r in range(rounds):
        for i, path in enumerate(files):
            text = path.read_bytes().decode("utf-8-sig")
            fields = text.split("|", 10)
            fields[9] = f"BENCH-{r}-{i}"
            out.append("|".join(fields).encode())
    return out


def as_ndjson(bundles: list[dict[str, Any]]) -> bytes:
    """Bundles' resources as a Bulk Data export writes them: one per line, grouped by type, with
    references as Type/id (NDJSON has no fullUrl to refer to)."""
    lines: dict[str, list[str]] = {}
    for bundle in bundles:
        names = {
            e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]
        }

        def rewrite(node: Any, names: dict[str, str] = names) -> Any:
            if isinstance(node, dict):
                return {k: (names.get(v, v) if k == "reference" else rewrite(v)) for k, v in node.items()}
            if isinstance(node, list):
                return [rewrite(v) for v in node]
            return node

        for e in bundle["entry"]:
            r = rewrite(e["resource"])
            lines.setdefault(r["resourceType"], []).append(json.dumps(r))
    order = ["Patient"] + sorted(t for t in lines if t != "Patient")
    return "".join(line + "\n" for t in order for line in lines[t]).encode()


def _read_ack(sock: ssl.SSLSocket, buffer: bytearray) -> bytes:
    while (end := buffer.find(b"\x1c\r")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the gateway closed the MLLP connection")
        buffer += chunk
    frame = bytes(buffer[: end + 2])
    del buffer[: end + 2]
    return frame


def _mllp_sender(address: str, context: ssl.SSLContext, messages: list[bytes], codes: Counter[str]) -> None:
    host, port = address.rsplit(":", 1)
    with context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host) as sock:
        buffer = bytearray()
        for message in messages:
            sock.sendall(b"\x0b" + message + b"\x1c\r")
            ack = _read_ack(sock, buffer)
            m = re.search(rb"\rMSA\|(A[AER])\|", ack)
            codes[m.group(1).decode() if m else "none"] += 1


def mllp_rate(
    address: str, context: ssl.SSLContext, messages: list[bytes], connections: int
) -> dict[str, Any]:
    shares = [messages[i::connections] for i in range(connections)]
    counters = [Counter[str]() for _ in shares]
    threads = [
        threading.Thread(target=_mllp_sender, args=(address, context, share, c))
        for share, c in zip(shares, counters, strict=True)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    codes: Counter[str] = sum(counters, Counter())
    return {
        "connections": connections,
        "messages": len(messages),
        "acks": dict(sorted(codes.items())),
        "seconds": round(seconds, 3),
        "messages_per_s": round(len(messages) / seconds, 1),
        "load_average": load_average(),
    }


def mllp_phases(messages: list[bytes], server_url: str, group: int = 8) -> dict[str, Any]:
    """Where a message's time goes, in process (no TLS, no sockets) on a fresh database of the same
    server, in groups of `group` as the listener commits 8 connections' messages: HL7 parsing and
    mapping, validation (rules, pseudonyms, canonical units), the group's transaction, the ACK.
    The wire figure minus their sum is TLS, framing, the event loop and the client's own share of
    the two cores."""
    database_url = ensure_database(server_url, "mllp_phases")
    migrate(database_url, "hospital")
    db = Database(database_url)
    parse = validate = ack = 0.0
    try:
        store = TimedStore(GatewayStore(db))
        pseudonyms = Pseudonymizer(b"mllp-bench-phases-key")
        for i in range(0, len(messages), group):
            with collector_paused():
                t0 = time.perf_counter()
                parsed: list[tuple[bytes, list[Candidate]]] = []
                for m in messages[i : i + group]:
                    try:
                        parsed.append((m, hl7_candidates(m)))
                    except InvalidArgument:  # refused whole: answered without a write
                        pass
                t1 = time.perf_counter()
                before = store.seconds
                outcomes = iter(ingest([c for _, cs in parsed for c in cs], store, pseudonyms))
                t2 = time.perf_counter()
                for m, cs in parsed:
                    mine = [next(outcomes) for _ in cs]
                    hl7_ack.encode_ack(hl7_ack.read_header(m), hl7_ack.ack_for_outcomes(mine), "BENCH", "H")
                t3 = time.perf_counter()
            parse += t1 - t0
            validate += (t2 - t1) - (store.seconds - before)
            ack += t3 - t2
    finally:
        db.close()
    phases = {"parse_map_s": parse, "validate_s": validate, "write_s": store.seconds, "ack_s": ack}
    total = sum(phases.values())
    return {
        "seconds": {k: round(v, 4) for k, v in phases.items()},
        "fraction": {k.removesuffix("_s"): round(v / total, 3) for k, v in phases.items()},
        "in_process_total_s": round(total, 4),
        "in_process_messages_per_s": round(len(messages) / total, 1),
        "note": f"in process, groups of {group} messages, one transaction each; fresh database",
    }


def _https(base: str, context: ssl.SSLContext) -> tuple[http.client.HTTPSConnection, str]:
    m = re.match(r"https://([^/:]+):(\d+)(/.*)?$", base)
    assert m, base
    return http.client.HTTPSConnection(m.group(1), int(m.group(2)), context=context, timeout=600), m.group(
        3
    ) or ""


def fhir_batch_rate(base: str, context: ssl.SSLContext, bundles: list[dict[str, Any]]) -> dict[str, Any]:
    conn, path = _https(base, context)
    bodies = [json.dumps({**b, "type": "batch"}).encode() for b in bundles]
    statuses: Counter[str] = Counter()
    start = time.perf_counter()
    for body in bodies:
        conn.request("POST", path, body, {"Content-Type": "application/fhir+json"})
        doc = json.loads(conn.getresponse().read())
        statuses.update(e["response"]["status"] for e in doc["entry"])
    seconds = time.perf_counter() - start
    conn.close()
    resources = sum(len(b["entry"]) for b in bundles)
    return {
        "bundles": len(bundles),
        "resources": resources,
        "statuses": dict(sorted(statuses.items())),
        "seconds": round(seconds, 3),
        "resources_per_s": round(resources / seconds, 1),
    }


def ndjson_rate(base: str, context: ssl.SSLContext, body: bytes) -> dict[str, Any]:
    conn, path = _https(base, context)
    start = time.perf_counter()
    conn.request("POST", path + "/$import", body, {"Content-Type": "application/fhir+ndjson"})
    response = conn.getresponse()
    response.read()
    status_url = response.getheader("Content-Location") or ""
    status_path = "/" + status_url.split("/", 3)[3]
    while True:
        conn.request("GET", status_path)
        r = conn.getresponse()
        manifest = r.read()
        if r.status != 202:
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    conn.close()
    doc = json.loads(manifest)
    lines = int(doc["extension"]["lines"])
    return {
        "lines": lines,
        "fates": doc["extension"]["fates"],
        "seconds": round(seconds, 3),
        "resources_per_s": round(lines / seconds, 1),
    }


def run_edge_ingest_bench(shared_data: Path) -> dict[str, Any]:
    bundle_files = sorted((shared_data / "fhir_r4").glob("*.json"))
    bundles = [json.loads(p.read_text()) for p in bundle_files]
    messages = hl7_messages(shared_data)
    with tempfile.TemporaryDirectory(prefix="fibemrss-edge-bench-") as tmp:
        pki = Path(tmp)
        init_pki(pki, [f"gateway@{HOSPITAL}", f"operator@{HOSPITAL}"])

        def files(identity: str) -> TlsFiles:
            return TlsFiles(str(pki / "ca.crt"), str(pki / f"{identity}.crt"), str(pki / f"{identity}.key"))

        server = files(f"gateway@{HOSPITAL}")
        env = {
            "FIBEMRSS_TLS_CA": server.ca,
            "FIBEMRSS_TLS_CERT": server.cert,
            "FIBEMRSS_TLS_KEY": server.key,
            "FIBEMRSS_MLLP_LISTEN": "127.0.0.1:0",
            "FIBEMRSS_HTTP_LISTEN": "127.0.0.1:0",
        }
        context = client_ssl_context(files(f"operator@{HOSPITAL}"))
        out: dict[str, Any] = {}
        for connections in (1, 8):
            with throwaway_gateway(env) as gateway:
                out[f"mllp_{connections}"] = mllp_rate(gateway.edges["mllp"], context, messages, connections)
                if connections == 8:
                    phases = mllp_phases(messages, gateway.database_url)
        wire = out["mllp_8"]["seconds"]
        phases["wire_tls_and_scheduling_s"] = round(max(0.0, wire - phases["in_process_total_s"]), 4)
        out["mllp_8"]["phases"] = phases
        out["mllp_8"]["goal_messages_per_s"] = MLLP_GOAL
        out["mllp_8"]["goal_met"] = out["mllp_8"]["messages_per_s"] >= MLLP_GOAL
        with throwaway_gateway(env) as gateway:
            out["fhir_rest_batch"] = fhir_batch_rate(gateway.edges["fhir"], context, bundles)
        with throwaway_gateway(env) as gateway:
            out["ndjson_import"] = ndjson_rate(gateway.edges["fhir"], context, as_ndjson(bundles))
    return out

