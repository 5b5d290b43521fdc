"""Large blocks go back to the operating system as soon as they are freed.

glibc serves an allocation from its arenas unless it is at least the mmap threshold, which starts
at 128 KiB and rises (up to 32 MiB) each time a block that was mapped is freed. A service that
makes and drops megabyte-sized buffers from many threads then keeps them in its threads' arenas,
fragmented, and its resident memory grows towards the largest working set times the number of
arenas. The aggregator is such a service: every chunk of every upload replaces that position's
serialized running sum (megabytes) and arrives as a message of about a megabyte, on whichever
gRPC worker thread serves the upload. Fixing the threshold (which also stops it rising) makes
every block of at least that size a mapping of its own, unmapped when freed; the cost is a
mapping and its page faults per such block, small beside the work done on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 512 * 1024


def map_large_blocks(threshold_bytes: int = LARGE_BLOCK_BYTES) -> bool:
    """Blocks of at least `threshold_bytes` are mapped on their own from now on. True when the C
    library took the setting; False where it has no mallopt or refuses it (not glibc): nothing
    changes then. Call it first thing in a process, before threads allocate."""
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
