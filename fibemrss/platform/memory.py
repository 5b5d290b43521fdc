"""Freed buffers go back to the operating system instead of fragmenting glibc's arenas.

glibc serves an allocation from an arena unless it is at least the mmap threshold, which starts
at 128 KiB and rises (up to 32 MiB) each time a block that was mapped is freed; and it gives
threads arenas of their own, up to eight per core. A service that makes and drops buffers of
megabytes from many threads then keeps them in its threads' arenas, fragmented, and its resident
memory grows towards its working set times the number of arenas. The aggregator is such a
service: every chunk of every upload replaces that position's serialized running sum (megabytes),
arrives as a message of about a megabyte and is loaded through buffers of a hundred kilobytes,
on whichever gRPC worker thread serves the upload. Fixing the threshold (which also stops it
rising) makes every block of at least that size a mapping of its own, unmapped when freed, and
two arenas bound what the smaller buffers can scatter; the cost is a mapping and its page faults
per large block, small beside the work done on it (measured with `fibemrss bench round`).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
LARGE_BLOCK_BYTES = 512 * 1024
ARENAS = 2


def limit_fragmentation(threshold_bytes: int = LARGE_BLOCK_BYTES, arenas: int = ARENAS) -> bool:
    """Blocks of at least `threshold_bytes` are mapped on their own from now on, and threads
    share at most `arenas` arenas. True when the C library took both settings; False where it
    has no mallopt or refuses them (not glibc). Call it first thing in a process, before other
    threads allocate."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_ARENA_MAX, arenas))
