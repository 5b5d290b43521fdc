"""Fail closed: a service without TLS configuration refuses to listen off loopback, naming the
variables, because without mutual TLS there is no caller identity and so no authorization
(docs/security.md). A real gateway process, started three ways."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fibemrss.domain.errors import ConfigError
from fibemrss.platform.config import ServerConfig, TlsFiles, edge_listen
from fibemrss.tools.certs import init_pki
from fibemrss.tools.service_process import ServiceProcess, base_env


def _gateway(workdir: Path, database_url: str, **env: str) -> ServiceProcess:
    return ServiceProcess(
        "gateway@h",
        {
            **base_env(),
            "DATABASE_URL": database_url,
            "FIBEMRSS_HOSPITAL": "h",
            "FIBEMRSS_PSEUDONYM_KEY": "k" * 32,
            **env,
        },
        workdir,
    )


def test_a_gateway_without_tls_refuses_every_address_but_loopback(
    tmp_path: Path, fresh_database: Callable[[str], str]
) -> None:
    url = fresh_database("hospital")
    for listen in ("0.0.0.0:0", "[::]:0", ":0"):
        refused = _gateway(tmp_path / listen.replace(":", "_"), url, FIBEMRSS_LISTEN=listen)
        assert refused.exit_code_of_start() == 2
        log = refused.log_tail()
        assert f"FIBEMRSS_LISTEN={listen!r} is not a loopback address" in log, log
        assert "FIBEMRSS_TLS_CA, FIBEMRSS_TLS_CERT, FIBEMRSS_TLS_KEY unset" in log, log
        assert not refused.ready_file.exists()
    # The same service, same environment, on loopback: it serves.
    with _gateway(tmp_path / "loopback", url, FIBEMRSS_LISTEN="127.0.0.1:0") as served:
        assert served.address.startswith("127.0.0.1:")
        assert served.running()


def test_with_tls_a_gateway_listens_on_every_address(
    tmp_path: Path, fresh_database: Callable[[str], str]
) -> None:
    pki = init_pki(tmp_path / "pki", ["gateway@h"])
    env = {
        "FIBEMRSS_LISTEN": "0.0.0.0:0",
        "FIBEMRSS_TLS_CA": str(tmp_path / "pki" / "ca.crt"),
        "FIBEMRSS_TLS_CERT": str(pki["gateway@h"].cert),
        "FIBEMRSS_TLS_KEY": str(pki["gateway@h"].key),
    }
    with _gateway(tmp_path / "tls", fresh_database("hospital"), **env) as served:
        assert served.address.startswith("0.0.0.0:")
        time.sleep(0.2)
        assert served.running()


def test_the_rule_is_the_same_for_grpc_and_the_plaintext_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    tls = TlsFiles("ca", "cert", "key")
    for host in ("127.0.0.1", "127.3.4.5", "localhost", "[::1]"):
        assert ServerConfig(f"{host}:0", "127.0.0.1:0", None, None).tls is None
    for address in ("0.0.0.0:50051", "10.1.2.3:50051", "gateway.hospital.svc:50051", ":50051"):
        with pytest.raises(ConfigError, match="FIBEMRSS_LISTEN=.* is not a loopback address"):
            ServerConfig(address, "127.0.0.1:0", None, None)
        assert ServerConfig(address, "127.0.0.1:0", tls, None).tls == tls
        monkeypatch.setenv("FIBEMRSS_MLLP_PLAINTEXT_LISTEN", address)
        with pytest.raises(ConfigError, match="FIBEMRSS_MLLP_PLAINTEXT_LISTEN=.* is not a loopback address"):
            edge_listen("FIBEMRSS_MLLP_LISTEN", "FIBEMRSS_MLLP_PLAINTEXT_LISTEN", None)
    # from_env reads the variables: unset TLS with an open address stops start-up.
    for name in ("FIBEMRSS_TLS_CA", "FIBEMRSS_TLS_CERT", "FIBEMRSS_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FIBEMRSS_LISTEN", "0.0.0.0:50051")
    with pytest.raises(ConfigError, match="set the three FIBEMRSS_TLS_"):
        ServerConfig.from_env()
