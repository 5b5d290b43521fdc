"""Entry point of the central aggregator: wiring only. It is given the public HE context only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from fibemrss.api.federation.v1 import federation_pb2, federation_pb2_grpc
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.domain.errors import ConfigError
from fibemrss.he.keys import load_aggregator_key
from fibemrss.he.mask_signatures import MaskKeyVerifier
from fibemrss.platform.authorization import central_policy
from fibemrss.platform.config import ServerConfig, env_float, env_int, env_str
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.server import serve_until_signalled, start_server
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.edges.grpc_servicer import AggregatorServicer, UploadLimits


def main() -> None:
    config = ServerConfig.from_env()
    database_url = env_str("DATABASE_URL")
    # Refuses a context that holds a secret key: the aggregator must never be able to decrypt.
    key = load_aggregator_key(Path(env_str("FIBEMRSS_HE_CONTEXT")).read_bytes())
    if env_str("FIBEMRSS_MIGRATE", "1") == "1":
        migrate(database_url, "aggregator")
    default = UploadLimits()
    upload_limits = UploadLimits(
        idle_seconds=env_float("FIBEMRSS_UPLOAD_IDLE_SECONDS", default.idle_seconds),
        total_seconds=env_float("FIBEMRSS_UPLOAD_SECONDS", default.total_seconds),
    )
    # Every member of a round may upload or post at once: the pool bounds the database's work.
    pool_size = env_int("FIBEMRSS_DB_POOL_SIZE", 8)
    if pool_size < 1:
        raise ConfigError(f"environment variable FIBEMRSS_DB_POOL_SIZE={pool_size} must be at least 1")
    db = Database(database_url, max_connections=pool_size)
    store = AggregatorStore(db)
    holder: dict[str, Coordinator] = {}

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        # With mutual TLS, round mask keys must be signed by their agent's certificate (the
        # agents check them again themselves: docs/he-codec.md, "Signed round keys").
        verifier = None if config.tls is None else MaskKeyVerifier(Path(config.tls.ca).read_bytes())
        coordinator = Coordinator(store, CiphertextAdder(key), registry, mask_key_verifier=verifier)
        holder["c"] = coordinator
        federation_pb2_grpc.add_AggregatorServiceServicer_to_server(
            AggregatorServicer(coordinator, store, upload_limits), server
        )
        return [federation_pb2.DESCRIPTOR.services_by_name["AggregatorService"].full_name]

    running = start_server("aggregator", register, config, authorize=central_policy())
    holder["c"].start()

    def on_stop() -> None:
        holder["c"].stop()
        db.close()

    serve_until_signalled(running, on_stop=on_stop, on_drain=holder["c"].release_waiters)


if __name__ == "__main__":
    run_service("aggregator", main)
