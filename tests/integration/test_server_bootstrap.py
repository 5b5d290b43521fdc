"""The shared bootstrap: mutual TLS on the main port, a plaintext health-only port for probes, metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig, TlsFiles
from fibemrss.platform.server import start_server
from fibemrss.tools.certs import init_pki


def test_probes_reach_health_in_plaintext_while_the_main_port_requires_a_client_certificate(
    tmp_path: Path,
) -> None:
    pki = init_pki(tmp_path, ["gateway@h", "operator@h"])
    server_tls = TlsFiles(str(tmp_path / "ca.crt"), str(pki["gateway@h"].cert), str(pki["gateway@h"].key))
    config = ServerConfig("127.0.0.1:0", "127.0.0.1:0", server_tls, None, health_listen="127.0.0.1:0")
    running = start_server("test", lambda server, registry: [], config)
    try:
        with grpc.insecure_channel(running.health_address) as probe:
            status = (
                health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(running.address) as plain, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        client_tls = TlsFiles(
            str(tmp_path / "ca.crt"), str(pki["operator@h"].cert), str(pki["operator@h"].key)
        )
        with open_channel(running.address, client_tls) as secure:
            status = (
                health_pb2_grpc.HealthStub(secure).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
        metrics = (
            urllib.request.urlopen(f"http://{running.metrics_address}/metrics", timeout=10).read().decode()
        )
        assert (
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Check",grpc_service="grpc.health.v1.Health"'
            in metrics
        )
        # Draining: the probe port reports NOT_SERVING before the server goes away.
        running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        with grpc.insecure_channel(running.health_address) as probe:
            status = (
                health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            )
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.stop(grace=0)


def test_every_worker_thread_runs_from_the_start() -> None:
    """With all `max_workers` threads started, a call grpc admits (at most that many) runs at once
    instead of waiting in the executor's queue behind a long poll (platform/server.started_pool)."""
    import threading

    from fibemrss.platform.capacity import CallLimits

    limits = CallLimits(max_workers=6, per_identity=3, waiting_streams=1)
    config = ServerConfig("127.0.0.1:0", "127.0.0.1:0", None, None, limits=limits)
    running = start_server("prestart", lambda server, registry: [], config)
    try:
        workers = [t for t in threading.enumerate() if t.name.startswith("prestart_")]
        assert len(workers) == 6
    finally:
        running.stop(grace=0)
