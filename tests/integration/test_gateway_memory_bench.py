"""`fibemrss bench gateway-memory` at a small scale: every format and transport measured on a fresh
gateway process, each against its documented bound, and a bound exceeded is exit code 1 naming
the format. The assertion logic, not the figures: at this scale a request is a few KB and the
multiples are noise; the figures are in docs/gateway.md, from `--scale 1`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fibemrss.tools.bench.gateway_memory import CASES

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
    # Every case in one run: each bound raised far above what a few KB can show, but one held to a
    # bound below anything it can measure. Exit 1, that one format named, every case measured.
    held = "hl7v2_mllp_junk"
    bounds = [f"--bound={c.name}={0 if c.name == held else 1e9}" for c in CASES]
    run, result = _bench(tmp_path, *bounds)
    assert run.returncode == 1, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if "bound exceeded" in line]
    assert lines == [
        f"gateway-memory: bound exceeded: HL7 v2 over MLLP (junk segments) ({held}): "
        f"{result['cases'][[c['case'] for c in result['cases']].index(held)]['multiple']}x its size, bound 0.0x"
    ]
    measured = {c["case"]: c for c in result["cases"]}
    assert set(measured) == {c.name for c in CASES}
    assert {c["transport"] for c in result["cases"]} == TRANSPORTS
    for case in result["cases"]:
        assert case["input_bytes"] > 0, case
        assert case["multiple"] == round(case["peak_rise_bytes"] / case["input_bytes"], 2)
        assert case["bound"] == (0 if case["case"] == held else 1e9)
    assert measured[held]["answer"] == "AR"  # junk over MLLP: refused whole, nothing stored
    assert measured["ndjson_junk"]["answer"] == {"rejected": 10_000}  # every line answered
    assert measured["ndjson_import"]["answer"].get("accepted", 0) > 0
    assert len(result["exceeded"]) == 1
