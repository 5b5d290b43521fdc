"""fibemrss.platform.memory with the process's real C library: once glibc's own mmap threshold has
risen (a mapped block was freed), blocks below it are served from the arenas and stay resident
after they are freed; with the threshold fixed, every large block goes back when freed."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fibemrss.platform.memory import map_large_blocks

CHURN = """
import sys
from fibemrss.platform.memory import map_large_blocks

def rss_kib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])

if sys.argv[1] == "fixed":
    assert map_large_blocks()
block = bytearray(8 << 20)
del block  # freeing a mapped 8 MiB block raises glibc's threshold above the blocks below
before = rss_kib()
blocks = [bytearray(3 << 20) for _ in range(8)]
del blocks
print(rss_kib() - before)
"""


def _kept_kib(mode: str) -> int:
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}  # no MALLOC_* from the caller
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc, read in /proc/self/status")
def test_freed_large_blocks_go_back_only_with_the_threshold_fixed() -> None:
    assert _kept_kib("default") >= 3 << 10  # at least one freed 3 MiB block still resident
    assert _kept_kib("fixed") < 1 << 10


def test_the_environment_wins_over_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert map_large_blocks() is False
