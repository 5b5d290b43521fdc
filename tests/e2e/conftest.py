"""Fixtures of the end-to-end tests: the separate virtualenv of NVIDIA's tritonclient."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def triton_python() -> str:
    build = subprocess.run(
        ["bash", str(ROOT / "scripts" / "triton_venv.sh")], capture_output=True, text=True, timeout=600
    )
    if build.returncode != 0:
        pytest.skip(f"could not build the tritonclient virtualenv (PyPI unreachable?): {build.stderr[-500:]}")
    return str(ROOT / build.stdout.strip().splitlines()[-1])
