"""Ingestion over the hospital protocols: HL7 v2 over MLLP (messages per second, each answered
with its ACK, on 1 and 8 connections) and FHIR REST (batch Bundles) and bulk NDJSON (resources per
second), all over mutual TLS into a fresh gateway process and PostgreSQL each, as deployed.

`fibemrss bench ingest` runs these after the gRPC figures; `python -m
fibemrss.tools.bench.edge_ingest_bench` runs them alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fibemrss.platform.config import TlsFiles
from fibemrss.platform.tls import client_ssl_context
from fibemrss.tools.certs import init_pki
from fibemrss.tools.commands.ingest import throwaway_gateway
from fibemrss.tools.paths import DEFAULT_SHARED_DATA

HOSPITAL = "ingest-cli"  # the throwaway gateway's hospital
MLLP_ROUNDS = 40  # times each shared message is sent (with a fresh control id each time)


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
        with throwaway_gateway(env) as gateway:
            out["fhir_rest_batch"] = fhir_batch_rate(gateway.edges["fhir"], context, bundles)
        with throwaway_gateway(env) as gateway:
            out["ndjson_import"] = ndjson_rate(gateway.edges["fhir"], context, as_ndjson(bundles))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared-data", default=str(DEFAULT_SHARED_DATA))
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = run_edge_ingest_bench(Path(args.shared_data))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
