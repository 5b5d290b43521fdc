"""The console as the gateway process serves it (`python -m services.emr_gateway`): started by
its environment variables, over HTTPS without a client certificate (browsers sign in instead),
its address in the ready file (so in `fibemrss up`'s endpoints), sending a signed-out person to
the real provider with PKCE; and refusing to start without TLS off loopback or without its
sign-in settings, naming the variable."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from fibemrss.db.admin import ensure_database
from fibemrss.tools.certs import init_pki
from fibemrss.tools.local_cluster import CONSOLES_OFF, console_lines
from fibemrss.tools.service_process import ServiceProcess, base_env
from tests.browser.conftest import PROVIDER_DIR


@pytest.fixture(scope="module")
def issuer() -> Iterator[str]:
    provider = subprocess.Popen(
        ["node", "provider.mjs", "https://127.0.0.1:1/oidc/callback", "c", "s"],
        cwd=PROVIDER_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert provider.stdout is not None
        yield json.loads(provider.stdout.readline())["issuer"]
    finally:
        provider.terminate()
        provider.wait(timeout=10)


def gateway_env(database_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = base_env()
    env.update(
        DATABASE_URL=database_url,
        FIBEMRSS_HOSPITAL="h1",
        FIBEMRSS_PSEUDONYM_KEY="console-process-test-key",
        **extra,
    )
    return env


def test_the_gateway_serves_its_console_over_https_and_sends_people_to_sign_in(
    postgres_server: str, issuer: str, tmp_path: Path
) -> None:
    pki = init_pki(tmp_path / "pki", ["gateway@h1"])
    secret = tmp_path / "secret"
    secret.write_text("s")
    env = gateway_env(
        ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}"),
        {
            "FIBEMRSS_CONSOLE_LISTEN": "127.0.0.1:0",
            "FIBEMRSS_CONSOLE_TLS_CERT": str(pki["gateway@h1"].cert),
            "FIBEMRSS_CONSOLE_TLS_KEY": str(pki["gateway@h1"].key),
            "FIBEMRSS_OIDC_ISSUER": issuer,
            "FIBEMRSS_OIDC_CLIENT_ID": "c",
            "FIBEMRSS_OIDC_CLIENT_SECRET_FILE": str(secret),
            "FIBEMRSS_OIDC_ROLES": "fibemrss-stewards=steward",
        },
    )
    gateway = ServiceProcess("gateway@h1", env, tmp_path)
    gateway.start()
    try:
        gateway.wait_ready(time.monotonic() + 120)
        url = gateway.edges["console"]
        assert url.startswith("https://127.0.0.1:")
        assert console_lines({"hospitals": {"h1": gateway.edges}}) == [
            f"console of h1: {url} (sign-in: {url}/oidc/callback is its redirect URI)"
        ]
        ca = str(tmp_path / "pki" / "ca.crt")
        with httpx.Client(
            verify=ssl.create_default_context(cafile=ca), timeout=10
        ) as http:  # no client certificate
            home = http.get(url + "/audit?caller=x")
            assert home.status_code == 303 and home.headers["location"] == "/login?next=%2Faudit%3Fcaller%3Dx"
            assert "default-src 'none'" in home.headers["content-security-policy"]
            login = http.get(url + "/login", params={"next": "https://evil.example/"})
        assert login.status_code == 303
        to = urlsplit(login.headers["location"])
        q = {k: v[0] for k, v in parse_qs(to.query).items()}
        assert f"{to.scheme}://{to.netloc}{to.path}" == issuer + "/auth"
        assert q["redirect_uri"] == url + "/oidc/callback"
        assert (q["response_type"], q["client_id"], q["code_challenge_method"]) == ("code", "c", "S256")
        assert {"state", "nonce", "code_challenge"} <= set(q)
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"FIBEMRSS_CONSOLE_LISTEN": "127.0.0.1:0"}, "FIBEMRSS_CONSOLE_TLS_CERT"),
        ({"FIBEMRSS_CONSOLE_PLAINTEXT_LISTEN": "127.0.0.1:0"}, "FIBEMRSS_OIDC_ISSUER"),
    ],
)
def test_the_gateway_refuses_to_start_a_console_without_tls_or_sign_in(
    postgres_server: str, extra: dict[str, str], named: str
) -> None:
    env = gateway_env(ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}"), extra)
    done = subprocess.run(
        [sys.executable, "-m", "services.emr_gateway"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and named in done.stderr + done.stdout


def test_without_a_provider_up_says_how_to_turn_the_consoles_on() -> None:
    assert console_lines({"hospitals": {"h1": {"gateway": "127.0.0.1:1"}}}) == [CONSOLES_OFF]


def test_the_aggregator_serves_the_federation_console(
    postgres_server: str, issuer: str, tmp_path: Path
) -> None:
    from fibemrss.he.keys import write_key_files

    _, aggregator_key = write_key_files(tmp_path / "keys")
    secret = tmp_path / "secret"
    secret.write_text("s")
    env = base_env()
    env.update(
        DATABASE_URL=ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}"),
        FIBEMRSS_HE_CONTEXT=str(aggregator_key),
        FIBEMRSS_CONSOLE_PLAINTEXT_LISTEN="127.0.0.1:0",
        FIBEMRSS_OIDC_ISSUER=issuer,
        FIBEMRSS_OIDC_CLIENT_ID="c",
        FIBEMRSS_OIDC_CLIENT_SECRET_FILE=str(secret),
        FIBEMRSS_OIDC_ROLES="fibemrss-operators=operator",
    )
    aggregator = ServiceProcess("aggregator@central", env, tmp_path)
    aggregator.start()
    try:
        aggregator.wait_ready(time.monotonic() + 120)
        url = aggregator.edges["console"]
        home = httpx.get(url + "/proposals", timeout=10)
        assert home.status_code == 303 and home.headers["location"] == "/login?next=%2Fproposals"
        login = httpx.get(url + "/login", timeout=10)
        assert login.status_code == 303 and login.headers["location"].startswith(issuer + "/auth?")
    finally:
        aggregator.stop()
    # A hospital's role map is refused at the aggregator, naming the variable.
    env["FIBEMRSS_OIDC_ROLES"] = "fibemrss-stewards=steward"
    done = subprocess.run(
        [sys.executable, "-m", "services.aggregator"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "FIBEMRSS_OIDC_ROLES" in done.stderr + done.stdout
