"""Runs a service's main(): JSON logs, a bounded allocator, and a clear one-line error instead of a
traceback on bad config."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from fibemrss.domain.errors import ConfigError, DomainError
from fibemrss.he.errors import HeError
from fibemrss.platform.logs import configure_logging
from fibemrss.platform.memory import limit_malloc_arenas


def run_service(name: str, main: Callable[[], None]) -> None:
    configure_logging(name)
    limit_malloc_arenas()
    try:
        main()
    except (ConfigError, DomainError, HeError, OSError) as exc:
        logging.getLogger(name).error("cannot start: %s", exc)
        sys.exit(2)
