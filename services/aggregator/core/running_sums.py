"""Per-round sums kept in memory, each upload added in as it commits.

Closing a round then only serializes these sums instead of reading every upload back from
PostgreSQL and adding it. They are a cache, not the record: the database keeps every accepted
submission (members fetch them to check the sum), and whenever a running sum does not cover
exactly the round's submissions the round is summed from the database once. That happens after
a restart (a crash mid-round costs one pass over the stored uploads at close), when a sum would
refuse a chunk (more parties than the codec's bound), or when an upload's fold did not finish
within `settle_seconds` of the round closing.

An upload is checked by adding each of its chunks into accumulators of its own as it streams in
(services/aggregator/core/ciphertexts.py); those are added into the round's sum only once the
upload has committed, so a refused or rolled-back upload never touches it. Between its commit and
its fold an upload holds a reservation: `take` waits for the round's reservations to settle, so
a round that closes right after its last upload still uses the running sum.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fibemrss.he.errors import HeError

log = logging.getLogger(__name__)


class Accumulator(Protocol):
    def add(self, chunk: bytes) -> None: ...
    def result(self) -> bytes: ...


@dataclass
class _RoundSum:
    hospitals: set[str] = field(default_factory=set)
    by_index: dict[int, Accumulator] = field(default_factory=dict)
    broken: bool = False
    reserved: int = 0


Key = tuple[str, int, int]


class RunningSums:
    def __init__(self, new_accumulator: Callable[[], Accumulator], settle_seconds: float = 60.0) -> None:
        self._new = new_accumulator
        self._settle_seconds = settle_seconds
        self._changed = threading.Condition()
        # Keyed by (task, round, attempt): a masked round that restarts starts a new sum.
        self._rounds: dict[Key, _RoundSum] = {}

    def reserve(self, task: str, number: int, attempt: int = 1) -> None:
        """An upload is about to commit: `take` waits for its `fold` or `release`."""
        with self._changed:
            self._rounds.setdefault((task, number, attempt), _RoundSum()).reserved += 1

    def release(self, task: str, number: int, attempt: int = 1) -> None:
        """The reserved upload did not commit: nothing of it is in the sum."""
        with self._changed:
            entry = self._rounds.get((task, number, attempt))
            if entry is not None:
                entry.reserved -= 1
            self._changed.notify_all()

    def fold(
        self,
        task: str,
        number: int,
        hospital: str,
        sums: Mapping[int, Accumulator],
        attempt: int = 1,
        reserved: bool = True,
    ) -> None:
        """Adds one committed upload (its chunks already summed per position in `sums`, which the
        round's sum may adopt) to the running sum of the round's attempt."""
        with self._changed:
            entry = self._rounds.setdefault((task, number, attempt), _RoundSum())
            if reserved:
                entry.reserved -= 1
            try:
                if entry.broken or hospital in entry.hospitals:
                    return
                for index, summed in sums.items():
                    if index not in entry.by_index:
                        entry.by_index[index] = summed  # the first upload's chunks become the sum
                    else:
                        entry.by_index[index].add(summed.result())
                entry.hospitals.add(hospital)
            except HeError:
                # A chunk the accumulator refuses: the database path will meet it and fail the round.
                entry.broken = True
            finally:
                self._changed.notify_all()

    def forget(self, task: str) -> None:
        """Drops every sum of `task` (a new federation of it starts at round 0 again)."""
        with self._changed:
            for key in [k for k in self._rounds if k[0] == task]:
                del self._rounds[key]
            self._changed.notify_all()

    def take(
        self, task: str, number: int, hospitals: frozenset[str], total: int, attempt: int = 1
    ) -> list[Accumulator] | None:
        """The round's sums if they hold exactly `hospitals` and every chunk position, else None.
        Waits (up to `settle_seconds`) for uploads that committed but are still being added."""
        key = (task, number, attempt)
        deadline = time.monotonic() + self._settle_seconds
        with self._changed:
            while (entry := self._rounds.get(key)) is not None and entry.reserved > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("running sum not settled; summing from the database", extra={"task": task})
                    break
                self._changed.wait(remaining)
            entry = self._rounds.pop(key, None)
            # Older rounds and attempts can no longer be closed: drop what is left of them.
            for old in [k for k in self._rounds if k[0] == task and (k[1], k[2]) < (number, attempt)]:
                del self._rounds[old]
        if entry is None or entry.broken or entry.reserved > 0 or entry.hospitals != set(hospitals):
            return None
        if sorted(entry.by_index) != list(range(total)):
            return None
        return [entry.by_index[i] for i in range(total)]
