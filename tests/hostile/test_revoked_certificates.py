"""One stolen certificate: what its thief can do until the federation CA revokes it, and that
every edge refuses it after, on connections it opened before (docs/security.md, "The holder of
any one certificate").

A real cluster (aggregator, gateway, agent and inference of hospital h as processes, mutual TLS
everywhere, each service given the CA's revocation list, FIBEMRSS_TLS_CRL). The thief holds a
copy of `agent@h`'s and `ingest@h`'s certificates and keys. Before the revocation it is
answered on gRPC (aggregator and gateway), MLLP and FHIR REST: the code before revocation lists
answered it like that until the certificates expired, a year on. The CA's operator runs
`fibemrss certs revoke` (the real CLI); within seconds, without a restart, the thief's open
channel, MLLP connection and HTTP keep-alive connection are refused naming the revocation, while
the hospital's other identities and a newly issued `agent@h` certificate are answered.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.federation.v1 import federation_pb2, federation_pb2_grpc
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import TlsFiles
from fibemrss.platform.tls import client_ssl_context
from fibemrss.tools.certs import (
    CRL_FILE,
    CertificateAuthority,
    init_pki,
    private_key_pem,
    request_certificate,
    revoke,
    sign_request,
)
from fibemrss.tools.local_cluster import LocalCluster
from fibemrss.tools.service_process import ServiceProcess, base_env
from tests.waiting import wait_until

H = "h"
HL7 = (
    b"MSH|^~\\&|LAB|H|FIBEMRSS|H|20260101120000||ORU^R01|stolen-%d|P|2.5\r"
    b"PID|1||stolen-mrn-%d^^^H^MR||Doe^Jane||19700101|F\r"
    b"OBR|1|||24331-1^Lipid panel^LN\r"
    b"OBX|1|NM|2093-3^Cholesterol^LN||212|mg/dL|||||F\r"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("revocation"), (H,))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def stolen(cluster: LocalCluster, identity: str, thief: Path) -> TlsFiles:
    """The thief's copy of `identity`'s certificate and key."""
    thief.mkdir(exist_ok=True)
    pki = cluster.workdir / "pki"
    for suffix in (".crt", ".key"):
        shutil.copy(pki / f"{identity}{suffix}", thief / f"{identity}{suffix}")
    return TlsFiles(str(pki / "ca.crt"), str(thief / f"{identity}.crt"), str(thief / f"{identity}.key"))


class Mllp:
    """One MLLP connection over mutual TLS, kept open as an interface engine keeps it."""

    def __init__(self, address: str, tls: TlsFiles) -> None:
        host, port = address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=30)
        self.sock = client_ssl_context(tls).wrap_socket(raw, server_hostname=host)
        self.sent = 0

    def send(self) -> tuple[str, str]:
        """(MSA-1, MSA-3) of the ACK to one new message."""
        self.sent += 1
        self.sock.sendall(b"\x0b" + HL7 % (self.sent, self.sent) + b"\x1c\r")
        raw = b""
        while not raw.endswith(b"\x1c\r"):
            chunk = self.sock.recv(65536)
            assert chunk, "the MLLP edge closed without an ACK"
            raw += chunk
        msa = next(s for s in raw.strip(b"\x0b\x1c\r").decode().split("\r") if s.startswith("MSA|"))
        fields = msa.split("|")
        return fields[1], fields[3] if len(fields) > 3 else ""

    def close(self) -> None:
        self.sock.close()


def health(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def get_round(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    """An RPC `agent@h` may call at the aggregator (no federation runs: NOT_FOUND, answered)."""
    try:
        federation_pb2_grpc.AggregatorServiceStub(channel).GetRound(
            federation_pb2.GetRoundRequest(task="heart-disease-v1"), timeout=20
        )
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def revoked_uses(process: ServiceProcess) -> float:
    """`fibemrss_revoked_certificate_uses_total` on the service's /metrics."""
    text = urllib.request.urlopen(f"http://{process.metrics}/metrics", timeout=10).read().decode()
    (line,) = [row for row in text.splitlines() if row.startswith("fibemrss_revoked_certificate_uses_total ")]
    return float(line.split()[1])


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fibemrss.tools.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_stolen_certificate_is_answered_until_revoked_then_refused_on_every_edge(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    pki = cluster.workdir / "pki"
    assert (pki / CRL_FILE).exists(), "the cluster's services enforce the CA's list from the start"
    agent = stolen(cluster, f"agent@{H}", tmp_path / "thief")
    ingest = stolen(cluster, f"ingest@{H}", tmp_path / "thief")
    gateway = cluster.processes[f"gateway@{H}"]
    aggregator_channel = open_channel(
        cluster.processes["aggregator@central"].address, agent, server="aggregator@central"
    )
    gateway_channel = open_channel(gateway.address, agent, server=f"gateway@{H}")
    mllp = Mllp(gateway.edges["mllp"], ingest)
    fhir = httpx.Client(base_url=gateway.edges["fhir"], verify=client_ssl_context(ingest), timeout=60)
    patient = {"resourceType": "Patient", "id": "stolen-p1", "gender": "female", "birthDate": "1970-01-01"}
    try:
        assert revoked_uses(gateway) == 0
        # Before: the thief is every bit the hospital's agent and its EHR interface.
        assert health(aggregator_channel)[0] == grpc.StatusCode.OK
        code, details = get_round(aggregator_channel)
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), details
        assert health(gateway_channel)[0] == grpc.StatusCode.OK
        assert mllp.send()[0] == "AA"
        assert fhir.post("/Patient", json=patient).status_code == 201

        out = cli(
            "certs", "revoke", "--ca-dir", str(pki), "--cert", agent.cert, "--cert", ingest.cert,
            "--reason", "key-compromise",
        )  # fmt: skip
        assert '"crl_number": 2' in out, out

        # After: the same channel, connection and keep-alive connection, refused naming why.
        code, details = wait_until(
            lambda: (answer := get_round(aggregator_channel))[0] == grpc.StatusCode.UNAUTHENTICATED and answer,
            15,
            "the aggregator refusing the revoked certificate",
        )
        assert f"agent@{H}" in details and "revoked by the federation CA" in details, details
        assert health(aggregator_channel)[0] == grpc.StatusCode.UNAUTHENTICATED
        code, details = wait_until(
            lambda: (answer := health(gateway_channel))[0] == grpc.StatusCode.UNAUTHENTICATED and answer,
            15,
            "the gateway refusing the revoked certificate",
        )
        assert "revoked" in details, details
        ack, text = wait_until(
            lambda: (answer := mllp.send())[0] == "AR" and answer, 15, "the MLLP edge refusing the revoked certificate"
        )
        assert f"ingest@{H}" in text and "revoked" in text, text
        refused = fhir.post("/Patient", json={**patient, "id": "stolen-p2"})
        assert refused.status_code == 401, refused.text
        assert "revoked" in refused.json()["error"] and f"ingest@{H}" in refused.json()["error"]
        # Each refusal is counted where the alert FibemrssRevokedCertificateInUse looks.
        assert revoked_uses(cluster.processes["aggregator@central"]) >= 2
        assert revoked_uses(gateway) >= 3  # gRPC, MLLP and HTTPS all count
    finally:
        mllp.close()
        fhir.close()
        aggregator_channel.close()
        gateway_channel.close()

    # The hospital's other identities are answered; so is the agent's newly issued certificate.
    operator = TlsFiles(str(pki / "ca.crt"), str(pki / f"operator@{H}.crt"), str(pki / f"operator@{H}.key"))
    honest = Mllp(gateway.edges["mllp"], operator)
    try:
        assert honest.send()[0] == "AA"
    finally:
        honest.close()
    key, csr = request_certificate(f"agent@{H}")
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    certificate = sign_request(CertificateAuthority.load(pki), csr.public_bytes(serialization.Encoding.PEM))
    (renewed / "agent.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (renewed / "agent.key").write_bytes(private_key_pem(key))
    fresh = TlsFiles(str(pki / "ca.crt"), str(renewed / "agent.crt"), str(renewed / "agent.key"))
    with open_channel(cluster.processes["aggregator@central"].address, fresh, server="aggregator@central") as ch:
        code, details = get_round(ch)
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), details


def test_a_service_given_a_list_the_federation_ca_did_not_sign_refuses_to_start(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """A forged list (here, one another CA signed) could lift revocations: the service stops at
    start-up, exit code 2, naming the variable, instead of serving without the CA's list."""
    init_pki(tmp_path / "other", ["agent@x"])
    forged = revoke(tmp_path / "other")
    pki = cluster.workdir / "pki"
    env = {
        **base_env(),
        "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
        "FIBEMRSS_HE_CONTEXT": str(cluster.workdir / "keys" / "aggregator.he"),
        "FIBEMRSS_TLS_CA": str(pki / "ca.crt"),
        "FIBEMRSS_TLS_CERT": str(pki / "aggregator@central.crt"),
        "FIBEMRSS_TLS_KEY": str(pki / "aggregator@central.key"),
        "FIBEMRSS_TLS_CRL": str(forged),
    }
    refused = ServiceProcess("aggregator@central", env, tmp_path / "work")
    assert refused.exit_code_of_start() == 2
    log = refused.log_tail()
    assert f"FIBEMRSS_TLS_CRL={forged}" in log and "not signed by the federation CA" in log, log
