"""Capacity per caller: bounded concurrent calls per identity, a bound on long-lived streams, a
lifetime limit on every stream and a server-side deadline on every unary call, so no certificate
holder can occupy every worker thread.

The synchronous gRPC server runs each call, streams included, on one worker thread for its whole
life. Without these bounds a few dozen `grpc.health.v1.Health/Watch` streams, held by any
certificate of the federation, would pin every worker and the server would stop answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fibemrss.domain.errors import ConfigError, ResourceExhausted

log = logging.getLogger(__name__)

# Streams that exist only to wait (a health watch): a small global bound, whoever holds them.
WAITING_STREAMS = ("/grpc.health.v1.Health/Watch",)

MIB = 1024 * 1024
# The largest request message each RPC takes (per message, for a client stream), by method name.
# The channel's own limit (64 MiB, `server.MAX_MESSAGE_BYTES`) bounds what is received at all; a
# message above its RPC's limit is refused before it is decoded. Only the bulk RPCs get more than
# SMALL_REQUEST_BYTES: an EHR's batch, an HE upload chunk (its size follows the HE parameters), a
# batch of patients to score.
SMALL_REQUEST_BYTES = 1 * MIB
REQUEST_BYTES = {
    "Ingest": 64 * MIB,
    "SubmitUpdate": 64 * MIB,
    "DiagnoseBatch": 16 * MIB,  # 1024 patients at most
    "ModelInfer": 16 * MIB,
    "ResolveQuarantine": 4 * MIB,
}


def request_limit(method: str) -> int:
    """The request size limit of `method` ("/package.Service/Method", or its last part)."""
    return REQUEST_BYTES.get(method.rpartition("/")[2], SMALL_REQUEST_BYTES)


@dataclass(frozen=True)
class CallLimits:
    """How many calls a server runs at once, and how many of them one caller may hold."""

    max_workers: int = 32
    # Calls one identity ("<role>@<site>", or a peer address without TLS) may have running.
    per_identity: int = 16
    # Health watches in flight over all callers.
    waiting_streams: int = 4
    # Any stream (either direction) is cancelled after this long.
    max_stream_seconds: float = 600.0
    # Any unary call is cancelled after this long, whatever deadline its client set (or none):
    # the server's own deadline. Long polls wait 30 s at most; a 64 MiB ingest on a loaded host takes
    # well under a minute.
    max_call_seconds: float = 300.0

    @property
    def max_concurrent_rpcs(self) -> int:
        """Calls in flight at most: one per worker, so no call waits in a queue in silence while
        every worker is held; grpc answers RESOURCE_EXHAUSTED beyond."""
        return self.max_workers

    def validate(self) -> None:
        if self.max_workers < 2:
            raise ConfigError("FIBEMRSS_MAX_WORKERS must be at least 2")
        if not 1 <= self.per_identity <= self.max_workers:
            raise ConfigError("FIBEMRSS_MAX_CALLS_PER_IDENTITY must lie between 1 and FIBEMRSS_MAX_WORKERS")
        if not 0 <= self.waiting_streams < self.max_workers:
            raise ConfigError("FIBEMRSS_MAX_WATCH_STREAMS must be below FIBEMRSS_MAX_WORKERS")
        if self.max_stream_seconds <= 0:
            raise ConfigError("FIBEMRSS_MAX_STREAM_SECONDS must be positive")
        if self.max_call_seconds <= 0:
            raise ConfigError("FIBEMRSS_MAX_CALL_SECONDS must be positive")


class CallLimiter:
    """Counts calls in flight, per identity and in all; refuses a call beyond a bound."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._per_identity: Counter[str] = Counter()
        self._waiting = 0
        self._in_flight = 0

    def acquire(self, identity: str, method: str) -> None:
        """Takes a slot for the call, or raises ResourceExhausted naming the bound."""
        waiting = method in WAITING_STREAMS
        with self._lock:
            if self._per_identity[identity] >= self.limits.per_identity:
                raise ResourceExhausted(
                    f"{identity} already has {self.limits.per_identity} calls in flight; retry later"
                )
            if waiting and self._waiting >= self.limits.waiting_streams:
                raise ResourceExhausted(
                    f"{self.limits.waiting_streams} health watches are open; use Check or retry later"
                )
            if self._in_flight >= self.limits.max_workers:
                raise ResourceExhausted("the server is at capacity; retry later")
            self._per_identity[identity] += 1
            self._waiting += waiting
            self._in_flight += 1

    def release(self, identity: str, method: str) -> None:
        with self._lock:
            self._per_identity[identity] -= 1
            if self._per_identity[identity] <= 0:
                del self._per_identity[identity]
            self._waiting -= method in WAITING_STREAMS
            self._in_flight -= 1

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def saturated(self) -> bool:
        """True when every worker is busy: a probe should then say NOT_SERVING."""
        return self.in_flight() >= self.limits.max_workers


class Deadlines:
    """Runs each call's `cancel` at its deadline, from one watcher thread for the whole server.

    A `threading.Timer` per call starts (and waits for) a new thread on every call: on a busy
    two-core host that alone cost a unary call several times what the empty handler costs.
    Here a call's deadline is an entry in a dict (at most one per call in flight, so a scan is
    short), and the watcher sleeps until the earliest one; `add` wakes it only when the new
    deadline comes before that, which a fixed per-kind limit makes rare.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._entries: dict[int, tuple[float, Callable[[], object]]] = {}
        self._next_key = 0
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None

    def add(self, seconds: float, cancel: Callable[[], object]) -> int:
        """Schedules `cancel` in `seconds`; returns the key that `discard` takes."""
        deadline = time.monotonic() + seconds
        with self._cond:
            key = self._next_key
            self._next_key += 1
            self._entries[key] = (deadline, cancel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="call-deadlines", daemon=True)
                self._thread.start()
            if deadline < self._wake_at:
                self._cond.notify()
        return key

    def discard(self, key: int) -> None:
        """The call ended first: its cancel will not run."""
        with self._cond:
            self._entries.pop(key, None)

    def pending(self) -> int:
        with self._cond:
            return len(self._entries)

    def _watch(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [key for key, (deadline, _) in self._entries.items() if deadline <= now]
                cancels = [self._entries.pop(key)[1] for key in due]
                if not cancels:
                    self._wake_at = min((d for d, _ in self._entries.values()), default=float("inf"))
                    self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)
                    self._wake_at = float("inf")
                    continue
            for cancel in cancels:  # outside the lock: a cancel may call back into grpc
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - one failed cancel must not stop the others
                    log.exception("cancelling a call at its deadline failed")
