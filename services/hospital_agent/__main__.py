"""Entry point of a hospital's agent: wiring only. It holds the hospital's HE secret key."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Gauge

from fibemrss.api.federation.v1 import federation_pb2, federation_pb2_grpc
from fibemrss.db.migrate import migrate
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.db.privacy_ledger import PrivacyLedger
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.study import study_hash
from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import load_hospital_key
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.platform.authorization import CENTRAL, hospital_policy
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig, env_str, task_from_env
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.server import RunningServer, serve_until_signalled, start_server
from services.hospital_agent.adapters.grpc_adapters import GrpcAggregator, GrpcGateway
from services.hospital_agent.adapters.local_secrets import LocalSecretStore
from services.hospital_agent.core.aggregate_bounds import AggregateBounds
from services.hospital_agent.core.protocol import Participation
from services.hospital_agent.edges.grpc_servicer import HospitalAgentServicer


def main() -> None:
    config = ServerConfig.from_env()
    hospital = env_str("FIBEMRSS_HOSPITAL")
    task = task_from_env()
    database_url = env_str("DATABASE_URL")
    key = load_hospital_key(Path(env_str("FIBEMRSS_HE_CONTEXT")).read_bytes())
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "hospital")
    db = Database(database_url)
    agent_service = federation_pb2.DESCRIPTOR.services_by_name["HospitalAgentService"].full_name
    health: dict[str, RunningServer] = {}

    def on_health(reason: str) -> None:
        # The agent's own service says whether its federation loop works; the process stays
        # SERVING (it answers status) so a failing loop is shown, not restarted in a loop.
        if "server" in health:
            state = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if reason
                else health_pb2.HealthCheckResponse.SERVING
            )
            health["server"].health.set(agent_service, state)

    # With mutual TLS the agent signs its round mask keys with its certificate's key and checks
    # every peer's against the federation CA (docs/he-codec.md, "Signed round keys").
    tls = config.tls
    signer = None if tls is None else MaskKeySigner(Path(tls.cert).read_bytes(), Path(tls.key).read_bytes())
    verifier = None if tls is None else MaskKeyVerifier(Path(tls.ca).read_bytes())
    participation = Participation(
        hospital,
        task,
        # Each peer must present its own identity's certificate (fibemrss/platform/channels.py).
        gateway=GrpcGateway(
            open_channel(env_str("FIBEMRSS_GATEWAY"), config.tls, server=f"gateway@{hospital}"), task.name
        ),
        aggregator=GrpcAggregator(
            open_channel(env_str("FIBEMRSS_AGGREGATOR"), config.tls, server=f"aggregator@{CENTRAL}"),
            task.name,
            hospital,
            study_hash=study_hash(task),
        ),
        codec=UpdateCodec(key),
        models=ModelStore(db),
        bounds=AggregateBounds.of(key.params),
        on_health=on_health,
        secrets=LocalSecretStore(db),
        # The hospital's own privacy ledger and budgets (`fibemrss privacy ledger|budget`).
        ledger=PrivacyLedger(db),
        dataset=env_str("FIBEMRSS_DATASET", "emr"),
        # The hospital's study decisions: it joins only this document, approved here.
        approvals=StudyStore(db),
        signer=signer,
        verifier=verifier,
    )

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        federation_pb2_grpc.add_HospitalAgentServiceServicer_to_server(
            HospitalAgentServicer(participation), server
        )
        # Poisoning defences (docs/security.md): alert on either rising.
        progress = participation.progress
        refused = Gauge(
            "fibemrss_agent_rounds_refused",
            "Rounds whose aggregate this hospital refused (outside the codec's or the study's bounds).",
            registry=registry,
        )
        refused.set_function(lambda: len(progress.rounds_refused))
        not_served = Gauge(
            "fibemrss_agent_rounds_not_served",
            "Rounds whose model the validation gate kept from being served at this hospital.",
            registry=registry,
        )
        not_served.set_function(lambda: len(progress.rounds_not_served))
        return [agent_service]

    running = start_server("hospital_agent", register, config, authorize=hospital_policy(hospital))
    health["server"] = running
    stop = threading.Event()
    loop = threading.Thread(target=participation.run, args=(stop,), name="federation", daemon=True)
    loop.start()

    def on_stop() -> None:
        stop.set()
        loop.join(timeout=10)
        db.close()

    serve_until_signalled(running, on_stop=on_stop)


if __name__ == "__main__":
    run_service("hospital_agent", main)
