"""A real agent process whose loop keeps failing (its gateway is down): it stays up, says why in its
status, counts the failures, and its own health service says NOT_SERVING."""

from __future__ import annotations

import socket
import uuid

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.tools.service_process import ServiceProcess, base_env
from fibemrss.tools.study_review import document_of
from tests.hostile.conftest import Federation, StartAggregator
from tests.waiting import wait_until

AGENT_SERVICE = "fibemrss.federation.v1.HospitalAgentService"


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket closes


def test_an_agent_whose_gateway_is_down_reports_it_and_is_not_serving(
    start_aggregator: StartAggregator,
    federation: Federation,
    postgres_server: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    aggregator = start_aggregator()
    with federation.channel(aggregator.address, "operator@central") as ch:
        # A proposed study, approved at the hospital (recorded here: its gateway is the one down).
        federation_pb2_grpc.AggregatorServiceStub(ch).ProposeStudy(
            pb.ProposeStudyRequest(document=document_of(HEART_DISEASE_V1)), timeout=10
        )
        federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
            pb.StartFederationRequest(
                min_contributors=1, task="heart-disease-v1", rounds=1, quorum=1, hospitals=["a"]
            ),
            timeout=10,
        )
    tls = federation.tls("agent@a")
    database_url = ensure_database(postgres_server, f"agent_{uuid.uuid4().hex[:12]}")
    migrate(database_url, "hospital")
    db = Database(database_url)
    StudyStore(db).record_decision(HEART_DISEASE_V1, "approved", "", 303, "operator@a")
    db.close()
    env = base_env()
    env.update(
        DATABASE_URL=database_url,
        FIBEMRSS_HOSPITAL="a",
        FIBEMRSS_HE_CONTEXT=str(federation.keys / "hospital.he"),
        FIBEMRSS_AGGREGATOR=aggregator.address,
        FIBEMRSS_GATEWAY=_closed_port(),
        FIBEMRSS_TLS_CA=tls.ca,
        FIBEMRSS_TLS_CERT=tls.cert,
        FIBEMRSS_TLS_KEY=tls.key,
    )
    with ServiceProcess("agent@a", env, tmp_path_factory.mktemp("agent")) as agent:
        with federation.channel(agent.address, "operator@a") as ch:
            status_stub = federation_pb2_grpc.HospitalAgentServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)

            def failed_twice() -> pb.AgentStatus | None:
                status = status_stub.GetAgentStatus(pb.GetAgentStatusRequest(), timeout=10).status
                return status if status.consecutive_failures >= 2 else None

            status = wait_until(failed_twice, 60, "the agent's second failed attempt", interval=0.5)
            assert status.consecutive_failures >= 2, status  # retried, not dead
            assert "UNAVAILABLE" in status.error and not status.done
            check = health.Check(health_pb2.HealthCheckRequest(service=AGENT_SERVICE), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # The process itself stays up and answers: it is shown failing, not restarted in a loop.
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        assert agent.running()
