"""A real aggregator process over loopback with mutual TLS, and the certificates to call it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fibemrss.he.keys import write_key_files
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import TlsFiles
from fibemrss.tools.certs import init_pki
from fibemrss.tools.service_process import ServiceProcess, base_env

HOSPITALS = ("a", "b", "c")
IDENTITIES = [
    "aggregator@central",
    "operator@central",
    *(f"{role}@{h}" for h in HOSPITALS for role in ("agent", "operator", "gateway", "inference")),
]


@dataclass
class Federation:
    """Key material and certificates of one test federation."""

    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    def tls(self, identity: str) -> TlsFiles:
        pki = self.root / "pki"
        return TlsFiles(str(pki / "ca.crt"), str(pki / f"{identity}.crt"), str(pki / f"{identity}.key"))

    def channel(self, address: str, identity: str) -> grpc.Channel:
        return open_channel(address, self.tls(identity))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("federation")
    write_key_files(root / "keys")
    init_pki(root / "pki", IDENTITIES)
    return Federation(root)


@dataclass
class RunningAggregator:
    process: ServiceProcess
    health_address: str

    @property
    def address(self) -> str:
        return self.process.address


StartAggregator = Callable[..., RunningAggregator]


@pytest.fixture(scope="module")
def start_aggregator(
    federation: Federation, postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartAggregator]:
    """Starts aggregator processes with extra environment; all are stopped at the module's end."""
    from fibemrss.db.admin import ensure_database

    started: list[ServiceProcess] = []

    def start(**env: str) -> RunningAggregator:
        import socket
        import uuid

        with socket.socket() as s:  # a free port for the plaintext probe listener
            s.bind(("127.0.0.1", 0))
            probe_port = s.getsockname()[1]
        workdir = tmp_path_factory.mktemp("aggregator")
        tls = federation.tls("aggregator@central")
        full_env = base_env()
        full_env.update(
            DATABASE_URL=ensure_database(postgres_server, f"agg_{uuid.uuid4().hex[:12]}"),
            FIBEMRSS_HE_CONTEXT=str(federation.keys / "aggregator.he"),
            FIBEMRSS_TLS_CA=tls.ca,
            FIBEMRSS_TLS_CERT=tls.cert,
            FIBEMRSS_TLS_KEY=tls.key,
            FIBEMRSS_HEALTH_LISTEN=f"127.0.0.1:{probe_port}",
        )
        full_env.update(env)
        process = ServiceProcess("aggregator@central", full_env, workdir)
        started.append(process)
        process.__enter__()
        return RunningAggregator(process, f"127.0.0.1:{probe_port}")

    try:
        yield start
    finally:
        for p in started:
            p.stop()


@pytest.fixture(scope="module")
def gateway(
    federation: Federation, postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """Hospital a's gateway as a real process, mutual TLS, its own fresh database."""
    import uuid

    from fibemrss.db.admin import ensure_database

    tls = federation.tls("gateway@a")
    env = base_env()
    env.update(
        DATABASE_URL=ensure_database(postgres_server, f"gw_{uuid.uuid4().hex[:12]}"),
        FIBEMRSS_HOSPITAL="a",
        FIBEMRSS_PSEUDONYM_KEY="0" * 64,
        FIBEMRSS_TLS_CA=tls.ca,
        FIBEMRSS_TLS_CERT=tls.cert,
        FIBEMRSS_TLS_KEY=tls.key,
    )
    with ServiceProcess("gateway@a", env, tmp_path_factory.mktemp("gateway")) as process:
        yield process
