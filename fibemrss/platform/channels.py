"""Client channels to peer services, with the same TLS files and message limits as servers.

A client names the identity of the server it calls (`server=`, "aggregator@central"): the
channel then verifies the server's certificate for that identity's DNS name instead of the
dialed host (`grpc.ssl_target_name_override`), so a certificate of another service, even one of
the federation's own CA, is refused at every (re)connection. A refused call is explained: the
`UNAVAILABLE` of the failed handshake becomes `ServerIdentityMismatch` (an `UNAUTHENTICATED`
`grpc.RpcError`) naming the expected and the presented identity.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from fibemrss.platform.config import TlsFiles
from fibemrss.platform.identity import identity_dns_name
from fibemrss.platform.server import GRPC_OPTIONS
from fibemrss.platform.tls import common_name

# A peer that restarts (a killed aggregator, say) is back within seconds: retry connecting
# quickly instead of gRPC's default backoff, which grows to two minutes.
CLIENT_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
PROBE_SECONDS = 3.0


class ServerIdentityMismatch(grpc.RpcError):
    """The server answered with a certificate that is not the identity the client pinned."""

    def __init__(self, address: str, expected: str, presented: str) -> None:
        self.address, self.expected, self.presented = address, expected, presented
        super().__init__(self.details())

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return (
            f"the server at {self.address} is not {self.expected}: it presented the certificate "
            f"of {self.presented} (expected {self.expected}, name {identity_dns_name(self.expected)})"
        )

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def __str__(self) -> str:
        return self.details()


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port", "[::1]:port" or "dns:///host:port"; None if not one."""
    target = address.split("///", 1)[-1] if "://" in address else address
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def presented_identity(address: str, tls: TlsFiles) -> tuple[str | None, list[str]]:
    """The common name and DNS names of the certificate the server at `address` presents.

    Verified against the federation's CA (a stranger's certificate fails the handshake and says
    nothing), with our client certificate (the server requires one); (None, []) if unreachable.
    """
    where = _host_port(address)
    if where is None:
        return None, []
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.check_hostname = False  # the point is to read whose certificate it is
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(where, timeout=PROBE_SECONDS) as raw,
            context.wrap_socket(raw) as conn,
        ):
            cert = conn.getpeercert()
    except (OSError, ssl.SSLError):
        return None, []
    entries = (cert or {}).get("subjectAltName", ())
    dns = [str(entry[1]) for entry in entries if isinstance(entry, tuple) and entry[0] == "DNS"]
    return common_name(cert), dns


def _explained(error: grpc.RpcError, address: str, tls: TlsFiles, expected: str) -> grpc.RpcError:
    """`error`, or the mismatch it hides when the server's certificate is not `expected`'s."""
    code = error.code() if isinstance(error, grpc.Call) else None
    if code != grpc.StatusCode.UNAVAILABLE:
        return error
    presented, dns = presented_identity(address, tls)
    if presented is None or identity_dns_name(expected) in dns:
        return error
    if presented == expected:
        presented = f"{presented} without the name {identity_dns_name(expected)} (an older `certs init`?)"
    return ServerIdentityMismatch(address, expected, presented)


class _ExplainedStream:
    """A response stream whose failure is explained as `_explained` does; the rest delegated."""

    def __init__(self, call: Any, explain: Callable[[grpc.RpcError], grpc.RpcError]) -> None:
        self._call, self._explain = call, explain

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise self._explain(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _ServerPin(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, address: str, tls: TlsFiles, expected: str) -> None:
        self._address, self._tls, self._expected = address, tls, expected

    def _explain(self, error: grpc.RpcError) -> grpc.RpcError:
        return _explained(error, self._address, self._tls, self._expected)

    def _finished(self, outcome: Any) -> Any:
        # A blocking call's failure comes back as the RpcError itself; a future still running is
        # left alone (waiting on it here would block the caller).
        if isinstance(outcome, grpc.RpcError) and isinstance(outcome, grpc.Future) and outcome.done():
            explained = self._explain(outcome)
            if explained is not outcome:
                raise explained
        return outcome

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._finished(continuation(details, request))

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self._finished(continuation(details, request_iterator))

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return _ExplainedStream(continuation(details, request), self._explain)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return _ExplainedStream(continuation(details, request_iterator), self._explain)


def open_channel(address: str, tls: TlsFiles | None = None, server: str | None = None) -> grpc.Channel:
    """A channel to `address`; with `tls` and `server` ("<role>@<site>"), pinned to that identity."""
    if tls is None:
        return grpc.insecure_channel(address, options=CLIENT_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca).read_bytes(),
        private_key=Path(tls.key).read_bytes(),
        certificate_chain=Path(tls.cert).read_bytes(),
    )
    if server is None:
        return grpc.secure_channel(address, credentials, options=CLIENT_OPTIONS)
    options = [*CLIENT_OPTIONS, ("grpc.ssl_target_name_override", identity_dns_name(server))]
    channel = grpc.secure_channel(address, credentials, options=options)
    return grpc.intercept_channel(channel, _ServerPin(address, tls, server))


def wait_ready(channel: grpc.Channel, timeout: float) -> None:
    grpc.channel_ready_future(channel).result(timeout=timeout)
