"""The one way a test waits for what another thread or process does: poll a predicate.

Deadlines the code decides itself are tested on a clock the test advances (the aggregator's
`Clock` port: tests/unit/test_aggregator_core.py), never by sleeping past them; this helper is for
what really happens elsewhere (a process retrying, a server draining).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """The predicate's first truthy value, asking every `interval` seconds; fails the test naming
    `what` (and the last value seen) once `timeout` seconds have passed without one."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"{what}: not within {timeout:g} s (last seen: {value!r})")
        time.sleep(interval)
