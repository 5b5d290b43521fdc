"""Entry point of a hospital's inference service: wiring only."""

from __future__ import annotations

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
from fibemrss.platform.authorization import hospital_policy
from fibemrss.platform.capacity import CallLimits
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import (
    ServerConfig,
    edge_listen,
    env_float,
    env_optional,
    env_str,
    task_from_env,
)
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.http_server import RunningHttp, start_http
from fibemrss.platform.server import serve_until_signalled, start_server
from services.inference.adapters.patient_directory import PatientDirectory
from services.inference.core.model_cache import ModelCache
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


def main() -> None:
    # Every inference call is unary and short: the one caller (ehr@h) may use every worker.
    config = ServerConfig.from_env(
        CallLimits(max_workers=MAX_WORKERS, per_identity=MAX_WORKERS, waiting_streams=2)
    )
    hospital = env_str("FIBEMRSS_HOSPITAL")
    task = task_from_env()
    database_url = env_str("DATABASE_URL")
    http_listen = edge_listen("FIBEMRSS_HTTP_LISTEN", "FIBEMRSS_HTTP_PLAINTEXT_LISTEN", config.tls)
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "hospital")
    db = Database(database_url)
    cache = ModelCache(ModelStore(db), task, env_float("FIBEMRSS_MODEL_POLL_SECONDS", 1.0))
    # Optional: with the hospital's gateway, Diagnose also accepts a patient key.
    gateway = env_optional("FIBEMRSS_GATEWAY")
    # Pinned: only the hospital's own gateway's certificate is accepted (platform/channels.py).
    directory = (
        PatientDirectory(open_channel(gateway, config.tls, server=f"gateway@{hospital}")) if gateway else None
    )

    core = OpenInference(cache)
    authorize = hospital_policy(hospital)
    edges: dict[str, str] = {}
    http: RunningHttp | None = None
    if http_listen is not None:
        guard = authorize if http_listen.tls else None
        routes = KServeRest(core, guard).routes() + CdsHooks(cache, guard).routes()
        http = start_http("inference", Starlette(routes=routes), http_listen)
        edges["kserve_http"] = http.base_url
        edges["cds_hooks"] = http.base_url + "/cds-services"

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        inference_pb2_grpc.add_DiagnosisServiceServicer_to_server(DiagnosisServicer(cache, directory), server)
        kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(core), server)
        return [
            inference_pb2.DESCRIPTOR.services_by_name["DiagnosisService"].full_name,
            kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ]

    running = start_server("inference", register, config, authorize=authorize, edges=edges)
    cache.start()

    def on_stop() -> None:
        if http is not None:
            http.stop()
        cache.stop()
        db.close()

    serve_until_signalled(running, on_stop=on_stop)


if __name__ == "__main__":
    run_service("inference", main)
