"""Fixtures of the end-to-end tests: the separate virtualenv of NVIDIA's tritonclient, and an
inference process with its HTTPS edge (KServe REST, CDS Hooks) behind mutual TLS."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.config import TlsFiles
from fibemrss.platform.tls import client_ssl_context
from fibemrss.tools.bench.inference_bench import inference_process, publish, sample_model_version
from fibemrss.tools.certs import init_pki

TASK = HEART_DISEASE_V1

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def triton_python() -> str:
    build = subprocess.run(
        ["bash", str(ROOT / "scripts" / "triton_venv.sh")], capture_output=True, text=True, timeout=600
    )
    if build.returncode != 0:
        pytest.skip(f"could not build the tritonclient virtualenv (PyPI unreachable?): {build.stderr[-500:]}")
    return str(ROOT / build.stdout.strip().splitlines()[-1])


@dataclass
class InferenceHttps:
    grpc: str
    http: str  # https://HOST:PORT
    pki: Path
    versions: list[ModelVersion]

    def tls(self, identity: str) -> TlsFiles:
        return TlsFiles(
            str(self.pki / "ca.crt"), str(self.pki / f"{identity}.crt"), str(self.pki / f"{identity}.key")
        )

    def client(self, identity: str = "ehr@h") -> httpx.Client:
        return httpx.Client(base_url=self.http, verify=client_ssl_context(self.tls(identity)), timeout=30)


@pytest.fixture(scope="module")
def inference_https(
    postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InferenceHttps]:
    from fibemrss.db.admin import ensure_database
    from fibemrss.db.migrate import migrate

    url = ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
    migrate(url, "hospital")
    versions = [sample_model_version(TASK, 1, seed=1), sample_model_version(TASK, 2, seed=2)]
    for mv in versions:
        publish(url, mv)
    pki = tmp_path_factory.mktemp("pki")
    init_pki(pki, ["inference@h", "ehr@h", "ehr@other"])
    env = {
        "FIBEMRSS_HOSPITAL": "h",
        "FIBEMRSS_TLS_CA": str(pki / "ca.crt"),
        "FIBEMRSS_TLS_CERT": str(pki / "inference@h.crt"),
        "FIBEMRSS_TLS_KEY": str(pki / "inference@h.key"),
        "FIBEMRSS_HTTP_LISTEN": "127.0.0.1:0",
    }
    with inference_process(url, tmp_path_factory.mktemp("inference"), env) as proc:
        yield InferenceHttps(proc.address, proc.edges["kserve_http"], pki, versions)
