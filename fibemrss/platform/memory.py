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
LARGE_BLOCK_BYTES = 512 * 1024


def map_large_blocks(threshold_bytes: int = LARGE_BLOCK_BYTES) -> bool:
    """Blocks of at least `threshold_bytes` are mapped on their own from now on. True when the C
    library took the setting; False where the environment's MALLOC_MMAP_THRESHOLD_ already sets
    it (the environment wins) or the C library has no mallopt (not glibc): nothing changes then.
    Call it first thing in a process, before other threads allocate."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
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
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
