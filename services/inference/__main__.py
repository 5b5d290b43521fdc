"""Entry point of a hospital's inference service: wiring only."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve_pb2
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_pb2_grpc
from fibemrss.db.migrate import migrate
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.db.study_approvals import StudyStore
from fibemrss.platform.authorization import hospital_policy
from fibemrss.platform.capacity import CallLimits
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import (
    ServerConfig,
    edge_listen,
    env_float,
    env_optional,
    env_str,
    studies_from_env,
)
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.http_server import RunningHttp, start_http
from fibemrss.platform.server import serve_until_signalled, start_server
from services.inference.adapters.patient_directory import PatientDirectory
from services.inference.core.model_cache import StudyModels
from services.inference.core.open_inference import OpenInference
from services.inference.edges.cds_hooks import CdsHooks
from services.inference.edges.diagnosis_grpc import DiagnosisServicer
from services.inference.edges.kserve_grpc import KServeServicer
from services.inference.edges.kserve_rest import KServeRest

# A request is ~0.1 ms of Python under one GIL, so threads add no compute; 4, 8 and 16 workers
# measured alike on 2 cores (fibemrss/tools/bench/inference_bench.py). Calls beyond the workers
# are refused (RESOURCE_EXHAUSTED), not queued, so there are as many workers as concurrent
# callers a hospital's software may have: 32, the bench's largest load.
MAX_WORKERS = 32
# How long a thread may wait for the GIL before it forces the holder to hand it over (Python's
# default: 5 ms). A call here holds the GIL for 0.1 ms or so and releases it at every gRPC
# operation anyway, so forced hand-offs add nothing but, with 8 callers queued on the GIL, they
# came often: each a pair of context switches and futex wake-ups, the kernel's share of a
# request. At 50 ms, in paired windows at 8 clients on the loaded 2-core machine (issue 24),
# Diagnose served 1.14x and ModelInfer 1.11x the requests of the same code at 5 ms (every
# Diagnose pair faster; server CPU per request 2 to 19 % lower), while an empty handler
# measured the same either way.
# The price: a Python loop that never releases the GIL (a 1,024-patient DiagnoseBatch) may
# delay the other calls by up to this long instead of 5 ms.
GIL_SWITCH_INTERVAL_S = 0.05


def main() -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Every inference call is unary and short: the one caller (ehr@h) may use every worker.
    config = ServerConfig.from_env(
        CallLimits(max_workers=MAX_WORKERS, per_identity=MAX_WORKERS, waiting_streams=2)
    )
    hospital = env_str("FIBEMRSS_HOSPITAL")
    studies = studies_from_env()
    database_url = env_str("DATABASE_URL")
    http_listen = edge_listen("FIBEMRSS_HTTP_LISTEN", "FIBEMRSS_HTTP_PLAINTEXT_LISTEN", config.tls)
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "hospital")
    db = Database(database_url)
    # Every study the hospital serves, each its own KServe model and CDS service; with `approved`
    # in FIBEMRSS_STUDIES, also every study approved here since (read again as models are).
    approvals = StudyStore(db)
    catalog = StudyModels(
        ModelStore(db),
        list(studies.named),
        env_float("FIBEMRSS_MODEL_POLL_SECONDS", 1.0),
        discover=approvals.approved_studies if studies.approved else None,
    )
    # Optional: with the hospital's gateway, Diagnose also accepts a patient key.
    gateway = env_optional("FIBEMRSS_GATEWAY")
    # Pinned: only the hospital's own gateway's certificate is accepted (platform/channels.py).
    directory = (
        PatientDirectory(open_channel(gateway, config.tls, server=f"gateway@{hospital}")) if gateway else None
    )

    core = OpenInference(catalog)
    authorize = hospital_policy(hospital)
    edges: dict[str, str] = {}
    http: RunningHttp | None = None
    if http_listen is not None:
        guard = authorize if http_listen.tls else None
        routes = KServeRest(core, guard).routes() + CdsHooks(catalog, guard).routes()
        http = start_http("inference", Starlette(routes=routes), http_listen)
        edges["kserve_http"] = http.base_url
        edges["cds_hooks"] = http.base_url + "/cds-services"

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        inference_pb2_grpc.add_DiagnosisServiceServicer_to_server(
            DiagnosisServicer(catalog, directory), server
        )
        kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(core), server)
        return [
            inference_pb2.DESCRIPTOR.services_by_name["DiagnosisService"].full_name,
            kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ]

    running = start_server("inference", register, config, authorize=authorize, edges=edges)
    catalog.start()

    def on_stop() -> None:
        if http is not None:
            http.stop()
        catalog.stop()
        db.close()

    serve_until_signalled(running, on_stop=on_stop)


if __name__ == "__main__":
    run_service("inference", main)
