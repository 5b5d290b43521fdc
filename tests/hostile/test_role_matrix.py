"""The role matrix of DESIGN.md as a table: every RPC of every service, called by every role of
the hospital, of another hospital and of the central site, against real service processes over
mutual TLS. A refused call is PERMISSION_DENIED (UNAUTHENTICATED for a certificate naming no
<role>@<site>); an allowed one gets past authorization (any other code: the requests are empty).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.api.federation.v1 import federation_pb2
from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve_pb2
from fibemrss.db.pool import Database
from fibemrss.he.keys import write_private_file
from fibemrss.platform.capacity import SMALL_REQUEST_BYTES, request_limit
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import TlsFiles
from fibemrss.platform.server import MAX_MESSAGE_BYTES
from fibemrss.platform.status_mapping import field_violations
from fibemrss.platform.tls import client_ssl_context
from fibemrss.tools.certs import CertificateAuthority, init_pki, issue_certificate, private_key_pem
from fibemrss.tools.local_cluster import LocalCluster, db_name
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

H = "h"
ROLES = ("operator", "ingest", "agent", "inference", "ehr", "gateway")
CALLERS = [
    *(f"{role}@{site}" for site in (H, "other") for role in ROLES),
    "operator@central",
    "aggregator@central",
    "agent@central",
    "mallory",  # a certificate of the federation's CA that names no <role>@<site>
]
# The CA's signing refuses these two identities (tests/unit/test_certificate_requests.py); they
# stand for certificates that a CA ignoring its rules issued, to show the servers refuse them too.
OUTSIDE_THE_CA_RULES = ("agent@central", "mallory")
# DESIGN.md's matrix, written out here on its own so the test does not check the code against itself.
ALLOWED: dict[str, set[str]] = {
    # ingest@h (EHR interfaces) may ingest and nothing else; operator@h keeps ingesting too.
    "fibemrss.emr.v1.EmrGatewayService/Ingest": {"ingest@h", "operator@h"},
    "fibemrss.emr.v1.EmrGatewayService/GetIngestStats": {"operator@h"},
    "fibemrss.emr.v1.EmrGatewayService/ListQuarantine": {"operator@h"},
    "fibemrss.emr.v1.EmrGatewayService/ResolveQuarantine": {"operator@h"},
    "fibemrss.emr.v1.EmrGatewayService/StreamTrainingExamples": {"agent@h"},
    "fibemrss.emr.v1.EmrGatewayService/GetPatient": {"inference@h"},
    "fibemrss.emr.v1.EmrGatewayService/ReviewStudy": {"operator@h"},
    "fibemrss.emr.v1.EmrGatewayService/DecideStudy": {"operator@h"},
    "fibemrss.federation.v1.HospitalAgentService/GetAgentStatus": {"operator@h"},
    "fibemrss.inference.v1.DiagnosisService/Diagnose": {"ehr@h"},
    "fibemrss.inference.v1.DiagnosisService/DiagnoseBatch": {"ehr@h"},
    **{
        f"inference.GRPCInferenceService/{m.name}": {"ehr@h"}
        for m in kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    },
    # At the aggregator "agent@<hospital>" is any hospital's agent; the servicer then checks that
    # it acts for its own hospital (tests/e2e/test_federation_e2e.py).
    "fibemrss.federation.v1.AggregatorService/StartFederation": {"operator@central"},
    "fibemrss.federation.v1.AggregatorService/GetRound": {"agent@h", "agent@other", "operator@central"},
    "fibemrss.federation.v1.AggregatorService/SubmitUpdate": {"agent@h", "agent@other"},
    "fibemrss.federation.v1.AggregatorService/FetchAggregate": {"agent@h", "agent@other"},
    "fibemrss.federation.v1.AggregatorService/PublishMaskKey": {"agent@h", "agent@other"},
    "fibemrss.federation.v1.AggregatorService/GetMaskKeys": {"agent@h", "agent@other"},
    "fibemrss.federation.v1.AggregatorService/PostRoundMessage": {"agent@h", "agent@other"},
    "fibemrss.federation.v1.AggregatorService/GetRoundStage": {"agent@h", "agent@other"},
    "fibemrss.federation.v1.AggregatorService/FetchUpload": {"agent@h", "agent@other"},
    "fibemrss.federation.v1.AggregatorService/GetFederationStatus": {
        "agent@h",
        "agent@other",
        "operator@h",
        "operator@other",
        "operator@central",
    },
    "fibemrss.federation.v1.AggregatorService/ProposeStudy": {"operator@central"},
    "fibemrss.federation.v1.AggregatorService/GetStudyProposal": {
        "agent@h",
        "agent@other",
        "operator@h",
        "operator@other",
        "operator@central",
    },
    "grpc.health.v1.Health/Check": {c for c in CALLERS if c != "mallory"},
}
SERVICES: dict[str, ServiceDescriptor] = {
    "gateway": emr_pb2.DESCRIPTOR.services_by_name["EmrGatewayService"],
    "agent": federation_pb2.DESCRIPTOR.services_by_name["HospitalAgentService"],
    "inference-diagnosis": inference_pb2.DESCRIPTOR.services_by_name["DiagnosisService"],
    "inference-kserve": kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    "aggregator": federation_pb2.DESCRIPTOR.services_by_name["AggregatorService"],
}
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    work = tmp_path_factory.mktemp("roles")
    c = LocalCluster(work, (H,))
    pki = work / "pki"
    init_pki(pki, sorted({*c.identities(), *CALLERS} - set(OUTSIDE_THE_CA_RULES)))  # the cluster keeps it
    ca = CertificateAuthority.load(pki)
    for identity in OUTSIDE_THE_CA_RULES:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = issue_certificate(ca, key.public_key(), identity)
        (pki / f"{identity}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        write_private_file(pki / f"{identity}.key", private_key_pem(key))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _tls(work: Path, identity: str) -> TlsFiles:
    pki = work / "pki"
    return TlsFiles(str(pki / "ca.crt"), str(pki / f"{identity}.crt"), str(pki / f"{identity}.key"))


def _address(cluster: LocalCluster, server: str) -> str:
    role = {"inference-diagnosis": "inference", "inference-kserve": "inference"}.get(server, server)
    name = "aggregator@central" if role == "aggregator" else f"{role}@{H}"
    return cluster.processes[name].address


def _call(channel: grpc.Channel, method: MethodDescriptor) -> grpc.StatusCode:
    """Calls `method` with an empty request; the status code it ends with."""
    request = message_factory.GetMessageClass(method.input_type)()
    return _call_raw(channel, method, request.SerializeToString())[0]


def _cases() -> list[tuple[str, MethodDescriptor]]:
    out = [(server, m) for server, service in SERVICES.items() for m in service.methods]
    return out + [(server, HEALTH) for server in ("gateway", "agent", "inference-diagnosis", "aggregator")]


def test_every_rpc_of_every_service_answers_every_role_as_the_matrix_says(cluster: LocalCluster) -> None:
    cases = _cases()
    assert {f"{m.containing_service.full_name}/{m.name}" for _, m in cases} == set(ALLOWED)
    wrong: list[str] = []
    for caller in CALLERS:
        channels: dict[str, grpc.Channel] = {}
        try:
            for server, method in cases:
                if server not in channels:
                    channels[server] = open_channel(_address(cluster, server), _tls(cluster.workdir, caller))
                code = _call(channels[server], method)
                name = f"{method.containing_service.full_name}/{method.name}"
                allowed = caller in ALLOWED[name]
                refused = code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
                if allowed == refused:
                    wrong.append(f"{caller} -> {server} {name}: {code.name}")
                if not allowed and caller == "mallory" and code != grpc.StatusCode.UNAUTHENTICATED:
                    wrong.append(f"{caller} -> {server} {name}: {code.name}, not UNAUTHENTICATED")
        finally:
            for ch in channels.values():
                ch.close()
    assert wrong == []


def _padded(size: int) -> bytes:
    """A request message of exactly `size` bytes: one unknown length-delimited field (number
    4095), which every request type decodes as empty."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes([*out, n])

    tag = varint(4095 << 3 | 2)
    length = size - len(tag) - 1
    while len(tag) + len(varint(length)) + length != size:
        length -= 1
    return tag + varint(length) + b"x" * length


def _call_raw(channel: grpc.Channel, method: MethodDescriptor, data: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if method.client_streaming:
            channel.stream_unary(path, **kwargs)(iter([data]), timeout=30)
        elif method.server_streaming:
            call = channel.unary_stream(path, **kwargs)(data, timeout=30)
            try:
                next(call, None)
            finally:
                call.cancel()
        else:
            channel.unary_unary(path, **kwargs)(data, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_rpc_refuses_a_request_above_its_own_size_limit_before_decoding_it(
    cluster: LocalCluster,
) -> None:
    """Per-RPC message-size limits, called by a role each RPC allows: one byte over the RPC's limit
    is RESOURCE_EXHAUSTED naming the limit; a request of exactly the limit gets past it. The bulk
    RPCs whose limit is the channel's own (Ingest, SubmitUpdate: 64 MiB) are bounded by grpc."""
    small = SMALL_REQUEST_BYTES
    assert request_limit("/fibemrss.inference.v1.DiagnosisService/Diagnose") == small
    assert request_limit("/fibemrss.inference.v1.DiagnosisService/DiagnoseBatch") > small
    wrong: list[str] = []
    checked = 0
    for server, method in _cases():
        name = f"{method.containing_service.full_name}/{method.name}"
        limit = request_limit(name)
        if limit >= MAX_MESSAGE_BYTES:
            continue
        caller = sorted(ALLOWED[name])[0]
        with open_channel(_address(cluster, server), _tls(cluster.workdir, caller)) as ch:
            code, details = _call_raw(ch, method, _padded(limit + 1))
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED or f"at most {limit} bytes" not in details:
                wrong.append(f"{caller} -> {name}, {limit + 1} bytes: {code.name} {details!r}")
            code, details = _call_raw(ch, method, _padded(limit))
            if code in (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
            ):
                wrong.append(f"{caller} -> {name}, {limit} bytes: {code.name} {details!r}")
        checked += 1
    assert wrong == []
    assert checked >= 25  # every RPC but the two bulk ones, and each server's health check


def test_inference_reads_a_patient_only_for_a_named_caller_who_is_what_the_gateway_audits(
    cluster: LocalCluster,
) -> None:
    with open_channel(_address(cluster, "gateway"), _tls(cluster.workdir, "operator@h")) as ch:
        ingested = emr_pb2_grpc.EmrGatewayServiceStub(ch).Ingest(
            emr_pb2.IngestRequest(
                csv=emr_pb2.CsvExport(
                    profile="uci-processed",
                    content=b"63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n",
                    source_name="t",
                )
            ),
            timeout=30,
        )
    key = ingested.outcomes[0].patient_key
    assert key
    with open_channel(_address(cluster, "gateway"), _tls(cluster.workdir, "inference@h")) as ch:
        stub = emr_pb2_grpc.EmrGatewayServiceStub(ch)
        for on_behalf_of in ("", "ehr@other", "mallory"):
            with pytest.raises(grpc.RpcError) as unnamed:
                stub.GetPatient(
                    emr_pb2.GetPatientRequest(patient_key=key, purpose="p", on_behalf_of=on_behalf_of),
                    timeout=10,
                )
            assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [f for f, _ in field_violations(unnamed.value)] == ["on_behalf_of"]
    # Through the inference service, the caller is named for it: ehr@h's read is audited as ehr@h.
    with open_channel(_address(cluster, "inference-diagnosis"), _tls(cluster.workdir, "ehr@h")) as ch:
        try:
            inference_pb2_grpc.DiagnosisServiceStub(ch).Diagnose(
                inference_pb2.DiagnoseRequest(patient_key=key), timeout=30
            )
        except grpc.RpcError as exc:  # no model is published in this cluster: the read still happened
            assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), exc
    db = Database(cluster.database_url_for(db_name(H)))
    try:
        with db.transaction() as cur:
            cur.execute("SELECT actor FROM audit_log WHERE action='read_patient' AND subject=%s", (key,))
            assert cur.fetchall() == [("ehr@h via inference@h",)]
    finally:
        db.close()


# The other ingest edges of the gateway, by the same rule (authorization.INGEST_METHOD): MLLP,
# FHIR REST (a bundle, a resource, an NDJSON $import and its status); its capability statement
# is read under GetIngestStats, the operator's.
HL7 = (
    b"MSH|^~\\&|LAB|H|FIBEMRSS|H|20260101120000||ORU^R01|roles-1|P|2.5\r"
    b"PID|1||roles-mrn-1^^^H^MR||Doe^Jane||19700101|F\r"
    b"OBR|1|||24331-1^Lipid panel^LN\r"
    b"OBX|1|NM|2093-3^Cholesterol^LN||212|mg/dL|||||F\r"
)
BUNDLE = {
    "resourceType": "Bundle",
    "type": "batch",
    "entry": [
        {
            "resource": {
                "resourceType": "Patient",
                "id": "roles-p1",
                "gender": "female",
                "birthDate": "1970-01-01",
            }
        }
    ],
}
NDJSON = b'{"resourceType": "Patient", "id": "roles-p2", "gender": "male", "birthDate": "1960-05-05"}\n'


def _mllp(cluster: LocalCluster, caller: str) -> tuple[str, str]:
    """(MSA-1, MSA-3) of the ACK the gateway's MLLP edge gives `caller` for one message."""
    host, port = cluster.processes[f"gateway@{H}"].edges["mllp"].rsplit(":", 1)
    context = client_ssl_context(_tls(cluster.workdir, caller))
    with context.wrap_socket(
        socket.create_connection((host, int(port)), timeout=30), server_hostname=host
    ) as s:
        s.sendall(b"\x0b" + HL7 + b"\x1c\r")
        raw = b""
        while not raw.endswith(b"\x1c\r"):
            chunk = s.recv(65536)
            assert chunk, "the MLLP edge closed without an ACK"
            raw += chunk
    msa = next(seg for seg in raw.strip(b"\x0b\x1c\r").decode().split("\r") if seg.startswith("MSA|"))
    fields = msa.split("|")
    return fields[1], fields[3] if len(fields) > 3 else ""


def _fhir(cluster: LocalCluster, caller: str) -> dict[str, int]:
    """The HTTP status of each FHIR REST call of the gateway's edge, made as `caller`."""
    base = cluster.processes[f"gateway@{H}"].edges["fhir"]
    codes: dict[str, int] = {}
    with httpx.Client(
        base_url=base, verify=client_ssl_context(_tls(cluster.workdir, caller)), timeout=60
    ) as c:
        codes["bundle"] = c.post("", json=BUNDLE).status_code
        patient = {"resourceType": "Patient", "id": "roles-p3", "gender": "male", "birthDate": "1950-02-02"}
        codes["resource"] = c.post("/Patient", json=patient).status_code
        started = c.post("/$import", content=NDJSON, headers={"Content-Type": "application/fhir+ndjson"})
        codes["import"] = started.status_code
        if started.status_code == 202:
            status_url = started.headers["Content-Location"]
            r = wait_until(
                lambda: (answer := c.get(status_url)).status_code != 202 and answer, 60, "the import's status"
            )
            codes["import-status"] = r.status_code
        codes["metadata"] = c.get("/metadata").status_code
    return codes


def test_ingest_at_h_ingests_through_every_edge_and_nothing_else(cluster: LocalCluster) -> None:
    """ingest@h: MLLP, FHIR REST and NDJSON import accepted (its gRPC Ingest and the refusal of
    every other RPC are in the matrix above); another hospital's ingest, or an agent, refused."""
    ack, text = _mllp(cluster, f"ingest@{H}")
    assert ack == "AA", text
    assert _fhir(cluster, f"ingest@{H}") == {
        "bundle": 200,
        "resource": 201,
        "import": 202,
        "import-status": 200,
        "metadata": 403,  # the capability statement is the operator's read (GetIngestStats)
    }
    ack, _ = _mllp(cluster, f"operator@{H}")
    assert ack == "AA"  # the operator keeps every ingest path
    for caller in ("ingest@other", f"agent@{H}", f"ehr@{H}"):
        ack, text = _mllp(cluster, caller)
        assert ack == "AR" and "refused" in text, (caller, ack, text)
        assert set(_fhir(cluster, caller).values()) == {403}, caller
