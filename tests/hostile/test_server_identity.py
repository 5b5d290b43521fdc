"""Clients pin the identity of the server they call: a certificate of the federation's own CA
that names another service (an agent's, another hospital's gateway) is refused, with an error
naming the expected and the presented identity (fibemrss/platform/channels.py)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.admin import ensure_database
from fibemrss.domain.errors import ConfigError, DomainError
from fibemrss.platform.authorization import check_hospital_name
from fibemrss.platform.channels import ServerIdentityMismatch, open_channel
from fibemrss.platform.config import ServerConfig
from fibemrss.platform.server import RunningServer, start_server
from fibemrss.tools.certs import init_pki
from fibemrss.tools.commands.certs import parse_hostnames
from fibemrss.tools.service_process import ServiceProcess, base_env
from services.hospital_agent.adapters.grpc_adapters import GrpcAggregator, GrpcGateway
from tests.hostile.conftest import Federation, StartAggregator
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def serve_as(federation: Federation) -> Iterator[dict[str, RunningServer]]:
    """A real gRPC server (health only) over loopback with mutual TLS, one per certificate."""
    servers: dict[str, RunningServer] = {}
    for identity in ("aggregator@central", "agent@b", "gateway@a", "gateway@b"):
        config = ServerConfig("127.0.0.1:0", "127.0.0.1:0", federation.tls(identity), None)
        servers[identity] = start_server("pose", lambda server, registry: [], config)
    yield servers
    for running in servers.values():
        running.stop(grace=0)


def _check(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest()
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status)


def test_each_certificate_names_only_its_own_service(federation: Federation) -> None:
    def dns(identity: str) -> list[str]:
        cert = x509.load_pem_x509_certificate(open(federation.tls(identity).cert, "rb").read())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return sorted(san.get_values_for_type(x509.DNSName))

    assert dns("aggregator@central") == ["aggregator.central.fibemrss", "localhost"]
    assert dns("agent@a") == ["agent.a.fibemrss", "localhost"]
    assert dns("operator@a") == ["operator.a.fibemrss"]  # a client only: no host to serve as


def test_the_right_server_is_accepted(federation: Federation, serve_as: dict[str, RunningServer]) -> None:
    address = serve_as["aggregator@central"].address
    with open_channel(address, federation.tls("agent@a"), server="aggregator@central") as ch:
        assert _check(ch) == health_pb2.HealthCheckResponse.SERVING
    address = serve_as["gateway@a"].address
    with open_channel(address, federation.tls("agent@a"), server="gateway@a") as ch:
        assert _check(ch) == health_pb2.HealthCheckResponse.SERVING


def test_a_server_with_an_agents_certificate_is_refused_by_the_agents_aggregator_client(
    federation: Federation, serve_as: dict[str, RunningServer]
) -> None:
    address = serve_as["agent@b"].address
    with open_channel(address, federation.tls("agent@a"), server="aggregator@central") as ch:
        with pytest.raises(ServerIdentityMismatch) as raised:
            _check(ch)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (raised.value.expected, raised.value.presented) == ("aggregator@central", "agent@b")
        # What the agent's loop reports (its status and log): both identities, by name.
        with pytest.raises(DomainError) as domain:
            GrpcAggregator(ch, "t", "a").current_round(None)
        assert "aggregator@central" in str(domain.value) and "agent@b" in str(domain.value)
    # Unpinned, the same certificate would have been taken for the aggregator: the pin matters.
    with open_channel(address, federation.tls("agent@a")) as ch:
        assert _check(ch) == health_pb2.HealthCheckResponse.SERVING


def test_a_gateway_of_another_hospital_is_refused(
    federation: Federation, serve_as: dict[str, RunningServer]
) -> None:
    address = serve_as["gateway@b"].address
    with open_channel(address, federation.tls("agent@a"), server="gateway@a") as ch:
        with pytest.raises(DomainError) as domain:  # a streaming call: the stream's failure
            list(GrpcGateway(ch, "t").training_examples("training"))
        message = str(domain.value)
        assert "expected gateway@a" in message and "certificate of gateway@b" in message


def test_the_cli_pins_the_service_it_names(
    federation: Federation, serve_as: dict[str, RunningServer]
) -> None:
    tls = federation.tls("operator@central")
    args = ["--tls-ca", tls.ca, "--tls-cert", tls.cert, "--tls-key", tls.key]

    def status(address: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            "-m",
            "fibemrss.tools.cli",
            "federation",
            "status",
            "--aggregator",
            address,
        ]
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)

    posing = status(serve_as["gateway@b"].address)
    assert posing.returncode == 1
    assert "UNAUTHENTICATED" in posing.stderr and "certificate of gateway@b" in posing.stderr
    assert "expected aggregator@central" in posing.stderr and "Traceback" not in posing.stderr
    # The real aggregator's certificate passes the pin (the server has no aggregator service).
    real = status(serve_as["aggregator@central"].address)
    assert "UNIMPLEMENTED" in real.stderr, real.stderr


def test_a_real_agent_refuses_an_aggregator_posing_with_an_agents_certificate(
    start_aggregator: StartAggregator,
    federation: Federation,
    postgres_server: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    stolen = federation.tls("agent@b")
    posing = start_aggregator(FIBEMRSS_TLS_CERT=stolen.cert, FIBEMRSS_TLS_KEY=stolen.key)
    tls = federation.tls("agent@a")
    env = base_env()
    env.update(
        DATABASE_URL=ensure_database(postgres_server, f"agent_{uuid.uuid4().hex[:12]}"),
        FIBEMRSS_HOSPITAL="a",
        FIBEMRSS_HE_CONTEXT=str(federation.keys / "hospital.he"),
        FIBEMRSS_AGGREGATOR=posing.address,
        FIBEMRSS_GATEWAY=posing.address,
        FIBEMRSS_TLS_CA=tls.ca,
        FIBEMRSS_TLS_CERT=tls.cert,
        FIBEMRSS_TLS_KEY=tls.key,
    )
    with ServiceProcess("agent@a", env, tmp_path_factory.mktemp("agent")) as agent:
        with federation.channel(agent.address, "operator@a") as ch:
            stub = federation_pb2_grpc.HospitalAgentServiceStub(ch)

            def refused_agent_b() -> pb.AgentStatus | None:
                status = stub.GetAgentStatus(pb.GetAgentStatusRequest(), timeout=10).status
                return status if "agent@b" in status.error else None

            status = wait_until(refused_agent_b, 60, "the agent refusing agent@b's certificate", interval=0.5)
        assert "certificate of agent@b" in status.error, status
        assert "expected aggregator@central" in status.error or "expected gateway@a" in status.error
        assert agent.running()


def test_host_names_go_to_the_certificate_of_the_identity_they_are_given_for(tmp_path: Path) -> None:
    hostnames = parse_hostnames("gateway@a=fibemrss-emr-gateway,gateway@a=gw.a.svc")
    paths = init_pki(tmp_path, ["gateway@a", "agent@a", "operator@a"], hostnames)

    def dns(identity: str) -> set[str]:
        cert = x509.load_pem_x509_certificate(paths[identity].cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return set(san.get_values_for_type(x509.DNSName))

    assert {"fibemrss-emr-gateway", "gw.a.svc"} <= dns("gateway@a")
    assert not dns("agent@a") & {"fibemrss-emr-gateway", "gw.a.svc"}
    with pytest.raises(ValueError, match="IDENTITY=NAME"):
        parse_hostnames("fibemrss-emr-gateway")  # a bare name would go to every certificate
    with pytest.raises(ValueError, match="operator@a does not serve"):
        init_pki(tmp_path / "x", ["operator@a"], {"operator@a": ["ehr.example"]})
    with pytest.raises(ConfigError, match="DNS"):
        check_hospital_name("Cleveland_1")
