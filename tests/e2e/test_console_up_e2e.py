"""`fibemrss up` with a sign-in provider named (FIBEMRSS_OIDC_*): each hospital's gateway serves
its console on loopback, and `up` prints its address (also in the endpoints JSON). The sign-in
itself, against a real provider in a real browser, is tests/browser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fibemrss.tools.service_process import base_env

pytestmark = pytest.mark.e2e


def test_fibemrss_up_starts_each_hospitals_console_and_prints_its_address(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    endpoints_file = tmp_path / "endpoints.json"
    env = {
        **base_env(),
        # Read only at the first sign-in: nothing needs to answer there for the console to start.
        "FIBEMRSS_OIDC_ISSUER": "http://127.0.0.1:9",
        "FIBEMRSS_OIDC_CLIENT_ID": "fibemrss-console",
        "FIBEMRSS_OIDC_CLIENT_SECRET_FILE": str(secret),
        "FIBEMRSS_OIDC_ROLES": "fibemrss-stewards=steward",
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "fibemrss.tools.cli", "up", "--hospitals", "alpha"]
        + ["--endpoints-json", str(endpoints_file), "--workdir", str(tmp_path / "work")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert up.stderr is not None
        said = [up.stderr.readline() for _ in range(1)]
        while not said[-1].startswith("console of") and said[-1] and len(said) < 200:
            said.append(up.stderr.readline())
        url = json.loads(endpoints_file.read_text())["hospitals"]["alpha"]["console"]
        assert url.startswith("http://127.0.0.1:")
        assert (
            said[-1].strip() == f"console of alpha: {url} (sign-in: {url}/oidc/callback is its redirect URI)"
        )
        home = httpx.get(url + "/", timeout=10)  # signed out: sent to sign in, nothing shown
        assert home.status_code == 303 and home.headers["location"] == "/login?next=%2F"
    finally:
        up.terminate()
        up.wait(timeout=60)
