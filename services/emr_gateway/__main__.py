"""Entry point of the EMR gateway: wiring only."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.db.study_approvals import StudyStore
from fibemrss.platform.authorization import hospital_policy
from fibemrss.platform.config import (
    ServerConfig,
    edge_listen,
    env_optional,
    env_str,
    site_policy_from_file,
    studies_from_env,
    task_from_env,
)
from fibemrss.platform.console_config import console_from_env
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.http_server import RunningHttp, start_http
from fibemrss.platform.revocation import revocations_for
from fibemrss.platform.server import serve_until_signalled, start_server
from fibemrss.platform.tls import server_ssl_context
from services.emr_gateway.adapters.console_reads import ConsoleReads
from services.emr_gateway.adapters.rehash import rehash_source_ids
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.console import HospitalConsole
from services.emr_gateway.core.ingestion import Outcome
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.study_decisions import StudyReview
from services.emr_gateway.core.use_cases import Gateway
from services.emr_gateway.edges.console.app import start_console
from services.emr_gateway.edges.fhir_rest import FhirRest
from services.emr_gateway.edges.grpc_servicer import EmrGatewayServicer
from services.emr_gateway.edges.mllp import MllpListen, MllpServer


def main() -> None:
    config = ServerConfig.from_env()
    console_config = console_from_env()  # the web console (docs/console.md); None: off
    hospital = env_str("FIBEMRSS_HOSPITAL")
    database_url = env_str("DATABASE_URL")
    pseudonyms = Pseudonymizer(env_str("FIBEMRSS_PSEUDONYM_KEY").encode())
    if env_optional("FIBEMRSS_STUDIES"):
        studies_from_env()  # the study documents listed: training exports answer for them by name
    elif env_optional("FIBEMRSS_STUDY_FILE"):
        task_from_env()  # a study given as a document: training exports answer for it by name
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "hospital")
    mllp_listen = edge_listen("FIBEMRSS_MLLP_LISTEN", "FIBEMRSS_MLLP_PLAINTEXT_LISTEN", config.tls)
    http_listen = edge_listen("FIBEMRSS_HTTP_LISTEN", "FIBEMRSS_HTTP_PLAINTEXT_LISTEN", config.tls)
    db = Database(database_url)
    # Rows written before source ids were kept as keyed hashes (migration 0025) are hashed before
    # the gateway serves; nothing to do on later starts (docs/gateway.md, "Identifiers at rest").
    rehash_source_ids(db, pseudonyms)
    counters: dict[str, Counter] = {}  # filled when the server registers its metrics

    def count(outcomes: Sequence[Outcome]) -> None:
        if "records" in counters:
            for o in outcomes:
                counters["records"].labels(o.fate).inc()

    store = GatewayStore(db)
    studies = StudyStore(db)
    if policy_file := env_optional("FIBEMRSS_SITE_POLICY_FILE"):
        # The hospital's site policy as a file (a ConfigMap): it replaces the one in the database.
        studies.set_site_policy(site_policy_from_file(policy_file), f"gateway@{hospital} from {policy_file}")
    review = StudyReview(hospital, store, studies)
    gateway = Gateway(store, pseudonyms, on_outcomes=count, studies=review)
    authorize = hospital_policy(hospital)

    edges: dict[str, str] = {}
    mllp: MllpServer | None = None
    if mllp_listen is not None:
        ssl_context = server_ssl_context(mllp_listen.tls) if mllp_listen.tls else None
        listen = MllpListen(mllp_listen.host, mllp_listen.port, ssl_context, revocations_for(mllp_listen.tls))
        mllp = MllpServer(gateway, hospital, listen, authorize).start()
        edges["mllp"] = mllp.address
    fhir: FhirRest | None = None
    http: RunningHttp | None = None
    if http_listen is not None:
        fhir = FhirRest(gateway, authorize if http_listen.tls else None)
        http = start_http("emr_gateway", Starlette(routes=fhir.routes()), http_listen)
        edges["fhir"] = http.base_url + "/fhir"
    console: RunningHttp | None = None
    if console_config is not None:
        console, _ = start_console(
            console_config, hospital, gateway, review, HospitalConsole(ConsoleReads(db))
        )
        edges["console"] = console_config.public_url or console.base_url

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        # fibemrss_ingested_records_total{fate}: every record's fate (quarantine rate, rejections),
        # whichever edge (gRPC, MLLP, FHIR REST) brought it.
        records = Counter(
            "fibemrss_ingested_records", "Records ingested, by fate.", ["fate"], registry=registry
        )
        for fate in ("accepted", "duplicate", "quarantined", "rejected", "unsupported"):
            records.labels(fate)  # every series exists from the start, at 0
        counters["records"] = records
        emr_pb2_grpc.add_EmrGatewayServiceServicer_to_server(EmrGatewayServicer(gateway, review), server)
        return [emr_pb2.DESCRIPTOR.services_by_name["EmrGatewayService"].full_name]

    running = start_server("emr_gateway", register, config, authorize=authorize, edges=edges)

    def on_stop() -> None:
        if mllp is not None:
            mllp.stop()
        if http is not None:
            http.stop()
        if console is not None:
            console.stop()
        if fhir is not None:
            fhir.close()
        db.close()

    serve_until_signalled(running, on_stop=on_stop)


if __name__ == "__main__":
    run_service("emr_gateway", main)
