"""The aggregator's round store in memory: the PostgreSQL store's rules (services/aggregator/
adapters/store.py) without a database, for round tests and in-process tools.

Every method holds one lock for its whole run, so each is atomic as the SQL transactions are; a
method that fails leaves nothing behind. Timestamps come from the clock it is given, the same
clock the Coordinator decides deadlines on, so a test moves time by advancing it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument, NotFound
from fibemrss.he.mask_signatures import SignedMaskKey
from services.aggregator.core.cohorts import VOTE_STAGES
from services.aggregator.core.ports import (
    Clock,
    DuplicateSubmission,
    FederationRecords,
    RoundStore,
    WallClock,
)
from services.aggregator.core.proposals import Proposal
from services.aggregator.core.round_state import (
    ACCEPTING,
    FederationSettings,
    Round,
    RoundState,
    archived_task,
    is_finished,
)


@dataclass
class _Upload:
    total: int
    epsilon: float
    signature: bytes
    certificate: bytes
    digests: bytes
    chunks: dict[int, bytes] = field(default_factory=dict)


@dataclass
class _Round:
    number: int
    state: RoundState
    deadline_at: datetime
    quorum_at: datetime | None = None
    attempt: int = 1
    cohort: frozenset[str] | None = None
    stage_opened_at: datetime | None = None
    failure: str = ""
    uploads: dict[str, _Upload] = field(default_factory=dict)
    # hospital -> (key, when it arrived)
    keys: dict[str, tuple[SignedMaskKey, datetime]] = field(default_factory=dict)
    stages: dict[str, frozenset[str]] = field(default_factory=dict)
    # (stage, sender) -> [(recipient or "", payload, signature, certificate)]
    messages: dict[tuple[str, str], list[tuple[str, bytes, bytes, bytes]]] = field(default_factory=dict)
    # the stored sum: (contributors, chunks)
    aggregate: tuple[int, list[bytes]] | None = None


class MemorySubmissionWriter:
    """Collects one hospital's chunks; they are stored only when the whole submission is in."""

    def __init__(self, total: int) -> None:
        self._total = total
        self.chunks: dict[int, bytes] = {}

    def add(self, index: int, ciphertext: bytes) -> None:
        if not 0 <= index < self._total:
            raise InvalidArgument(f"chunk index {index} is outside 0..{self._total - 1}")
        if index in self.chunks:
            raise InvalidArgument(f"chunk {index} was sent twice in one submission")
        self.chunks[index] = ciphertext

    def digests(self) -> bytes:
        return b"".join(hashlib.sha256(self.chunks[i]).digest() for i in sorted(self.chunks))


class MemoryStore:
    """Implements `RoundStore` and `FederationRecords` (services/aggregator/core/ports.py)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock if clock is not None else WallClock()
        self._lock = threading.RLock()
        self._settings: dict[str, FederationSettings] = {}
        self._rounds: dict[str, list[_Round]] = {}
        self._proposals: list[Proposal] = []

    # -- federations and rounds ------------------------------------------------------------------
    def create_federation(self, s: FederationSettings) -> bool:
        with self._lock:
            known = self._settings.get(s.task)
            rounds = self._rounds.get(s.task, [])
            if (
                known is not None
                and rounds
                and is_finished(known.rounds, rounds[-1].number, rounds[-1].state)
            ):
                # As in PostgreSQL: the finished federation kept under its archived name.
                archived = archived_task(s.task, known.federation_id)
                self._settings[archived] = replace(known, task=archived)
                self._rounds[archived] = self._rounds.pop(s.task)
                known = None
            if known is not None:
                if known.study_hash != s.study_hash:
                    raise FailedPrecondition(
                        f"a federation for {s.task} already trains {known.study_hash or 'an unpinned study'}, "
                        f"not {s.study_hash or 'an unpinned study'}"
                    )
                if (
                    known.rounds,
                    known.quorum,
                    sorted(known.hospitals),
                    known.pairwise_masking,
                    known.min_contributors,
                ) != (s.rounds, s.quorum, sorted(s.hospitals), s.pairwise_masking, s.min_contributors):
                    raise FailedPrecondition(f"a federation for {s.task} already exists with other settings")
                return False
            # As in PostgreSQL: a fresh federation id binds every round's masks to this federation.
            self._settings[s.task] = replace(s, federation_id=os.urandom(16))
            self._rounds[s.task] = []
            self._open_round(s, 0)
            return True

    def _open_round(self, s: FederationSettings, number: int) -> None:
        deadline = self._clock.now() + timedelta(seconds=s.deadline_seconds)
        self._rounds[s.task].append(_Round(number, RoundState.OPEN, deadline))

    def _round(self, task: str, number: int) -> _Round | None:
        for r in self._rounds.get(task, []):
            if r.number == number:
                return r
        return None

    def tasks(self) -> list[str]:
        with self._lock:
            return sorted(self._settings)

    def settings(self, task: str) -> FederationSettings:
        with self._lock:
            found = self._settings.get(task)
        if found is None:
            raise NotFound(f"no federation for task {task!r}")
        return found

    def rounds(self, task: str) -> list[Round]:
        with self._lock:
            return [
                Round(
                    task,
                    r.number,
                    r.state,
                    r.deadline_at,
                    r.quorum_at,
                    frozenset(r.uploads),
                    r.attempt,
                    r.cohort,
                    max((u.epsilon for u in r.uploads.values()), default=0.0),
                )
                for r in sorted(self._rounds.get(task, []), key=lambda r: r.number)
            ]

    def current_round(self, task: str) -> Round:
        rounds = self.rounds(task)
        if not rounds:
            raise NotFound(f"no federation for task {task!r}")
        return rounds[-1]

    def failure(self, task: str, number: int) -> str:
        with self._lock:
            r = self._round(task, number)
            return "" if r is None else r.failure

    # -- study proposals ------------------------------------------------------------------------
    def add_proposal(self, p: Proposal) -> tuple[Proposal, bool]:
        with self._lock:
            known = self.proposal(p.study, p.study_hash)
            if known is not None:
                return known, True
            versions = [q.version for q in self._proposals if q.study == p.study]
            if versions and p.version <= max(versions):
                raise FailedPrecondition(
                    f"study {p.study} version {max(versions)} is already proposed with other content: "
                    "raise the version of the new document"
                )
            stored = replace(p, proposed_at=self._clock.now())
            self._proposals.append(stored)
            return stored, False

    def proposal(self, study: str, digest: str | None = None) -> Proposal | None:
        with self._lock:
            found = [
                q for q in self._proposals if q.study == study and (digest is None or q.study_hash == digest)
            ]
            return max(found, key=lambda q: q.version) if found else None

    # -- submissions ------------------------------------------------------------------------------
    @contextmanager
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
    ) -> Iterator[MemorySubmissionWriter]:
        """The chunks are collected unlocked; the lock is then held for the checks and the store:
        like the round's share lock in PostgreSQL, taken at the end of the stream, no stage closes
        and no aggregation starts between them."""
        writer = MemorySubmissionWriter(total)
        yield writer
        if len(writer.chunks) != total:
            raise InvalidArgument(f"the submission announced {total} chunks but carried {len(writer.chunks)}")
        with self._lock:
            r = self._round(task, number)
            if r is None or r.state not in ACCEPTING:
                raise FailedPrecondition(f"round {number} of {task} is not accepting submissions")
            others = {u.total for u in r.uploads.values()}
            if others and total not in others:
                raise InvalidArgument(
                    "the upload does not fit this round's layout",
                    [
                        FieldProblem(
                            "total_chunks", f"this round's uploads have {min(others)} chunks, not {total}"
                        )
                    ],
                )
            if masked and ("uploads" in r.stages or hospital not in r.stages.get("shares", frozenset())):
                raise FailedPrecondition(
                    f"round {number} of {task} takes no upload from {hospital!r} now: only members "
                    "who shared, while the upload stage is open"
                )
            if hospital in r.uploads:
                raise DuplicateSubmission(hospital)
            r.uploads[hospital] = _Upload(
                total, epsilon, signature, certificate, writer.digests(), dict(writer.chunks)
            )

    def note_submission(self, s: FederationSettings, number: int) -> None:
        with self._lock:
            r = self._round(s.task, number)
            if r is None or r.state not in ACCEPTING:
                return
            r.state = RoundState.COLLECTING
            if r.quorum_at is None and len(r.uploads) >= s.quorum:
                r.quorum_at = self._clock.now()

    def mark_aggregating(self, task: str, number: int) -> bool:
        with self._lock:
            r = self._round(task, number)
            if r is None or r.state not in ACCEPTING:
                return False
            r.state = RoundState.AGGREGATING
            return True

    def chunk_count(self, task: str, number: int) -> int:
        with self._lock:
            r = self._round(task, number)
            totals = {u.total for u in r.uploads.values()} if r is not None else set()
        if len(totals) > 1:
            raise FailedPrecondition(f"hospitals sent different chunk counts for round {number}")
        return totals.pop() if totals else 0

    def chunks_at(self, task: str, number: int, index: int) -> list[bytes]:
        with self._lock:
            r = self._round(task, number)
            if r is None:
                return []
            return [r.uploads[h].chunks[index] for h in sorted(r.uploads) if index in r.uploads[h].chunks]

    def close_round(
        self,
        s: FederationSettings,
        number: int,
        total_chunks: int,
        contributors: int,
        next_round: int | None,
        sum_at: Callable[[int], bytes],
    ) -> None:
        with self._lock:
            r = self._round(s.task, number)
            if r is None:
                raise NotFound(f"round {number} of {s.task} does not exist")
            summed = [sum_at(index) for index in range(total_chunks)]  # nothing stored if it raises
            r.aggregate = (contributors, summed)
            r.state = RoundState.CLOSED
            # Under secure aggregation the uploads stay, so every member can check the sum.
            if not s.pairwise_masking:
                self._delete_uploads(r)
            if next_round is not None:
                self._open_round(s, next_round)

    def fail_round(self, s: FederationSettings, number: int, reason: str, next_round: int | None) -> None:
        with self._lock:
            r = self._round(s.task, number)
            if r is not None:
                r.state = RoundState.FAILED
                r.failure = reason
                self._delete_uploads(r)
            if next_round is not None:
                self._open_round(s, next_round)

    @staticmethod
    def _delete_uploads(r: _Round) -> None:
        """The chunks of a finished round's uploads; who submitted stays."""
        for upload in r.uploads.values():
            upload.chunks.clear()

    def aggregate(self, task: str, number: int) -> Iterator[tuple[int, int, int, bytes]]:
        with self._lock:
            r = self._round(task, number)
            stored = None if r is None else r.aggregate
        if stored is None:
            return
        contributors, chunks = stored
        for index, data in enumerate(chunks):
            yield index, len(chunks), contributors, data

    # -- pairwise masking ---------------------------------------------------------------------------
    def publish_mask_key(self, task: str, number: int, hospital: str, key: SignedMaskKey) -> None:
        with self._lock:
            r = self._round(task, number)
            if r is None:
                raise NotFound(f"round {number} of {task} does not exist")
            existing = r.keys.get(hospital)
            if existing is not None and existing[0].public_key == key.public_key:
                return
            if r.state not in ACCEPTING or r.cohort is not None:
                raise FailedPrecondition(
                    f"the cohort of round {number} of {task} is already fixed; a new mask key is too late"
                )
            r.keys[hospital] = (key, self._clock.now())

    def mask_key_times(self, task: str, number: int) -> list[datetime]:
        with self._lock:
            r = self._round(task, number)
            return [] if r is None else sorted(at for _, at in r.keys.values())

    def mask_keys(self, task: str, number: int) -> dict[str, SignedMaskKey]:
        with self._lock:
            r = self._round(task, number)
            if r is None or r.cohort is None:
                return {}
            return {h: k for h, (k, _) in r.keys.items() if h in r.cohort}

    def fix_cohort(self, s: FederationSettings, number: int) -> bool:
        with self._lock:
            r = self._round(s.task, number)
            if r is None or r.cohort is not None or r.state not in ACCEPTING:
                return False
            now = self._clock.now()
            # As PostgreSQL's array_agg over no key: the cohort stays unset.
            r.cohort = frozenset(r.keys) or None
            r.deadline_at = now + timedelta(seconds=s.deadline_seconds)
            r.stage_opened_at = now
            return True

    # -- secure aggregation stages ------------------------------------------------------------------
    def stages(self, task: str, number: int) -> dict[str, frozenset[str]]:
        with self._lock:
            r = self._round(task, number)
            return {} if r is None else dict(r.stages)

    def stage_opened_at(self, task: str, number: int) -> datetime | None:
        with self._lock:
            r = self._round(task, number)
            return None if r is None else r.stage_opened_at

    def poster_names(self, task: str, number: int, stage: str) -> frozenset[str]:
        with self._lock:
            r = self._round(task, number)
            return frozenset() if r is None else self._posters(r, stage)

    @staticmethod
    def _posters(r: _Round, stage: str) -> frozenset[str]:
        if stage == "uploads":
            return frozenset(r.uploads)
        return frozenset(sender for posted, sender in r.messages if posted == stage)

    def close_stage(self, s: FederationSettings, number: int, stage: str) -> bool:
        with self._lock:
            r = self._round(s.task, number)
            states = (RoundState.CLOSED,) if stage in VOTE_STAGES else ACCEPTING
            if r is None or r.state not in states or stage in r.stages:
                return False
            r.stages[stage] = self._posters(r, stage)
            now = self._clock.now()
            r.stage_opened_at = now
            if stage in VOTE_STAGES:
                return True  # a closed round: its deadline stays
            r.deadline_at = now + timedelta(seconds=s.deadline_seconds)
            return True

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
        with self._lock:
            r = self._round(task, number)
            if r is None:
                raise NotFound(f"round {number} of {task} does not exist")
            existing = r.messages.get((stage, sender))
            if existing and {(to, p, g) for to, p, g, _ in existing} == {
                (to, p, signature) for to, p in parts
            }:
                return  # a retry after a lost answer: stored, even if the stage closed since
            if r.state not in ((RoundState.CLOSED,) if stage in VOTE_STAGES else ACCEPTING):
                raise FailedPrecondition(
                    f"round {number} of {task} is {r.state.value}; the {stage} stage is over"
                )
            if stage in r.stages:
                raise FailedPrecondition(f"the {stage} stage of round {number} of {task} is closed")
            if sender not in expected:
                raise FailedPrecondition(
                    f"{sender!r} is not among the members expected in the {stage} stage of round {number}"
                )
            if existing:
                raise FailedPrecondition(
                    f"{sender!r} already posted another message in the {stage} stage of round {number}"
                )
            if parts:  # as in PostgreSQL, a message of no part leaves no row
                r.messages[(stage, sender)] = [(to, p, signature, certificate) for to, p in parts]

    def messages(
        self, task: str, number: int, stage: str, recipient: str | None
    ) -> list[tuple[str, bytes, bytes, bytes]]:
        with self._lock:
            r = self._round(task, number)
            if r is None:
                return []
            return [
                (sender, p, g, c)
                for (posted, sender), parts in sorted(r.messages.items())
                if posted == stage
                for to, p, g, c in parts
                if to == (recipient or "")
            ]

    def upload(
        self, task: str, number: int, hospital: str, indexes: list[int]
    ) -> tuple[bytes, bytes, bytes, Iterable[tuple[int, bytes]]]:
        with self._lock:
            r = self._round(task, number)
            u = None if r is None else r.uploads.get(hospital)
            if u is None:
                raise NotFound(f"no upload of {hospital!r} in round {number} of {task}")
            chunks = [(i, u.chunks[i]) for i in sorted(set(indexes)) if i in u.chunks]
            return u.digests, u.signature, u.certificate, chunks


if TYPE_CHECKING:

    def _implements_the_ports(store: MemoryStore) -> tuple[RoundStore, FederationRecords]:
        """mypy checks here that the memory store still has every method of both ports."""
        return store, store
