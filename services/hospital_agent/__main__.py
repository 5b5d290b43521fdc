"""Entry point of a hospital's agent: wiring only. It holds the hospital's HE secret key."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from fibemrss.api.federation.v1 import federation_pb2, federation_pb2_grpc
from fibemrss.db.migrate import migrate
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.db.privacy_ledger import PrivacyLedger
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.study import study_hash
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import load_hospital_key
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.platform.authorization import CENTRAL, hospital_policy
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import (
    ServerConfig,
    env_float,
    env_optional,
    env_str,
    require_loopback,
    studies_from_env,
)
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.revocation import revocation_check
from fibemrss.platform.server import RunningServer, serve_until_signalled, start_server
from services.hospital_agent.adapters.grpc_adapters import GrpcAggregator, GrpcGateway
from services.hospital_agent.adapters.local_secrets import LocalSecretStore
from services.hospital_agent.adapters.secrets_key import KEY_FILE_VARIABLE, FileSecretsKey, SecretsKey
from services.hospital_agent.core.aggregate_bounds import AggregateBounds
from services.hospital_agent.core.protocol import Participation
from services.hospital_agent.core.supervisor import Supervisor
from services.hospital_agent.edges.grpc_servicer import HospitalAgentServicer


class StudyMetrics:
    """The agent's domain metrics, one series per study (label `task`), read at scrape time."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def describe(self) -> list[Metric]:
        return []  # the families are built at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        # Poisoning defences (docs/security.md): alert on either rising.
        families = {
            "refused": GaugeMetricFamily(
                "fibemrss_agent_rounds_refused",
                "Rounds whose aggregate this hospital refused (outside the codec's or the study's bounds).",
                labels=["task"],
            ),
            "not_served": GaugeMetricFamily(
                "fibemrss_agent_rounds_not_served",
                "Rounds whose model the validation gate kept from being served at this hospital.",
                labels=["task"],
            ),
            "submitted": GaugeMetricFamily(
                "fibemrss_agent_last_submitted_round",
                "The last round this hospital submitted an update for, per study (-1: none yet).",
                labels=["task"],
            ),
            "failures": GaugeMetricFamily(
                "fibemrss_agent_consecutive_failures",
                "Failed steps in a row of a study's loop (0: working); its status says why.",
                labels=["task"],
            ),
            "epsilon": GaugeMetricFamily(
                "fibemrss_agent_dp_epsilon",
                "The patient-level DP epsilon this hospital has spent on the study in its federation.",
                labels=["task"],
            ),
        }
        for p in self._supervisor.participations():
            progress, name = p.progress, p.task.name
            with progress.lock:
                families["refused"].add_metric([name], len(progress.rounds_refused))
                families["not_served"].add_metric([name], len(progress.rounds_not_served))
                families["submitted"].add_metric([name], progress.last_submitted_round)
                families["failures"].add_metric([name], progress.consecutive_failures)
                families["epsilon"].add_metric([name], max(progress.epsilon_by_round.values(), default=0.0))
        yield from families.values()


def main() -> None:
    config = ServerConfig.from_env()
    hospital = env_str("FIBEMRSS_HOSPITAL")
    studies = studies_from_env()
    database_url = env_str("DATABASE_URL")
    key = load_hospital_key(Path(env_str("FIBEMRSS_HE_CONTEXT")).read_bytes())
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "hospital")
    secrets_key = _secrets_key(config)
    db = Database(database_url)
    # Rows stored in clear (before migration 0030) are sealed before the agent serves, and every
    # row must open under the key: a wrong key stops the agent here, naming the variable.
    secret_store = LocalSecretStore(db, secrets_key)
    secret_store.seal_clear_rows()
    secret_store.check()
    agent_service = federation_pb2.DESCRIPTOR.services_by_name["HospitalAgentService"].full_name
    health: dict[str, RunningServer] = {}

    failing: dict[str, str] = {}
    failing_lock = threading.Lock()

    def on_health(study: str, reason: str) -> None:
        # The agent's own service says whether its studies' loops work; the process stays SERVING
        # (it answers status) so a failing loop is shown, not restarted in a loop. One study
        # failing shows here while the others go on (each study's status says which).
        with failing_lock:
            if reason:
                failing[study] = reason
            else:
                failing.pop(study, None)
            any_failing = bool(failing)
        if "server" in health:
            state = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if any_failing
                else health_pb2.HealthCheckResponse.SERVING
            )
            health["server"].health.set(agent_service, state)

    # With mutual TLS the agent signs its round mask keys with its certificate's key and checks
    # every peer's against the federation CA (docs/he-codec.md, "Signed round keys").
    tls = config.tls
    signer = None if tls is None else MaskKeySigner(Path(tls.cert).read_bytes(), Path(tls.key).read_bytes())
    verifier = None if tls is None else MaskKeyVerifier(Path(tls.ca).read_bytes(), revocation_check(tls))
    # One channel to each peer, shared by every study (each study's clients name their task).
    gateway_channel = open_channel(env_str("FIBEMRSS_GATEWAY"), config.tls, server=f"gateway@{hospital}")
    aggregator_channel = open_channel(
        env_str("FIBEMRSS_AGGREGATOR"), config.tls, server=f"aggregator@{CENTRAL}"
    )
    codec = UpdateCodec(key)
    models = ModelStore(db)
    ledger = PrivacyLedger(db)
    approvals = StudyStore(db)
    dataset = env_str("FIBEMRSS_DATASET", "emr")

    def participation(task: TaskSpec) -> Participation:
        return Participation(
            hospital,
            task,
            # Each peer must present its own identity's certificate (fibemrss/platform/channels.py).
            gateway=GrpcGateway(gateway_channel, task.name),
            aggregator=GrpcAggregator(aggregator_channel, task.name, hospital, study_hash=study_hash(task)),
            codec=codec,
            models=models,
            bounds=AggregateBounds.of(key.params),
            on_health=lambda reason: on_health(task.name, reason),
            secrets=secret_store,
            # The hospital's own privacy ledger and budgets (`fibemrss privacy ledger|budget`): every
            # study's spends on the same records count against the same budget.
            ledger=ledger,
            dataset=dataset,
            # The hospital's study decisions: it joins only this document, approved here.
            approvals=approvals,
            signer=signer,
            verifier=verifier,
        )

    supervisor = Supervisor(
        studies.named,
        participation,
        approvals,
        follow_approved=studies.approved,
        poll_seconds=env_float("FIBEMRSS_STUDY_POLL_SECONDS", 2.0),
        on_retired=lambda study: on_health(study, ""),
        federation_of=lambda task: (
            GrpcAggregator(aggregator_channel, task.name, hospital).current_round(None).federation_id
        ),
    )

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        federation_pb2_grpc.add_HospitalAgentServiceServicer_to_server(
            HospitalAgentServicer(supervisor), server
        )
        registry.register(StudyMetrics(supervisor))
        return [agent_service]

    running = start_server("hospital_agent", register, config, authorize=hospital_policy(hospital))
    health["server"] = running
    stop = threading.Event()
    loop = threading.Thread(target=supervisor.run, args=(stop,), name="studies", daemon=True)
    loop.start()

    def on_stop() -> None:
        stop.set()
        loop.join(timeout=10)
        db.close()

    serve_until_signalled(running, on_stop=on_stop)


def _secrets_key(config: ServerConfig) -> SecretsKey | None:
    """The key the agent's secrets are sealed under (FIBEMRSS_AGENT_SECRETS_KEY_FILE). Fail
    closed: without one the secrets would sit in clear in the database, which only an agent that
    serves on loopback alone (a developer's machine) may do."""
    path = env_optional(KEY_FILE_VARIABLE)
    if path:
        return FileSecretsKey.from_file(path)
    require_loopback(
        config.listen,
        "FIBEMRSS_LISTEN",
        f"without {KEY_FILE_VARIABLE} the agent's mask and dataset-size secrets would be stored in clear; "
        f"set {KEY_FILE_VARIABLE} to a file holding 32 random bytes (a Kubernetes Secret) to listen on it",
    )
    return None


if __name__ == "__main__":
    run_service("hospital_agent", main)
