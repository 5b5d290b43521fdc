"""Large freed buffers go back to the operating system instead of staying in glibc's arenas.

glibc serves an allocation from an arena unless it is at least the mmap threshold, which starts
at 128 KiB and rises (up to 32 MiB) each time a block that was mapped is freed. A service that
makes and drops buffers of megabytes then keeps them in its arenas, fragmented, and its resident
memory grows well beyond its working set. The aggregator is such a service: every chunk of every
upload replaces that position's serialized running sum (megabytes) and arrives as a message of
about a megabyte. Fixing the threshold (which also stops it rising) makes every block of at least
that size a mapping of its own, unmapped when freed; the cost is a mapping and its page faults per
large block, small beside the work done on it (`fibemrss bench round` measures both). The arenas
themselves are capped for every service by fibemrss.platform.entrypoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
LARGE_BLOCK_BYTES = 512 * 1024
# Arenas a service's allocator may use. glibc gives each thread that allocates an arena of its own,
# up to 8 per core, and keeps what they freed: a gRPC server runs a worker thread per call, so the
# aggregator of a 128-hospital round held about 300 MB over its idle size at 100,000 parameters,
# 150 MB with two arenas (`fibemrss bench round --scaling`, docs/federation.md). Python allocates
# under its global lock, so more arenas buy little concurrency.
MALLOC_ARENAS = 2


def _mallopt(parameter: int, value: int, environment_name: str) -> bool:
    """glibc's mallopt(parameter, value); False (nothing changed) where the environment already
    sets `environment_name` (the environment wins) or the C library has no mallopt (not glibc)."""
    if environment_name in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(parameter, value))


def map_large_blocks(threshold_bytes: int = LARGE_BLOCK_BYTES) -> bool:
    """Blocks of at least `threshold_bytes` are mapped on their own from now on. True when the C
    library took the setting; False where the environment's MALLOC_MMAP_THRESHOLD_ already sets
    it or the C library has no mallopt: nothing changes then. Call it first thing in a process,
    before other threads allocate."""
    return _mallopt(_M_MMAP_THRESHOLD, threshold_bytes, "MALLOC_MMAP_THRESHOLD_")


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Caps glibc's malloc arenas before the service starts its threads; False where the
    environment's MALLOC_ARENA_MAX already sets it or the C library is not glibc."""
    return _mallopt(_M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX")
