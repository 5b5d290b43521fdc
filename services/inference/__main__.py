"""Entry point of a hospital's inference service: wiring only."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from prometheus_client import CollectorRegistry

from fibemrss.config import DEFAULT_TASK, ServerConfig, env_str
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.entrypoint import run_service
from fibemrss.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.model_store import ModelStore
from fibemrss.server import serve_until_signalled, start_server
from fibemrss.task_spec import get_task
from services.inference.model_cache import ModelCache
from services.inference.servicer import DiagnosisServicer


def main() -> None:
    config = ServerConfig.from_env()
    task = get_task(env_str("FIBEMRSS_TASK", DEFAULT_TASK))
    database_url = env_str("DATABASE_URL")
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "hospital")
    db = Database(database_url)
    cache = ModelCache(ModelStore(db), task)

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        inference_pb2_grpc.add_DiagnosisServiceServicer_to_server(DiagnosisServicer(cache, task.name), server)
        return [inference_pb2.DESCRIPTOR.services_by_name["DiagnosisService"].full_name]

    running = start_server("inference", register, config)
    cache.start()

    def on_stop() -> None:
        cache.stop()
        db.close()

    serve_until_signalled(running, on_stop=on_stop)


if __name__ == "__main__":
    run_service("inference", main)
