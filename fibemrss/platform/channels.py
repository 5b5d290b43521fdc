"""Client channels to peer services, with the same TLS files and message limits as servers."""

from __future__ import annotations

from pathlib import Path

import grpc

from fibemrss.platform.config import TlsFiles
from fibemrss.platform.server import GRPC_OPTIONS

# A peer that restarts (a killed aggregator, say) is back within seconds: retry connecting
# quickly instead of gRPC's default backoff, which grows to two minutes.
CLIENT_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=CLIENT_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca).read_bytes(),
        private_key=Path(tls.key).read_bytes(),
        certificate_chain=Path(tls.cert).read_bytes(),
    )
    return grpc.secure_channel(address, credentials, options=CLIENT_OPTIONS)


def wait_ready(channel: grpc.Channel, timeout: float) -> None:
    grpc.channel_ready_future(channel).result(timeout=timeout)
