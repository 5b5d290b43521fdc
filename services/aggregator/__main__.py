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
from fibemrss.platform.authorization import CENTRAL_CONSOLE_ROLES, central_policy
from fibemrss.platform.config import ServerConfig, env_float, env_int, env_str
from fibemrss.platform.console_config import console_from_env
from fibemrss.platform.entrypoint import run_service
from fibemrss.platform.http_server import RunningHttp
from fibemrss.platform.memory import map_large_blocks
from fibemrss.platform.revocation import revocation_check
from fibemrss.platform.server import serve_until_signalled, start_server
from services.aggregator.adapters.console_reads import FederationConsoleReads
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import UPLOAD_SLOTS, Coordinator
from services.aggregator.core.federation_console import FederationConsole
from services.aggregator.edges.console.app import start_federation_console
from services.aggregator.edges.grpc_servicer import AggregatorServicer, UploadLimits

POOL_WAIT_SECONDS = 60.0


def main() -> None:
    # Before the server's threads allocate: each chunk replaces a serialized running sum of
    # megabytes, which glibc would otherwise keep in its arenas once freed (fibemrss.platform.memory).
    map_large_blocks()
    config = ServerConfig.from_env()
    # The federation operator's console (docs/console.md); None: off.
    console_config = console_from_env(CENTRAL_CONSOLE_ROLES)
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
    # Callers beyond the pool queue for a connection rather than being refused (issue 24): every
    # hospital of a round polls, posts and uploads at once. An upload holds a connection while it
    # streams; the coordinator streams UPLOAD_SLOTS of them at once and queues the others.
    db = Database(database_url, max_connections=pool_size, wait_seconds=POOL_WAIT_SECONDS)
    store = AggregatorStore(db)
    holder: dict[str, Coordinator] = {}

    def register(server: grpc.Server, registry: CollectorRegistry) -> Sequence[str]:
        # With mutual TLS, round mask keys must be signed by their agent's certificate (the
        # agents check them again themselves: docs/he-codec.md, "Signed round keys").
        verifier = (
            None
            if config.tls is None
            else MaskKeyVerifier(Path(config.tls.ca).read_bytes(), revocation_check(config.tls))
        )
        coordinator = Coordinator(
            store,
            CiphertextAdder(key),
            registry,
            mask_key_verifier=verifier,
            upload_slots=UPLOAD_SLOTS,
        )
        holder["c"] = coordinator
        federation_pb2_grpc.add_AggregatorServiceServicer_to_server(
            AggregatorServicer(coordinator, store, upload_limits), server
        )
        return [federation_pb2.DESCRIPTOR.services_by_name["AggregatorService"].full_name]

    edges: dict[str, str] = {}
    console: RunningHttp | None = None
    if console_config is not None:
        console, _ = start_federation_console(
            console_config, FederationConsole(FederationConsoleReads(db, store))
        )
        edges["console"] = console_config.public_url or console.base_url
    running = start_server("aggregator", register, config, authorize=central_policy(), edges=edges)
    holder["c"].start()

    def on_stop() -> None:
        holder["c"].stop()
        if console is not None:
            console.stop()
        db.close()

    serve_until_signalled(running, on_stop=on_stop, on_drain=holder["c"].release_waiters)


if __name__ == "__main__":
    run_service("aggregator", main)
