"""Per-round sums kept in memory, each upload added in as it streams.

Closing a round then only serializes these sums instead of reading every upload back from
PostgreSQL and adding it. They are a cache, not the record: the database keeps every accepted
submission (members fetch them to check the sum), and whenever a running sum does not cover
exactly the round's submissions the round is summed from the database once. That happens after
a restart (a crash mid-round costs one pass over the stored uploads at close), when a sum would
refuse a chunk (more parties than the codec's bound), or when an upload's commit did not settle
within `settle_seconds` of the round closing.

An upload is added chunk by chunk while it streams in: each chunk is checked and loaded on its
own (services/aggregator/core/ciphertexts.py), then added into the sum of the round's attempt at
its position, and of the upload only its compact chunk bytes are kept until it commits (one
upload's size, where holding the whole upload loaded as SEAL ciphertexts beside the sum took
about seven). The sums are kept serialized between additions (fibemrss.he.codec.
SerializedChunkSum): the round's sum costs its final size for the whole round instead of two
and a half times it loaded, and closing the round stores and serves the very bytes held. An upload that does not end accepted (a later chunk fails its check, the
transaction does not commit, a duplicate) is subtracted again from those bytes: BFV addition is
addition modulo q, a group, so the sum comes back bit for bit, its count of parties included,
and a refused or rolled-back upload leaves nothing in it.

The lock is taken per chunk, for the addition into the sum (loading the position's sum, adding
and serializing it again: tens of milliseconds; the upload's chunk is loaded and checked before,
outside it), not for a whole upload: a round that closes or a study that starts over must not
wait behind a slow sender's stream, and uploads stream one at a time anyway (the coordinator's
upload slot). Between an upload's last chunk and its commit (`committing`) `take`
waits for it, so a round that closes right after its last upload still uses the running sum.
An upload still streaming when its round's sum is taken can no longer commit (the round is
aggregating, which its transaction will find), so `take` subtracts what it added and cuts it
off: its later chunks and its refusal touch no sum.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fibemrss.he.codec import ChunkAccumulator
from fibemrss.he.errors import HeError

log = logging.getLogger(__name__)


class Sum(Protocol):
    """The running sum of one chunk position (fibemrss.he.codec's ChunkAccumulator, loaded, or
    SerializedChunkSum: CiphertextAdder.new_sum chooses by the round's size)."""

    @property
    def parties(self) -> int: ...
    def absorb(self, loaded: ChunkAccumulator) -> None: ...
    def subtract(self, chunk: bytes) -> None: ...
    def result(self) -> bytes: ...


Key = tuple[str, int, int]


@dataclass(eq=False)
class Upload:
    """One upload streaming into its round's sum: the compact chunks it added, kept until it
    commits (or to subtract them again if it does not)."""

    key: Key
    hospital: str
    added: dict[int, bytes] = field(default_factory=dict)
    committing: bool = False
    # Its round's sum was taken or dropped: nothing of it is in any sum any more.
    cut_off: bool = False


@dataclass
class _RoundSum:
    hospitals: set[str] = field(default_factory=set)
    by_index: dict[int, Sum] = field(default_factory=dict)
    broken: bool = False
    uploads: list[Upload] = field(default_factory=list)  # streaming or committing


class RunningSums:
    def __init__(self, new_sum: Callable[[int], Sum], settle_seconds: float = 60.0) -> None:
        self._new_sum = new_sum
        self._settle_seconds = settle_seconds
        self._changed = threading.Condition()
        # Keyed by (task, round, attempt): a masked round that restarts starts a new sum.
        self._rounds: dict[Key, _RoundSum] = {}

    def begin(self, task: str, number: int, hospital: str, attempt: int = 1) -> Upload:
        """An upload of `hospital` starts streaming into the sum of the round's attempt."""
        upload = Upload((task, number, attempt), hospital)
        with self._changed:
            self._rounds.setdefault(upload.key, _RoundSum()).uploads.append(upload)
        return upload

    def add(self, upload: Upload, index: int, chunk: bytes, loaded: ChunkAccumulator) -> None:
        """Adds one checked chunk of `upload` at `index`: `loaded` (the chunk loaded into an
        accumulator of its own) goes into the sum, `chunk` (its compact bytes) is kept until the
        upload commits."""
        with self._changed:
            entry = self._live(upload)
            if entry is None or entry.broken:
                return
            try:
                if index in upload.added:
                    raise HeError(f"chunk {index} added twice by one upload")  # UploadCheck refuses it
                summed = entry.by_index.get(index)
                if summed is None:
                    summed = entry.by_index[index] = self._new_sum(loaded.chunk_count)
                summed.absorb(loaded)
            except HeError:
                # A chunk the sum refuses: the database path will meet it and fail the round.
                entry.broken = True
                return
            upload.added[index] = chunk

    def committing(self, upload: Upload) -> None:
        """The upload was checked whole and its transaction is about to commit: `take` waits for
        its `commit` or `withdraw`."""
        with self._changed:
            upload.committing = True

    def commit(self, upload: Upload) -> None:
        """The upload committed: its hospital counts in the sum, its kept chunks go."""
        with self._changed:
            entry = self._live(upload)
            if entry is not None:
                entry.uploads.remove(upload)
                if upload.hospital in entry.hospitals:
                    entry.broken = True  # two accepted uploads of one hospital: the database decides
                entry.hospitals.add(upload.hospital)
            self._cut_off(upload)
            self._changed.notify_all()

    def withdraw(self, upload: Upload) -> None:
        """The upload was refused or did not commit: whatever of it was added is subtracted."""
        with self._changed:
            entry = self._live(upload)
            if entry is not None:
                entry.uploads.remove(upload)
                self._subtract(entry, upload)
                if not (entry.hospitals or entry.uploads or entry.by_index or entry.broken):
                    del self._rounds[upload.key]  # e.g. an upload for a round that closed meanwhile
            self._cut_off(upload)
            self._changed.notify_all()

    def forget(self, task: str) -> None:
        """Drops every sum of `task` (a new federation of it starts at round 0 again)."""
        with self._changed:
            for key in [k for k in self._rounds if k[0] == task]:
                self._drop(key)
            self._changed.notify_all()

    def take(
        self, task: str, number: int, hospitals: frozenset[str], total: int, attempt: int = 1
    ) -> list[Sum] | None:
        """The round's sums if they hold exactly `hospitals` and every chunk position, else None.
        Waits (up to `settle_seconds`) for uploads that are committing. Called once the round
        aggregates: an upload still streaming then cannot commit, and is subtracted."""
        key = (task, number, attempt)
        deadline = time.monotonic() + self._settle_seconds
        with self._changed:
            while (entry := self._rounds.get(key)) is not None and _committing(entry):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("running sum not settled; summing from the database", extra={"task": task})
                    break
                self._changed.wait(remaining)
            settled = entry is None or not _committing(entry)
            if entry is not None:
                for upload in entry.uploads:
                    if not upload.committing:
                        self._subtract(entry, upload)
                self._drop(key)
            # Older rounds and attempts can no longer be closed: drop what is left of them.
            for old in [k for k in self._rounds if k[0] == task and (k[1], k[2]) < (number, attempt)]:
                self._drop(old)
            self._changed.notify_all()
        if entry is None or entry.broken or not settled or entry.hospitals != set(hospitals):
            return None
        if sorted(entry.by_index) != list(range(total)):
            return None
        return [entry.by_index[i] for i in range(total)]

    # -- under the lock ----------------------------------------------------------------------------
    def _live(self, upload: Upload) -> _RoundSum | None:
        return None if upload.cut_off else self._rounds.get(upload.key)

    def _subtract(self, entry: _RoundSum, upload: Upload) -> None:
        if entry.broken:
            return  # the sum is not used any more: nothing to restore
        try:
            for index, chunk in upload.added.items():
                summed = entry.by_index[index]
                summed.subtract(chunk)
                if summed.parties == 0:
                    del entry.by_index[index]
        except HeError:
            entry.broken = True
        upload.added.clear()

    def _drop(self, key: Key) -> None:
        for upload in self._rounds.pop(key).uploads:
            self._cut_off(upload)

    @staticmethod
    def _cut_off(upload: Upload) -> None:
        upload.cut_off = True
        upload.added.clear()


def _committing(entry: _RoundSum) -> bool:
    return any(upload.committing for upload in entry.uploads)
