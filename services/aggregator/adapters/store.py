"""The aggregator's PostgreSQL adapter: federations, rounds, submitted and summed ciphertexts.

It implements the core's `RoundStore` and `FederationRecords` (services/aggregator/core/ports.py);
its timestamps come from the database's clock and the wall clock."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg2.errors
import psycopg2.extensions

from fibemrss.db.binary_copy import copy_rows
from fibemrss.db.pool import Database, one_row
from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument, NotFound
from fibemrss.he.mask_signatures import SignedMaskKey
from services.aggregator.core.cohorts import VOTE_STAGES
from services.aggregator.core.ports import DuplicateSubmission
from services.aggregator.core.proposals import Proposal
from services.aggregator.core.round_state import (
    FederationSettings,
    Round,
    RoundState,
    archived_task,
    is_finished,
)


def _stage_states(stage: str) -> tuple[RoundState, ...]:
    """The round states in which a stage takes messages and closes: the acceptance vote's stages
    after the round closed, every other stage while it collects."""
    return (RoundState.CLOSED,) if stage in VOTE_STAGES else (RoundState.OPEN, RoundState.COLLECTING)


class CopySubmissionWriter:
    """Writes one hospital's chunks inside the submission's transaction, as they arrive (one
    chunk in memory at a time), and keeps each chunk's SHA-256 for the submission row."""

    def __init__(
        self, cur: psycopg2.extensions.cursor, task: str, round_number: int, hospital: str, total: int
    ) -> None:
        self._cur, self._key, self._total = cur, (task, round_number, hospital), total
        self._digests: dict[int, bytes] = {}

    @property
    def count(self) -> int:
        return len(self._digests)

    def digests(self) -> bytes:
        """The chunks' SHA-256 digests in index order (what the sender signed)."""
        return b"".join(self._digests[i] for i in sorted(self._digests))

    def add(self, index: int, ciphertext: bytes) -> None:
        if not 0 <= index < self._total:
            raise InvalidArgument(f"chunk index {index} is outside 0..{self._total - 1}")
        if index in self._digests:
            raise InvalidArgument(f"chunk {index} was sent twice in one submission")
        self._digests[index] = hashlib.sha256(ciphertext).digest()
        try:
            copy_rows(
                self._cur,
                "submission_chunks",
                ("task", "round", "hospital", "idx", "ciphertext"),
                ("text", "int8", "text", "int4", "bytea"),
                [(*self._key, index, ciphertext)],
            )
        except psycopg2.errors.UniqueViolation:
            # The same hospital's upload committed meanwhile (its rows were in our way).
            raise DuplicateSubmission(self._key[2]) from None


class AggregatorStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create_federation(self, s: FederationSettings) -> bool:
        """Creates the federation and opens round 0; False if it already runs identically. A
        finished federation of the task (its last round closed or failed) is kept under its
        archived name (`archived_task`) and a new one, with a new id, is created."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT rounds, quorum, hospitals, pairwise_masking, min_contributors, study_hash, federation_id "
                "FROM federations WHERE task=%s FOR UPDATE",
                (s.task,),
            )
            row = cur.fetchone()
            if row is not None:
                cur.execute(
                    "SELECT round, state FROM rounds WHERE task=%s ORDER BY round DESC LIMIT 1", (s.task,)
                )
                last = cur.fetchone()
                if last is not None and is_finished(row[0], last[0], RoundState(last[1])):
                    cur.execute(
                        "UPDATE federations SET task=%s WHERE task=%s",
                        (archived_task(s.task, bytes(row[6])), s.task),
                    )
                    row = None
            if row is not None:
                if row[5] != s.study_hash:
                    raise FailedPrecondition(
                        f"a federation for {s.task} already trains {row[5] or 'an unpinned study'}, "
                        f"not {s.study_hash or 'an unpinned study'}"
                    )
                if (row[0], row[1], sorted(row[2]), row[3], row[4]) != (
                    s.rounds,
                    s.quorum,
                    sorted(s.hospitals),
                    s.pairwise_masking,
                    s.min_contributors,
                ):
                    raise FailedPrecondition(f"a federation for {s.task} already exists with other settings")
                return False
            cur.execute(
                "INSERT INTO federations (task, rounds, quorum, grace_seconds, deadline_seconds, hospitals, "
                "pairwise_masking, min_contributors, federation_id, study_hash) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (
                    s.task,
                    s.rounds,
                    s.quorum,
                    s.grace_seconds,
                    s.deadline_seconds,
                    list(s.hospitals),
                    s.pairwise_masking,
                    s.min_contributors,
                    # The masks of every round are bound to this id: a new federation of the same
                    # task never reuses a mask.
                    os.urandom(16),
                    s.study_hash,
                ),
            )
            self._open_round(cur, s, 0)
            return True

    @staticmethod
    def _open_round(cur: psycopg2.extensions.cursor, s: FederationSettings, number: int) -> None:
        cur.execute(
            "INSERT INTO rounds (task, round, state, deadline_at) VALUES (%s,%s,%s,%s)",
            (
                s.task,
                number,
                RoundState.OPEN.value,
                datetime.now(UTC) + timedelta(seconds=s.deadline_seconds),
            ),
        )

    def tasks(self) -> list[str]:
        with self._db.transaction() as cur:
            cur.execute("SELECT task FROM federations ORDER BY task")
            return [r[0] for r in cur.fetchall()]

    def settings(self, task: str) -> FederationSettings:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT rounds, quorum, grace_seconds, deadline_seconds, hospitals, pairwise_masking, "
                "min_contributors, federation_id, study_hash FROM federations WHERE task=%s",
                (task,),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no federation for task {task!r}")
        return FederationSettings(
            task, row[0], row[1], row[2], row[3], tuple(row[4]), row[5], row[6], bytes(row[7]), row[8]
        )

    # -- study proposals (services/aggregator/core/proposals.py) ---------------------------------------------
    def add_proposal(self, p: Proposal) -> tuple[Proposal, bool]:
        """Stores a proposal, audited; (the stored one, True) when that document was already there.
        A different document must raise the version above every earlier proposal of the study."""
        with self._db.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("study:" + p.study,))
            known = self._proposal(cur, p.study, p.study_hash)
            if known is not None:
                return known, True
            cur.execute("SELECT max(version) FROM study_proposals WHERE study=%s", (p.study,))
            highest = one_row(cur)[0]
            if highest is not None and p.version <= highest:
                raise FailedPrecondition(
                    f"study {p.study} version {highest} is already proposed with other content: "
                    "raise the version of the new document"
                )
            cur.execute(
                "INSERT INTO study_proposals (study, study_hash, version, document, proposed_by) "
                "VALUES (%s,%s,%s,%s,%s)",
                (p.study, p.study_hash, p.version, p.document, p.proposed_by),
            )
            cur.execute(
                "INSERT INTO audit_log (actor, action, subject) VALUES (%s,'propose_study',%s)",
                (p.proposed_by, f"{p.study} version {p.version} {p.study_hash}"),
            )
            stored = self._proposal(cur, p.study, p.study_hash)
        assert stored is not None
        return stored, False

    @staticmethod
    def _proposal(cur: psycopg2.extensions.cursor, study: str, digest: str | None) -> Proposal | None:
        cur.execute(
            "SELECT study, study_hash, version, document, proposed_by, proposed_at FROM study_proposals "
            "WHERE study=%s AND (%s::text IS NULL OR study_hash=%s) ORDER BY version DESC LIMIT 1",
            (study, digest, digest),
        )
        row = cur.fetchone()
        return None if row is None else Proposal(row[0], row[1], int(row[2]), bytes(row[3]), row[4], row[5])

    def proposal(self, study: str, digest: str | None = None) -> Proposal | None:
        """The proposal of that hash, or (`digest` None) the study's latest one."""
        with self._db.transaction() as cur:
            return self._proposal(cur, study, digest)

    def rounds(self, task: str) -> list[Round]:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT r.round, r.state, r.deadline_at, r.quorum_at, "
                "COALESCE(array_agg(s.hospital) FILTER (WHERE s.hospital IS NOT NULL), '{}'), "
                "r.attempt, r.cohort, COALESCE(max(s.epsilon), 0) "
                "FROM rounds r LEFT JOIN submissions s ON s.task=r.task AND s.round=r.round "
                "WHERE r.task=%s GROUP BY r.round, r.state, r.deadline_at, r.quorum_at, r.attempt, r.cohort "
                "ORDER BY r.round",
                (task,),
            )
            return [
                Round(
                    task,
                    n,
                    RoundState(state),
                    deadline,
                    quorum_at,
                    frozenset(subs),
                    attempt,
                    None if cohort is None else frozenset(cohort),
                    float(epsilon),
                )
                for n, state, deadline, quorum_at, subs, attempt, cohort, epsilon in cur.fetchall()
            ]

    def current_round(self, task: str) -> Round:
        rounds = self.rounds(task)
        if not rounds:
            raise NotFound(f"no federation for task {task!r}")
        return rounds[-1]

    def failure(self, task: str, number: int) -> str:
        with self._db.transaction() as cur:
            cur.execute("SELECT failure FROM rounds WHERE task=%s AND round=%s", (task, number))
            row = cur.fetchone()
        return (row[0] or "") if row else ""

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
    ) -> Iterator[CopySubmissionWriter]:
        """A transaction that stores a whole submission or nothing. Its chunks are copied in as
        they arrive (their foreign key to the submission row is checked at commit: migration
        0031); the round row is share-locked only at the end, for the checks and the submission
        row, so the round cannot start aggregating (or close a stage) between them and the
        commit, and nothing is locked while the sender is still sending. `masked` (secure
        aggregation): the sender must have shared in the round (U2) and the upload stage must
        still be open."""
        with self._db.transaction() as cur:
            writer = CopySubmissionWriter(cur, task, number, hospital, total)
            yield writer
            if writer.count != total:
                raise InvalidArgument(f"the submission announced {total} chunks but carried {writer.count}")
            cur.execute(
                "SELECT state FROM rounds WHERE task=%s AND round=%s FOR SHARE",
                (task, number),
            )
            row = cur.fetchone()
            if row is None or RoundState(row[0]) not in (RoundState.OPEN, RoundState.COLLECTING):
                raise FailedPrecondition(f"round {number} of {task} is not accepting submissions")
            self._check_chunk_count(cur, task, number, total)
            if masked:
                stages = self._stages(cur, task, number)
                if "uploads" in stages or hospital not in stages.get("shares", frozenset()):
                    raise FailedPrecondition(
                        f"round {number} of {task} takes no upload from {hospital!r} now: only members "
                        "who shared, while the upload stage is open"
                    )
            try:
                cur.execute(
                    "INSERT INTO submissions (task, round, hospital, total_chunks, epsilon, signature, "
                    "certificate, digests) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                    (task, number, hospital, total, epsilon, signature, certificate, writer.digests()),
                )
            except psycopg2.errors.UniqueViolation:
                raise DuplicateSubmission(hospital) from None

    @staticmethod
    def _check_chunk_count(cur: psycopg2.extensions.cursor, task: str, number: int, total: int) -> None:
        """Every upload of a round has the chunk count of those already accepted (under the round's
        share lock), so a round never holds uploads that cannot be added together."""
        cur.execute("SELECT total_chunks FROM submissions WHERE task=%s AND round=%s LIMIT 1", (task, number))
        row = cur.fetchone()
        if row is not None and row[0] != total:
            raise InvalidArgument(
                "the upload does not fit this round's layout",
                [FieldProblem("total_chunks", f"this round's uploads have {row[0]} chunks, not {total}")],
            )

    def note_submission(self, s: FederationSettings, number: int) -> None:
        """Moves the round to COLLECTING and stamps the moment quorum was reached."""
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE rounds SET state=%s, quorum_at = COALESCE(quorum_at, CASE WHEN "
                "(SELECT count(*) FROM submissions WHERE task=%s AND round=%s) >= %s THEN now() END) "
                "WHERE task=%s AND round=%s AND state IN ('open', 'collecting')",
                (RoundState.COLLECTING.value, s.task, number, s.quorum, s.task, number),
            )

    def mark_aggregating(self, task: str, number: int) -> bool:
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE rounds SET state='aggregating' WHERE task=%s AND round=%s AND state IN ('open','collecting')",
                (task, number),
            )
            return cur.rowcount == 1

    def chunk_count(self, task: str, number: int) -> int:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT max(total_chunks), min(total_chunks) FROM submissions WHERE task=%s AND round=%s",
                (task, number),
            )
            hi, lo = one_row(cur)
        if hi != lo:
            raise FailedPrecondition(f"hospitals sent different chunk counts for round {number}")
        return int(hi or 0)

    def chunks_at(self, task: str, number: int, index: int) -> list[bytes]:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT ciphertext FROM submission_chunks WHERE task=%s AND round=%s AND idx=%s ORDER BY hospital",
                (task, number, index),
            )
            return [bytes(r[0]) for r in cur.fetchall()]

    def close_round(
        self,
        s: FederationSettings,
        number: int,
        total_chunks: int,
        contributors: int,
        next_round: int | None,
        sum_at: Callable[[int], bytes],
    ) -> None:
        """Stores the sum chunk by chunk (`sum_at(i)` computes chunk i), closes the round and opens
        the next, all in one transaction: memory holds one chunk position at a time."""
        with self._db.transaction() as cur:
            for index in range(total_chunks):
                copy_rows(
                    cur,
                    "aggregates",
                    ("task", "round", "idx", "total_chunks", "contributors", "ciphertext"),
                    ("text", "int8", "int4", "int4", "int4", "bytea"),
                    [(s.task, number, index, total_chunks, contributors, sum_at(index))],
                )
            cur.execute(
                "UPDATE rounds SET state='closed', closed_at=now() WHERE task=%s AND round=%s",
                (s.task, number),
            )
            # Unmasked uploads go in the transaction that commits their sum; under secure
            # aggregation they stay, so every member can check the sum against the signed uploads.
            if not s.pairwise_masking:
                self._delete_uploads(cur, s.task, number)
            if next_round is not None:
                self._open_round(cur, s, next_round)

    def fail_round(self, s: FederationSettings, number: int, reason: str, next_round: int | None) -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE rounds SET state='failed', closed_at=now(), failure=%s WHERE task=%s AND round=%s",
                (reason, s.task, number),
            )
            self._delete_uploads(cur, s.task, number)
            if next_round is not None:
                self._open_round(cur, s, next_round)

    @staticmethod
    def _delete_uploads(cur: psycopg2.extensions.cursor, task: str, number: int) -> None:
        """The ciphertexts of a finished round's individual uploads; who submitted stays."""
        cur.execute("DELETE FROM submission_chunks WHERE task=%s AND round=%s", (task, number))

    # -- pairwise masking ------------------------------------------------------------------------
    def publish_mask_key(self, task: str, number: int, hospital: str, key: SignedMaskKey) -> None:
        """Stores a hospital's public key for a round (with its signature and certificate);
        replaces it while the cohort is open, and after that accepts only the identical key (a
        restarted agent repeating itself: the first signature stays)."""
        public_key = key.public_key
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT state, cohort FROM rounds WHERE task=%s AND round=%s FOR SHARE", (task, number)
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"round {number} of {task} does not exist")
            cur.execute(
                "SELECT public_key FROM mask_keys WHERE task=%s AND round=%s AND hospital=%s",
                (task, number, hospital),
            )
            existing = cur.fetchone()
            if existing is not None and bytes(existing[0]) == public_key:
                return
            if RoundState(row[0]) not in (RoundState.OPEN, RoundState.COLLECTING) or row[1] is not None:
                raise FailedPrecondition(
                    f"the cohort of round {number} of {task} is already fixed; a new mask key is too late"
                )
            cur.execute(
                "INSERT INTO mask_keys (task, round, hospital, public_key, signature, certificate) "
                "VALUES (%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (task, round, hospital) DO UPDATE SET public_key=EXCLUDED.public_key, "
                "signature=EXCLUDED.signature, certificate=EXCLUDED.certificate, "
                "published_at=clock_timestamp()",
                (task, number, hospital, public_key, key.signature, key.certificate),
            )

    def mask_key_times(self, task: str, number: int) -> list[datetime]:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT published_at FROM mask_keys WHERE task=%s AND round=%s ORDER BY published_at",
                (task, number),
            )
            return [r[0] for r in cur.fetchall()]

    def mask_keys(self, task: str, number: int) -> dict[str, SignedMaskKey]:
        """The signed public keys of the round's cohort (empty while the cohort is not fixed)."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT k.hospital, k.public_key, k.signature, k.certificate FROM mask_keys k JOIN rounds r "
                "ON r.task=k.task AND r.round=k.round WHERE k.task=%s AND k.round=%s "
                "AND k.hospital = ANY(r.cohort)",
                (task, number),
            )
            return {h: SignedMaskKey(bytes(k), bytes(s), bytes(c)) for h, k, s, c in cur.fetchall()}

    def fix_cohort(self, s: FederationSettings, number: int) -> bool:
        """Closes the key stage: the cohort is every hospital with a key; the submission stage
        gets a full deadline of its own."""
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE rounds SET cohort = (SELECT array_agg(hospital ORDER BY hospital) FROM mask_keys "
                "WHERE task=%s AND round=%s), deadline_at=%s, stage_opened_at=now() "
                "WHERE task=%s AND round=%s AND cohort IS NULL AND state IN ('open','collecting')",
                (s.task, number, datetime.now(UTC) + timedelta(seconds=s.deadline_seconds), s.task, number),
            )
            return cur.rowcount == 1

    # -- secure aggregation stages -------------------------------------------------------------
    @staticmethod
    def _stages(cur: psycopg2.extensions.cursor, task: str, number: int) -> dict[str, frozenset[str]]:
        cur.execute("SELECT stage, members FROM round_stages WHERE task=%s AND round=%s", (task, number))
        return {stage: frozenset(members) for stage, members in cur.fetchall()}

    def stages(self, task: str, number: int) -> dict[str, frozenset[str]]:
        """The closed stages of a round and who posted in each."""
        with self._db.transaction() as cur:
            return self._stages(cur, task, number)

    def stage_opened_at(self, task: str, number: int) -> datetime | None:
        with self._db.transaction() as cur:
            cur.execute("SELECT stage_opened_at FROM rounds WHERE task=%s AND round=%s", (task, number))
            row = cur.fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _posters(cur: psycopg2.extensions.cursor, task: str, number: int, stage: str) -> frozenset[str]:
        """Who posted in a stage (uploads: who submitted)."""
        if stage == "uploads":
            cur.execute("SELECT hospital FROM submissions WHERE task=%s AND round=%s", (task, number))
        else:
            cur.execute(
                "SELECT DISTINCT sender FROM round_messages WHERE task=%s AND round=%s AND stage=%s",
                (task, number, stage),
            )
        return frozenset(r[0] for r in cur.fetchall())

    def poster_names(self, task: str, number: int, stage: str) -> frozenset[str]:
        with self._db.transaction() as cur:
            return self._posters(cur, task, number, stage)

    def close_stage(self, s: FederationSettings, number: int, stage: str) -> bool:
        """Closes an open stage with whoever posted in it; the next stage gets a full deadline."""
        with self._db.transaction() as cur:
            cur.execute("SELECT state FROM rounds WHERE task=%s AND round=%s FOR UPDATE", (s.task, number))
            row = cur.fetchone()
            if row is None or RoundState(row[0]) not in _stage_states(stage):
                return False
            if stage in self._stages(cur, s.task, number):
                return False
            members = sorted(self._posters(cur, s.task, number, stage))
            cur.execute(
                "INSERT INTO round_stages (task, round, stage, members) VALUES (%s,%s,%s,%s)",
                (s.task, number, stage, members),
            )
            now = datetime.now(UTC)
            if stage in VOTE_STAGES:
                # A closed round: the next vote stage's window opens now; its deadline stays.
                cur.execute(
                    "UPDATE rounds SET stage_opened_at=%s WHERE task=%s AND round=%s", (now, s.task, number)
                )
                return True
            cur.execute(
                "UPDATE rounds SET stage_opened_at=%s, deadline_at=%s WHERE task=%s AND round=%s",
                (now, now + timedelta(seconds=s.deadline_seconds), s.task, number),
            )
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
        """Stores a member's message of an open stage (`parts`: (recipient or "", payload)), once:
        the identical message again is a no-op, another one is refused."""
        with self._db.transaction() as cur:
            cur.execute("SELECT state FROM rounds WHERE task=%s AND round=%s FOR SHARE", (task, number))
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"round {number} of {task} does not exist")
            cur.execute(
                "SELECT recipient, payload, signature FROM round_messages WHERE task=%s AND round=%s "
                "AND stage=%s AND sender=%s",
                (task, number, stage, sender),
            )
            existing = {(r, bytes(p), bytes(g)) for r, p, g in cur.fetchall()}
            if existing and existing == {(r, p, signature) for r, p in parts}:
                return  # a retry after a lost answer: stored, even if the stage closed since
            if RoundState(row[0]) not in _stage_states(stage):
                raise FailedPrecondition(f"round {number} of {task} is {row[0]}; the {stage} stage is over")
            if stage in self._stages(cur, task, number):
                raise FailedPrecondition(f"the {stage} stage of round {number} of {task} is closed")
            if sender not in expected:
                raise FailedPrecondition(
                    f"{sender!r} is not among the members expected in the {stage} stage of round {number}"
                )
            if existing:
                raise FailedPrecondition(
                    f"{sender!r} already posted another message in the {stage} stage of round {number}"
                )
            for recipient, payload in parts:
                cur.execute(
                    "INSERT INTO round_messages (task, round, stage, sender, recipient, payload, signature, "
                    "certificate) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                    (task, number, stage, sender, recipient, payload, signature, certificate),
                )

    def messages(
        self, task: str, number: int, stage: str, recipient: str | None
    ) -> list[tuple[str, bytes, bytes, bytes]]:
        """(sender, payload, signature, certificate) of a stage: to `recipient`, or broadcast."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT sender, payload, signature, certificate FROM round_messages WHERE task=%s AND "
                "round=%s AND stage=%s AND recipient=%s ORDER BY sender",
                (task, number, stage, recipient or ""),
            )
            return [(s, bytes(p), bytes(g), bytes(c)) for s, p, g, c in cur.fetchall()]

    def upload(
        self, task: str, number: int, hospital: str, indexes: list[int]
    ) -> tuple[bytes, bytes, bytes, Iterator[tuple[int, bytes]]]:
        """(digests, signature, certificate, [(index, chunk)]) of one hospital's upload; the chunks
        are read one per transaction as they are sent, so serving every member's check of the sum
        holds one chunk in memory per call, not the upload."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT digests, signature, certificate FROM submissions WHERE task=%s AND round=%s "
                "AND hospital=%s",
                (task, number, hospital),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no upload of {hospital!r} in round {number} of {task}")
            cur.execute(
                "SELECT idx FROM submission_chunks WHERE task=%s AND round=%s AND hospital=%s "
                "AND idx = ANY(%s) ORDER BY idx",
                (task, number, hospital, sorted(set(indexes))),
            )
            stored = [r[0] for r in cur.fetchall()]

        def chunks() -> Iterator[tuple[int, bytes]]:
            for index in stored:
                with self._db.transaction() as cur:
                    cur.execute(
                        "SELECT ciphertext FROM submission_chunks WHERE task=%s AND round=%s AND hospital=%s "
                        "AND idx=%s",
                        (task, number, hospital, index),
                    )
                    found = cur.fetchone()
                if found is not None:  # the round's uploads are deleted only when it fails
                    yield index, bytes(found[0])

        return bytes(row[0]), bytes(row[1]), bytes(row[2]), chunks()

    def aggregate(self, task: str, number: int) -> Iterator[tuple[int, int, int, bytes]]:
        """(index, total, contributors, ciphertext) of a closed round's sum, chunk by chunk."""
        with self._db.transaction() as cur:
            cur.execute("SELECT idx FROM aggregates WHERE task=%s AND round=%s ORDER BY idx", (task, number))
            indexes = [r[0] for r in cur.fetchall()]
        for index in indexes:
            with self._db.transaction() as cur:
                cur.execute(
                    "SELECT total_chunks, contributors, ciphertext FROM aggregates WHERE task=%s AND round=%s AND idx=%s",
                    (task, number, index),
                )
                total, contributors, data = one_row(cur)
            yield index, total, contributors, bytes(data)
