"""Entry point of the EMR gateway: wiring only."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter

from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.platform.authorization import hospital_policy
from fibemrss.platform.config import ServerConfig, env_optional, env_str, task_from_env
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.server import serve_until_signalled, start_server
from services.emr_gateway.ingestion import Outcome
from services.emr_gateway.pseudonym import Pseudonymizer
from services.emr_gateway.servicer import EmrGatewayServicer
from services.emr_gateway.store import GatewayStore
from services.emr_gateway.use_cases import Gateway


def main() -> None:
    config = ServerConfig.from_env()
    hospital = env_str("FIBEMRSS_HOSPITAL")
    database_url = env_str("DATABASE_URL")
    pseudonyms = Pseudonymizer(env_str("FIBEMRSS_PSEUDONYM_KEY").encode())
    if env_optional("FIBEMRSS_STUDY_FILE"):
        task_from_env()  # a study given as a document: training exports answer for it by name
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "hospital")
    db = Database(database_url)

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        # fibemrss_ingested_records_total{fate}: every record's fate (quarantine rate, rejections).
        records = Counter(
            "fibemrss_ingested_records", "Records ingested, by fate.", ["fate"], registry=registry
        )
        for fate in ("accepted", "duplicate", "quarantined", "rejected", "unsupported"):
            records.labels(fate)  # every series exists from the start, at 0

        def count(outcomes: Sequence[Outcome]) -> None:
            for o in outcomes:
                records.labels(o.fate).inc()

        emr_pb2_grpc.add_EmrGatewayServiceServicer_to_server(
            EmrGatewayServicer(Gateway(GatewayStore(db), pseudonyms, on_outcomes=count)), server
        )
        return [emr_pb2.DESCRIPTOR.services_by_name["EmrGatewayService"].full_name]

    running = start_server("emr_gateway", register, config, authorize=hospital_policy(hospital))
    serve_until_signalled(running, on_stop=db.close)


if __name__ == "__main__":
    run_service("emr_gateway", main)
