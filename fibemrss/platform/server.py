"""The one gRPC server bootstrap all four services use: TLS, health, reflection, metrics, SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from fibemrss.platform.capacity import CallLimiter
from fibemrss.platform.config import ServerConfig, TlsFiles, split_host_port
from fibemrss.platform.interceptor import ErrorAndMetricsInterceptor, ServerMetrics
from fibemrss.platform.revocation import revocations_for

log = logging.getLogger(__name__)

# Ciphertext chunks and training-example batches are streamed in pieces well under this, but a
# single FHIR bundle may be large; 64 MiB bounds memory per call.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class ProbeHealth(health_pb2_grpc.HealthServicer):
    """The plaintext probe port's health: Check only, and NOT_SERVING while every worker of the
    main port is busy, so an orchestrator sees a saturated server as not ready."""

    def __init__(self, shared: health.HealthServicer, limiter: CallLimiter) -> None:
        self._shared = shared
        self._limiter = limiter

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        response = self._shared.Check(request, context)
        if self._limiter.saturated():
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return response

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> None:
        # Probes poll Check; a watch would hold one of this port's two threads for good.
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the probe port answers Check only")


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: the server presents its certificate and requires a client certificate."""
    return grpc.ssl_server_credentials(
        [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
        root_certificates=Path(tls.ca).read_bytes(),
        require_client_auth=True,
    )


@dataclass
class RunningServer:
    name: str
    server: grpc.Server
    address: str
    metrics_address: str
    health: health.HealthServicer
    registry: CollectorRegistry
    service_names: Sequence[str] = field(default_factory=tuple)
    health_server: grpc.Server | None = None
    health_address: str = ""
    _stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float = 10.0) -> None:
        """Say NOT_SERVING first so load balancers drain us, then finish in-flight calls."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


def started_pool(workers: int, name: str) -> futures.ThreadPoolExecutor:
    """A thread pool whose `workers` threads all run from the start.

    ThreadPoolExecutor starts threads lazily and counts idle ones with a semaphore that every
    finished work item raises, also when the thread goes straight on to a queued item; so with
    fewer threads than `max_workers` it can believe a thread idle that is not, start none, and
    queue a call behind a long poll. grpc admits at most `max_workers` calls (beyond, an
    immediate RESOURCE_EXHAUSTED), so with every thread started each admitted call runs at
    once: a caller is answered or refused, never left waiting into its DEADLINE_EXCEEDED."""
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    # Each submit finds no idle thread (none has finished yet) and starts one; all then meet here.
    everyone = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(everyone.wait, 30)
    everyone.wait(30)
    return pool


def start_server(
    name: str,
    register: Callable[[grpc.Server, CollectorRegistry], Sequence[str]],
    config: ServerConfig,
    authorize: Callable[[str, str], None] | None = None,
    edges: Mapping[str, str] | None = None,
) -> RunningServer:
    """Builds, binds and starts a server; `register` adds the servicers and returns their full
    service names. The returned addresses carry the ports actually bound (port 0 works). `edges`
    are the addresses of the service's other listeners (MLLP, HTTPS), already bound, named in the
    ready file beside the gRPC address.

    Capacity is explicit (config.limits): `max_workers` threads and as many calls in flight
    (grpc answers RESOURCE_EXHAUSTED beyond, instead of queueing in silence), a share per caller
    and a bound on health watches (the interceptor answers RESOURCE_EXHAUSTED), and a lifetime
    limit on every stream."""
    limits = config.limits
    limits.validate()
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    limiter = CallLimiter(limits)
    revocations = revocations_for(config.tls)
    if revocations is not None:
        revocations.on_refusal(lambda _identity, _serial: metrics.revoked.inc())
    server = grpc.server(
        started_pool(limits.max_workers, name),
        # Authorization needs a verified identity, which only mutual TLS gives.
        interceptors=[
            ErrorAndMetricsInterceptor(
                metrics, authorize if config.tls else None, limiter, revocations
            )
        ],
        options=GRPC_OPTIONS,
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    service_names = list(register(server, registry))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    host, _ = split_host_port(config.listen, "FIBEMRSS_LISTEN")
    if config.tls:
        port = server.add_secure_port(config.listen, server_credentials(config.tls))
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"could not bind {config.listen}")
    server.start()
    m_host, m_port = split_host_port(config.metrics_listen, "FIBEMRSS_METRICS_LISTEN")
    http_server, _ = start_http_server(m_port, addr=m_host, registry=registry)
    metrics_port = http_server.server_port
    health_server, health_address = None, ""
    if config.health_listen:
        # Shares the health servicer: a draining server reports NOT_SERVING here too.
        health_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
            maximum_concurrent_rpcs=8,
        )
        health_pb2_grpc.add_HealthServicer_to_server(ProbeHealth(health_servicer, limiter), health_server)
        h_host, _ = split_host_port(config.health_listen, "FIBEMRSS_HEALTH_LISTEN")
        h_port = health_server.add_insecure_port(config.health_listen)
        health_server.start()
        health_address = f"{h_host}:{h_port}"
    for service in ("", *service_names):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(
        name=name,
        server=server,
        address=f"{host}:{port}",
        metrics_address=f"{m_host}:{metrics_port}",
        health=health_servicer,
        registry=registry,
        service_names=service_names,
        health_server=health_server,
        health_address=health_address,
    )
    log.info("serving", extra={"grpc": running.address, "metrics": running.metrics_address})
    if config.ready_file:
        _write_ready_file(config.ready_file, running, edges or {})
    return running


def _write_ready_file(path: str, running: RunningServer, edges: Mapping[str, str]) -> None:
    # Written to a temporary name and renamed, so a reader never sees half a file.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(
            {"grpc": running.address, "metrics": running.metrics_address, "pid": os.getpid(), **edges}, f
        )
    os.replace(tmp, path)


def serve_until_signalled(
    running: RunningServer,
    on_stop: Callable[[], None] | None = None,
    on_drain: Callable[[], None] | None = None,
) -> None:
    """Blocks until SIGTERM or SIGINT, then runs `on_drain` (release long-polling calls so the
    grace period is not spent waiting for them), drains the server and runs `on_stop`."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal received, draining", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    stop.wait()
    if on_drain is not None:
        on_drain()
    running.stop()
    if on_stop is not None:
        on_stop()
    log.info("stopped")
