"""`fibemrss bench gateway-memory` at a small scale: every format and transport measured on a fresh
gateway process, each against its documented bound, and a bound exceeded is exit code 1 naming
the format. The assertion logic, not the figures: at this scale a request is a few KB and the
multiples are noise; the figures are in docs/gateway.md, from `--scale 1`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fibemrss.tools.bench.gateway_memory import CASES, exceeded

TRANSPORTS = {"grpc", "mllp", "fhir-import"}


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / f"memory-{len(list(tmp_path.iterdir()))}.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fibemrss.tools.cli",
            "bench",
            "gateway-memory",
            "--scale",
            "0.01",
            "--json",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return run, json.loads(out.read_text()) if out.exists() else {}


def test_every_format_is_measured_against_its_bound_and_an_exceeded_bound_fails_naming_it(
    tmp_path: Path,
) -> None:
    # Every case, each bound raised far above what a few KB can show: all measured, exit 0.
    loose = [f"--bound={c.name}=1e9" for c in CASES]
    run, result = _bench(tmp_path, *loose)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = {c["case"]: c for c in result["cases"]}
    assert set(measured) == {c.name for c in CASES}
    assert {c["transport"] for c in result["cases"]} == TRANSPORTS
    for case in result["cases"]:
        assert case["input_bytes"] > 0 and case["bound"] == 1e9, case
        assert case["multiple"] == round(case["peak_rise_bytes"] / case["input_bytes"], 2)
    assert result["exceeded"] == []
    # The documented bounds, as the bench holds them: each case's measurement checked against its own.
    documented = [
        {**c, "bound": next(k.bound for k in CASES if k.name == c["case"])} for c in result["cases"]
    ]
    assert exceeded(documented) == [
        f"{c['format']} ({c['case']}): {c['multiple']}x its size, bound {c['bound']}x"
        for c in documented
        if c["multiple"] > c["bound"]
    ]
    # One case held to a bound below anything it can measure: exit 1, and the format is named.
    run, result = _bench(tmp_path, "--case", "hl7v2_mllp_junk", "--bound", "hl7v2_mllp_junk=0")
    assert run.returncode == 1
    assert [c["case"] for c in result["cases"]] == ["hl7v2_mllp_junk"]
    assert "bound exceeded: HL7 v2 over MLLP (junk segments) (hl7v2_mllp_junk)" in run.stderr
