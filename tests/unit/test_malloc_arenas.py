"""Every service caps glibc's malloc arenas at start (fibemrss.platform.memory, from fibemrss.platform.entrypoint); the memory it
saves is measured by `fibemrss bench round --scaling` (docs/federation.md), not here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fibemrss.platform.memory import MALLOC_ARENAS, limit_malloc_arenas

# Threads that each allocate, then the number of distinct heaps glibc reports (malloc_info's
# <heap nr=...> lines): with the cap, no more than MALLOC_ARENAS whatever the threads.
PROGRAM = """
import ctypes, ctypes.util, os, sys, tempfile, threading
from fibemrss.platform.memory import limit_malloc_arenas
if sys.argv[1] == "capped":
    assert limit_malloc_arenas()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fdopen.restype = ctypes.c_void_p
libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
start = threading.Barrier(16)
def work():
    start.wait()
    blocks = [bytearray(200_000) for _ in range(50)]
    del blocks
threads = [threading.Thread(target=work) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
with tempfile.TemporaryFile() as f:
    stream = libc.fdopen(os.dup(f.fileno()), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    f.seek(0)
    print(f.read().decode().count("<heap nr="))
"""


def heaps(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_ARENA_MAX from the caller
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_service_process_allocates_from_at_most_the_capped_arenas() -> None:
    assert heaps("capped") <= MALLOC_ARENAS < heaps("default")


def test_the_environment_wins_over_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
