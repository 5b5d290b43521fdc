"""The aggregator core's ports: the round store the Coordinator runs on, what the gRPC edge reads
directly, and the clock that decides every deadline.

Two implementations of the stores: PostgreSQL (`adapters/store.py`, the service) and memory
(`adapters/memory_store.py`, the round tests). Each method is one transaction: all or nothing,
and a concurrent caller sees it whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Protocol

from fibemrss.he.mask_signatures import SignedMaskKey
from services.aggregator.core.proposals import ProposalStorePort
from services.aggregator.core.round_state import FederationSettings, Round


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class WallClock:
    """The real time: what the service runs on."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class DuplicateSubmission(Exception):
    """The same hospital's submission for this round was stored by a concurrent call."""


class SubmissionWriter(Protocol):
    def add(self, index: int, ciphertext: bytes) -> None:
        """Adds one chunk; an index outside 0..total-1 or sent twice is refused (InvalidArgument)."""
        ...


class RoundStore(Protocol):
    """Federations, rounds, uploads, mask keys and the messages of secure aggregation's stages:
    exactly what the Coordinator uses."""

    def create_federation(self, s: FederationSettings) -> bool:
        """Creates the federation and opens round 0; False if it already existed identically
        (FailedPrecondition if it exists with other settings or another study)."""
        ...

    def tasks(self) -> list[str]: ...

    def settings(self, task: str) -> FederationSettings:
        """NotFound for a task without a federation."""
        ...

    def rounds(self, task: str) -> list[Round]:
        """Every round of the task, oldest first."""
        ...

    def current_round(self, task: str) -> Round:
        """The newest round; NotFound for a task without a federation."""
        ...

    def submission(
        self,
        task: str,
        number: int,
        hospital: str,
        total: int,
        masked: bool = False,
        epsilon: float = 0.0,
        signature: bytes = b"",
        certificate: bytes = b"",
    ) -> AbstractContextManager[SubmissionWriter]:
        """Stores a whole submission or nothing, its chunks written as they are added and their
        SHA-256 digests (index order) kept with it: at the end, refused unless the round accepts
        submissions, its chunk count matches the round's earlier uploads and (`masked`) the sender
        shared while the upload stage is open; DuplicateSubmission if the hospital's upload is
        already stored; InvalidArgument if fewer than `total` chunks were added. Between those
        final checks and the commit the round cannot start aggregating or close a stage; nothing
        is locked while chunks are being added."""
        ...

    def note_submission(self, s: FederationSettings, number: int) -> None:
        """Moves the round to COLLECTING and stamps the moment quorum was reached."""
        ...

    def mark_aggregating(self, task: str, number: int) -> bool:
        """True if the round moved from OPEN or COLLECTING to AGGREGATING."""
        ...

    def chunk_count(self, task: str, number: int) -> int:
        """The uploads' chunk count (0 without uploads); FailedPrecondition if they differ."""
        ...

    def chunks_at(self, task: str, number: int, index: int) -> list[bytes]:
        """Every stored upload's chunk `index`, by hospital name."""
        ...

    def close_round(
        self,
        s: FederationSettings,
        number: int,
        total_chunks: int,
        contributors: int,
        next_round: int | None,
        sum_at: Callable[[int], bytes],
    ) -> None:
        """Stores the sum (`sum_at(i)` computes chunk i), closes the round, deletes unmasked
        uploads and opens `next_round`; nothing of it if `sum_at` raises."""
        ...

    def fail_round(self, s: FederationSettings, number: int, reason: str, next_round: int | None) -> None:
        """Fails the round with its reason, deletes its uploads' chunks, opens `next_round`."""
        ...

    def publish_mask_key(self, task: str, number: int, hospital: str, key: SignedMaskKey) -> None:
        """Stores or replaces a hospital's round key while the cohort is open; afterwards only the
        identical key is accepted (a no-op)."""
        ...

    def mask_key_times(self, task: str, number: int) -> list[datetime]:
        """When each key of the round arrived, ascending."""
        ...

    def mask_keys(self, task: str, number: int) -> dict[str, SignedMaskKey]:
        """The keys of the round's cohort (empty while the cohort is not fixed)."""
        ...

    def fix_cohort(self, s: FederationSettings, number: int) -> bool:
        """The cohort becomes every hospital with a key; the next stage gets a full deadline."""
        ...

    def stages(self, task: str, number: int) -> dict[str, frozenset[str]]:
        """The closed stages of a round and who posted in each."""
        ...

    def stage_opened_at(self, task: str, number: int) -> datetime | None: ...

    def poster_names(self, task: str, number: int, stage: str) -> frozenset[str]:
        """Who posted in a stage so far (uploaded, for "uploads")."""
        ...

    def close_stage(self, s: FederationSettings, number: int, stage: str) -> bool:
        """Closes an open stage with whoever posted in it; the next stage gets a full deadline.
        False if the round is over or the stage already closed."""
        ...

    def post_message(
        self,
        task: str,
        number: int,
        stage: str,
        sender: str,
        parts: list[tuple[str, bytes]],
        signature: bytes,
        certificate: bytes,
        expected: frozenset[str],
    ) -> None:
        """Stores a member's message of an open stage once: the identical message again is a
        no-op, another one is refused."""
        ...

    def messages(
        self, task: str, number: int, stage: str, recipient: str | None
    ) -> list[tuple[str, bytes, bytes, bytes]]:
        """(sender, payload, signature, certificate) of a stage: to `recipient`, or broadcast."""
        ...

    def upload(
        self, task: str, number: int, hospital: str, indexes: list[int]
    ) -> tuple[bytes, bytes, bytes, Iterable[tuple[int, bytes]]]:
        """(digests, signature, certificate, [(index, chunk)]) of one hospital's upload."""
        ...


class FederationRecords(ProposalStorePort, Protocol):
    """What the gRPC edge reads without the Coordinator: settings, the round history, a failed
    round's reason, a closed round's stored sum, and study proposals."""

    def settings(self, task: str) -> FederationSettings: ...

    def rounds(self, task: str) -> list[Round]: ...

    def failure(self, task: str, number: int) -> str: ...

    def aggregate(self, task: str, number: int) -> Iterator[tuple[int, int, int, bytes]]:
        """(index, total, contributors, ciphertext) of a closed round's sum, chunk by chunk."""
        ...
