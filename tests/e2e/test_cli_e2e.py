"""The README's commands as a user runs them: `fibemrss up`, `fibemrss demo`, `federation status`."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hl7
import hl7.client
import httpx
import pytest

from fibemrss.platform.config import TlsFiles
from fibemrss.platform.tls import client_ssl_context
from tests.waiting import wait_until


def check_edges(endpoints: dict[str, Any], hospital: str) -> None:
    """The MLLP, FHIR and KServe REST edges that `up` named answer over mutual TLS."""
    tls = endpoints["tls"]
    certs = tls["certs"]

    def context(identity: str) -> ssl.SSLContext:
        files = TlsFiles(tls["ca"], certs[identity]["cert"], certs[identity]["key"])
        return client_ssl_context(files)

    host, port = endpoints["hospitals"][hospital]["mllp"].rsplit(":", 1)
    message = "MSH|^~\\&|EHR|A|FIB|A|20240101||ADT^A04|UP-1|P|2.5.1\rPID|1||42^^^A^MR||DOE^J||19700101|F\r"
    with hl7.client.MLLPClient(host, int(port)) as client:
        client.socket = context(f"operator@{hospital}").wrap_socket(client.socket, server_hostname=host)
        ack = hl7.parse(client.send_message(message)[1:-2].decode())
    assert str(ack["MSA"][0][1]) == "AA" and str(ack["MSA"][0][2]) == "UP-1"
    with httpx.Client(verify=context(f"operator@{hospital}"), timeout=30) as http:
        metadata = http.get(endpoints["hospitals"][hospital]["fhir"] + "/metadata").json()
        assert metadata["resourceType"] == "CapabilityStatement"
    with httpx.Client(verify=context(f"ehr@{hospital}"), timeout=30) as http:
        assert http.get(endpoints["hospitals"][hospital]["kserve_http"] + "/v2/health/live").json() == {
            "live": True
        }


pytestmark = pytest.mark.e2e


def processes_using(workdir: Path) -> list[int]:
    """Live processes whose environment or command line mentions `workdir` (our services do)."""
    needle = str(workdir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes() or needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def fibemrss(*args: str) -> list[str]:
    return [sys.executable, "-m", "fibemrss.tools.cli", *args]


def test_up_writes_endpoints_serves_until_sigterm_and_leaves_nothing_running(tmp_path: Path) -> None:
    endpoints_file = tmp_path / "endpoints.json"
    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        fibemrss(
            "up",
            "--endpoints-json",
            str(endpoints_file),
            "--workdir",
            str(workdir),
            "--hospitals",
            "alpha,beta",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def written() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            return endpoints_file.exists()

        wait_until(written, 180, "the endpoints file written")
        endpoints = json.loads(endpoints_file.read_text())
        assert set(endpoints) == {"aggregator", "hospitals", "metrics", "tls"}
        assert set(endpoints["hospitals"]) == {"alpha", "beta"}
        assert set(endpoints["hospitals"]["alpha"]) == {
            "gateway",
            "agent",
            "inference",
            "mllp",
            "fhir",
            "kserve_http",
            "cds_hooks",
        }
        check_edges(endpoints, "alpha")
        assert len(endpoints["metrics"]) == 1 + 2 * 3
        assert Path(endpoints["tls"]["ca"]).exists()
        assert Path(endpoints["tls"]["crl"]).read_bytes().startswith(b"-----BEGIN X509 CRL-----")
        assert set(endpoints["tls"]["certs"]) >= {"agent@alpha", "operator@central", "aggregator@central"}

        status = subprocess.run(
            fibemrss(
                "federation",
                "status",
                "--aggregator",
                endpoints["aggregator"],
                "--task",
                "nope",
                "--tls-ca",
                endpoints["tls"]["ca"],
                "--tls-cert",
                endpoints["tls"]["certs"]["operator@central"]["cert"],
                "--tls-key",
                endpoints["tls"]["certs"]["operator@central"]["key"],
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 1
        assert "NOT_FOUND" in status.stderr and "Traceback" not in status.stderr
        assert processes_using(workdir)
        review_quarantine_through_the_cli(endpoints, tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    time.sleep(0.5)
    assert processes_using(workdir) == []


def test_demo_prints_rounds_and_a_diagnosis_exits_0_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    workdir = tmp_path / "work"
    result = subprocess.run(
        fibemrss("demo", "--rounds", "3", "--json", str(out), "--workdir", str(workdir)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    shown = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, shown
    for r in (1, 2, 3):
        assert f"round   {r}  pooled test accuracy" in result.stdout, shown
    assert "diagnosis reference for a held-out patient" in result.stdout, shown
    report = json.loads(out.read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["final"]["pooled_test_accuracy"] > 0.75
    assert set(report["final"]["per_hospital"]) == {"cleveland", "hungary", "switzerland", "va-long-beach"}
    # The model asked is the one cleveland serves after the last round: the personalized one
    # (fine-tuned from global version 3) when it won on validation, else global version 3.
    served = report["final"]["served"]["cleveland"]
    assert report["diagnosis"]["model_kind"] == served["kind"], (report["diagnosis"], served)
    assert report["diagnosis"]["model_version"] == served["version"], (report["diagnosis"], served)
    if served["kind"] == "personalized":
        assert report["diagnosis"]["base_model_version"] == 3, report["diagnosis"]
    else:
        assert served["version"] == 3, served
    assert 0.0 <= report["diagnosis"]["probability"] <= 1.0
    assert report["diagnosis"]["label"] in ("disease", "no disease")
    assert processes_using(workdir) == [], shown


def test_demo_stopped_by_sigterm_mid_federation_leaves_nothing_running(tmp_path: Path) -> None:
    """`timeout` or a CI runner stops a demo with SIGTERM: its services and PostgreSQL go with it."""
    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        fibemrss("demo", "--rounds", "30", "--workdir", str(workdir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "round   1  pooled test accuracy" in line:
                break
        assert any("round   1" in line for line in seen), "".join(seen[-40:])
        assert processes_using(workdir), "the demo's services should be running mid-federation"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: not processes_using(workdir), 30, "every process of the run gone", interval=0.5)
    assert proc.returncode == 130, "".join(seen[-40:])
    assert processes_using(workdir) == []


def review_quarantine_through_the_cli(endpoints: dict, tmp_path: Path) -> None:
    """An integration engineer's loop against a TLS gateway: ingest, see the held record, fix it."""
    certs = endpoints["tls"]["certs"]["operator@alpha"]
    tls = ["--tls-ca", endpoints["tls"]["ca"], "--tls-cert", certs["cert"], "--tls-key", certs["key"]]
    gateway = ["--gateway", endpoints["hospitals"]["alpha"]["gateway"]]
    export = tmp_path / "alpha.data"
    # Row 2 has a cholesterol of 5.2 "mg/dL": a mmol/L value typed into a mg/dL field.
    export.write_text("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n67,1,4,160,5.2,0,2,108,1,1.5,2,3,3,2\n")
    ingest = subprocess.run(
        fibemrss("ingest", "--format", "csv", "--profile", "uci-processed", *gateway, *tls, str(export)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ingest.returncode == 0, ingest.stderr
    summary = json.loads(ingest.stdout)
    assert (summary["accepted"], summary["quarantined"]) == (1, 1)

    listing = subprocess.run(
        fibemrss("quarantine", "list", *gateway, *tls, "--json"), capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    [held] = json.loads(listing.stdout)
    assert any("mmol/L" in reason for reason in held["reasons"])
    [chol] = [o for o in held["observations"] if o["code"] == "2093-3"]

    resolved = subprocess.run(
        fibemrss(
            "quarantine",
            "resolve",
            *gateway,
            *tls,
            "--id",
            str(held["id"]),
            "--accept",
            "--correct",
            f"{chol['index']}=5.2:mmol/L",
            "--reason",
            "unit typed wrong at admission",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert resolved.returncode == 0, resolved.stderr
    assert json.loads(resolved.stdout)["fate"] == "FATE_ACCEPTED"
    still_open = subprocess.run(
        fibemrss("quarantine", "list", *gateway, *tls, "--json"), capture_output=True, text=True, timeout=60
    )
    assert json.loads(still_open.stdout) == []
