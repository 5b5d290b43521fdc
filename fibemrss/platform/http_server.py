"""The one HTTP bootstrap of the REST edges (FHIR, KServe v2, CDS Hooks): Starlette apps on uvicorn.

Mutual TLS with the same CA and identities as gRPC: uvicorn requires the client certificate,
and a small subclass of its h11 protocol puts the certificate's subject into the request scope
as the ASGI TLS extension does (`scope["extensions"]["tls"]["client_cert_name"]`), so handlers
authorize with `fibemrss.platform.authorization` exactly as gRPC calls are. No HTTP parsing here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from fibemrss.domain import errors
from fibemrss.platform.config import EdgeListen
from fibemrss.platform.revocation import Revocations, revocations_for
from fibemrss.platform.tls import common_name

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

# HTTP status of each domain error; anything else is 500 with no detail (the log has it).
_STATUS: list[tuple[type[errors.DomainError], int]] = [
    (errors.InvalidArgument, 400),
    (errors.Unauthenticated, 401),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.FailedPrecondition, 409),
    (errors.ResourceExhausted, 429),
    (errors.Unavailable, 503),
]


Handler = Callable[[Request], Awaitable[Response]]


def guarded(
    authorize: Callable[[str, str], None] | None,
    method: str,
    handle: Handler,
    on_error: Callable[[Exception, Request], Response],
) -> Handler:
    """An endpoint that authorizes the caller's certificate identity for `method`, then runs
    `handle`; any exception (a refusal included) becomes the edge's own error answer."""

    async def endpoint(request: Request) -> Response:
        try:
            if authorize is not None:
                authorize(request_identity(request.scope), method)
            return await handle(request)
        except Exception as exc:  # noqa: BLE001 - on_error decides what the client sees
            return on_error(exc, request)

    return endpoint


def json_error(exc: BaseException, edge: str, field: Callable[[str], str] = str) -> JSONResponse:
    """`{"error": reason}` with the error's HTTP status, each bad field named (`field` renames it
    for the edge); anything not a domain error is 500 with no detail, logged under `edge`."""
    status = http_status_for(exc)
    if status == 500:
        log.error("%s request failed", edge, exc_info=exc)
        return JSONResponse({"error": "internal error; see the server log"}, status_code=500)
    text = str(exc)
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        text += ": " + "; ".join(f"{field(v.field)}: {v.description}" for v in exc.violations)
    return JSONResponse({"error": text}, status_code=status)


def http_status_for(error: BaseException) -> int:
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 500


class _ClientCertificateProtocol(H11Protocol):
    """uvicorn's h11 protocol, adding the verified client certificate's name to every request;
    with the federation's revocation list, a request under a revoked certificate is answered 401
    naming the revocation (checked per request: a kept-alive connection opened before the
    revocation is refused at its next request)."""

    revocations: Revocations | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert() if ssl_object is not None else None
        name = common_name(peer)
        serial = peer.get("serialNumber") if peer else None
        revocations = self.revocations if name else None
        inner: ASGIApp = self.app

        async def app(scope: Scope, receive: Any, send: Any) -> None:
            refusal = revocations.refusal_for_hex(serial, name or "") if revocations else None
            if refusal and scope.get("type") == "http":
                await JSONResponse({"error": refusal}, status_code=401)(scope, receive, send)
                return
            scope.setdefault("extensions", {})["tls"] = {"client_cert_name": name}
            await inner(scope, receive, send)

        self.app = app


def request_identity(scope: Scope) -> str:
    """ "<role>@<site>" of the caller's certificate; "unauthenticated:<peer>" without one."""
    name = scope.get("extensions", {}).get("tls", {}).get("client_cert_name")
    return name if name else f"unauthenticated:{scope.get('client')}"


@dataclass
class RunningHttp:
    name: str
    address: str  # HOST:PORT as bound
    tls: bool
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def start_http(
    name: str, app: ASGIApp, listen: EdgeListen, workers_hint: int = 0, client_certificates: bool = True
) -> RunningHttp:
    """Binds (port 0 works), starts uvicorn on its own thread, and returns once it serves.
    `client_certificates` False (the web consoles, whose clients are browsers that sign in with
    OpenID Connect): TLS without asking for a client certificate."""
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every small response waits for the peer's delayed ACK (~40 ms).
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((listen.host, listen.port))
    sock.listen(1024)
    tls: dict[str, Any] = {}
    if listen.tls is not None:
        tls = {"ssl_certfile": listen.tls.cert, "ssl_keyfile": listen.tls.key}
        if client_certificates:
            tls |= {"ssl_ca_certs": listen.tls.ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    protocol: type[_ClientCertificateProtocol] = _ClientCertificateProtocol
    revocations = revocations_for(listen.tls) if client_certificates else None
    if revocations is not None:
        protocol = type("_RevocationCheckingProtocol", (_ClientCertificateProtocol,), {"revocations": revocations})
    config = uvicorn.Config(
        app,
        http=protocol,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_keep_alive=60,
        **tls,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"http-{name}", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"the {name} HTTP server did not start")
        threading.Event().wait(0.01)
    host, port = sock.getsockname()[:2]
    running = RunningHttp(name, f"{host}:{port}", listen.tls is not None, server, thread)
    log.info("http serving", extra={"edge": name, "http": running.base_url})
    return running
