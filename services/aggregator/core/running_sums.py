"""Per-round sums kept in memory and folded in as each submission commits.

Closing a round then only serializes these sums instead of reading every upload back from
PostgreSQL and adding it. They are a cache, not the record: the database keeps every accepted
submission, and whenever a running sum does not cover exactly the round's submissions (a
restart, a race with closing, an upload too big to hold) the round is summed from the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
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


class RunningSums:
    def __init__(self, new_accumulator: Callable[[], Accumulator]) -> None:
        self._new = new_accumulator
        self._lock = threading.Lock()
        # Keyed by (task, round, attempt): a masked round that restarts starts a new sum.
        self._rounds: dict[tuple[str, int, int], _RoundSum] = {}

    def fold(
        self, task: str, number: int, hospital: str, chunks: Sequence[tuple[int, bytes]], attempt: int = 1
    ) -> None:
        """Adds one committed submission's chunks to the running sum of the round's attempt."""
        with self._lock:
            entry = self._rounds.setdefault((task, number, attempt), _RoundSum())
            if entry.broken or hospital in entry.hospitals:
                return
            try:
                for index, chunk in chunks:
                    if index not in entry.by_index:
                        entry.by_index[index] = self._new()
                    entry.by_index[index].add(chunk)
            except HeError:
                # A chunk the accumulator refuses: the database path will meet it and fail the round.
                entry.broken = True
                return
            entry.hospitals.add(hospital)

    def take(
        self, task: str, number: int, hospitals: frozenset[str], total: int, attempt: int = 1
    ) -> list[Accumulator] | None:
        """The round's sums if they hold exactly `hospitals` and every chunk position, else None."""
        with self._lock:
            entry = self._rounds.pop((task, number, attempt), None)
            # Older rounds and attempts can no longer be closed: drop what is left of them.
            for key in [k for k in self._rounds if k[0] == task and (k[1], k[2]) < (number, attempt)]:
                del self._rounds[key]
        if entry is None or entry.broken or entry.hospitals != set(hospitals):
            return None
        if sorted(entry.by_index) != list(range(total)):
            return None
        return [entry.by_index[i] for i in range(total)]
