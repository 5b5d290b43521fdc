"""Runs a service's main(): JSON logs, a bounded allocator, and a clear one-line error instead of a
traceback on bad config."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable

from fibemrss.domain.errors import ConfigError, DomainError
from fibemrss.he.errors import HeError
from fibemrss.platform.logs import configure_logging

# glibc's mallopt parameter for the number of malloc arenas (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
# Arenas a service's allocator may use. glibc gives each thread that allocates an arena of its own,
# up to 8 per core, and keeps what they freed: a gRPC server runs a worker thread per call, so the
# aggregator of a 128-hospital round held about 300 MB over its idle size at 100,000 parameters,
# 150 MB with two arenas (`fibemrss bench round --scaling`, docs/federation.md). Python allocates
# under its global lock, so more arenas buy little concurrency.
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Caps glibc's malloc arenas before the service starts its threads (the environment's
    MALLOC_ARENA_MAX wins when set). False where the C library is not glibc: nothing is changed."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def run_service(name: str, main: Callable[[], None]) -> None:
    configure_logging(name)
    limit_malloc_arenas()
    try:
        main()
    except (ConfigError, DomainError, HeError, OSError) as exc:
        logging.getLogger(name).error("cannot start: %s", exc)
        sys.exit(2)
