"""Drives rounds: accepts submissions, closes rounds at quorum/deadline, adds ciphertexts.

All state lives in the round store (PostgreSQL in the service), so a restarted aggregator picks
up exactly where the killed one stopped: a round caught in AGGREGATING is simply aggregated again
(nothing of it was committed). Every deadline is decided on the clock port, so a test drives rounds
with the in-memory store and a clock it advances (tests/unit/test_aggregator_core.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from fibemrss.domain.errors import (
    FailedPrecondition,
    FieldProblem,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from fibemrss.he.errors import HeError
from fibemrss.he.mask_signatures import MaskKeyRefused, MaskKeyVerifier, SignedMaskKey
from fibemrss.he.params import HeParams
from fibemrss.he.secagg.protocol import ADVERT_BYTES, RoundContext, advert_statement
from services.aggregator.core.ciphertexts import RoundLayout, UploadCheck, expected_layout
from services.aggregator.core.cohorts import (
    STAGES,
    VOTE_PREVIOUS,
    VOTE_STAGES,
    decide_cohort,
    decide_stage,
    decide_vote_stage,
)
from services.aggregator.core.ports import Clock, DuplicateSubmission, RoundStore, WallClock
from services.aggregator.core.round_state import (
    FederationSettings,
    Round,
    RoundState,
    decide_close,
    decide_submission,
    is_finished,
    next_round_number,
)
from services.aggregator.core.running_sums import RunningSums, Sum

log = logging.getLogger(__name__)


CACHE_LIMIT_BYTES = 256 * 1024 * 1024
# An upload larger than this is refused (it is checked and stored chunk by chunk as it streams).
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
# Uploads streamed at once; the others queue (_upload_slot). One: the aggregator's memory is then
# the running sum (serialized, and once the round closed the newest sum served: the same bytes),
# one upload's compact chunks (kept until it commits, to subtract them if it does not) and one
# chunk position being loaded (docs/federation.md); and the check of a chunk is CPU the process
# would not run faster on two streams.
UPLOAD_SLOTS = 1
UPLOAD_QUEUE_SECONDS = 110.0
# A vote (a candidate digest and a bit) or a tally (a digest): small, whatever a sender claims.
MAX_VOTE_BYTES = 64


class Adder(Protocol):
    @property
    def params(self) -> HeParams: ...
    def upload_check(self, total: int, expected: RoundLayout | None) -> UploadCheck: ...
    def add(self, parts: Sequence[bytes]) -> bytes: ...
    def new_sum(self, chunk_count: int) -> Sum: ...


class Coordinator:
    def __init__(
        self,
        store: RoundStore,
        adder: Adder,
        registry: CollectorRegistry | None = None,
        tick_seconds: float = 0.25,
        mask_key_verifier: MaskKeyVerifier | None = None,
        clock: Clock | None = None,
        upload_slots: int = UPLOAD_SLOTS,
        upload_queue_seconds: float = UPLOAD_QUEUE_SECONDS,
    ) -> None:
        """`mask_key_verifier` (the federation CA, with mutual TLS): round keys must carry a valid
        signature of their hospital's agent, so a hospital that sends a broken one is refused alone
        instead of making every honest agent refuse the round. `clock` (the wall clock unless
        given) decides every deadline and the long-polls' timeouts. `upload_slots`: uploads
        streamed at once (each holds a database connection and its own compact chunks until it
        commits); the others wait up to `upload_queue_seconds` for a slot."""
        if upload_slots < 1:
            raise ValueError("upload_slots must be at least 1")
        self._upload_slot_count = upload_slots
        self._upload_slots = threading.BoundedSemaphore(upload_slots)
        self._upload_queue_seconds = upload_queue_seconds
        self._store = store
        self._clock: Clock = clock if clock is not None else WallClock()
        self._mask_key_verifier = mask_key_verifier
        self._adder = adder
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tick_seconds = tick_seconds
        self._thread = threading.Thread(target=self._run, name="round-ticker", daemon=True)
        # The newest sum stays in memory: every hospital fetches it right after the round closes.
        self._latest: tuple[str, int, int, list[bytes]] | None = None
        self._running = RunningSums(adder.new_sum)
        self._submissions = Counter(
            "fibemrss_submissions_total",
            "Accepted encrypted submissions.",
            ["task", "outcome"],
            registry=registry,
        )
        self._rounds = Counter(
            "fibemrss_rounds_finished_total", "Rounds closed or failed.", ["task", "state"], registry=registry
        )
        self._current = Gauge(
            "fibemrss_current_round", "The open round per task.", ["task"], registry=registry
        )
        self._deadline = Gauge(
            "fibemrss_round_deadline_timestamp_seconds",
            "Deadline (Unix time) of the open round per task; 0 once the federation is done.",
            ["task"],
            registry=registry,
        )
        self._refused = Counter(
            "fibemrss_rounds_refused_total",
            "Closed rounds whose acceptance vote did not hold: a refusal, or a survivor's vote "
            "missing at the deadline; no hospital publishes them.",
            ["task"],
            registry=registry,
        )
        self._last_submitted = Gauge(
            "fibemrss_hospital_last_submitted_round",
            "The newest round each hospital's accepted submission was for.",
            ["task", "hospital"],
            registry=registry,
        )

    def start(self) -> None:
        self._thread.start()

    def release_waiters(self) -> None:
        """Ends every GetRound long-poll now (at shutdown); agents simply ask again elsewhere."""
        self._stop.set()
        self._notify()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- federations and rounds ------------------------------------------------------------
    def start_federation(self, settings: FederationSettings) -> None:
        settings.validate()
        limit = self._adder.params.max_parties
        if len(settings.hospitals) > limit:
            # Every round's sum must decrypt exactly: refused now, not after a whole round.
            raise InvalidArgument(
                "too many hospitals",
                [
                    FieldProblem(
                        "hospitals",
                        f"{len(settings.hospitals)} hospitals; the HE codec's sums decrypt exactly for at "
                        f"most {limit} (HeParams.max_parties)",
                    )
                ],
            )
        if self._store.create_federation(settings):
            # A new federation of a study run before: nothing summed or cached for the old one's
            # rounds (numbered as the new one's) may count in the new one.
            self._running.forget(settings.task)
            latest = self._latest
            if latest is not None and latest[0] == settings.task:
                self._latest = None
            log.info("federation started", extra={"task": settings.task, "rounds": settings.rounds})
        self._notify()

    def wait_for_round(
        self, task: str, number: int, timeout: float, still_wanted: Callable[[], bool] = lambda: True
    ) -> Round:
        """Returns once round `number` exists (or the federation is done), at the timeout, or
        within a second of the caller going away (`still_wanted` false), freeing its worker."""
        deadline = self._clock.now().timestamp() + timeout
        with self._changed:
            while True:
                current = self._store.current_round(task)
                settings = self._store.settings(task)
                if (
                    current.number >= number
                    or self.is_done(settings, current)
                    or self._stop.is_set()
                    or not still_wanted()
                ):
                    return current
                remaining = deadline - self._clock.now().timestamp()
                if remaining <= 0:
                    return current
                self._changed.wait(min(remaining, 1.0))

    def wait_for_cohort(
        self, task: str, timeout: float, still_wanted: Callable[[], bool] = lambda: True
    ) -> Round:
        """Returns once the current round's cohort is fixed (or the round is over), or at the timeout."""
        deadline = self._clock.now().timestamp() + timeout
        with self._changed:
            first: tuple[int, int] | None = None
            while True:
                current = self._store.current_round(task)
                if first is None:
                    first = (current.number, current.attempt)
                if (
                    current.cohort is not None
                    or (current.number, current.attempt) != first
                    or current.state not in (RoundState.OPEN, RoundState.COLLECTING)
                    or self._stop.is_set()
                ):
                    return current
                if not still_wanted():
                    return current
                remaining = deadline - self._clock.now().timestamp()
                if remaining <= 0:
                    return current
                self._changed.wait(min(remaining, 1.0))

    @staticmethod
    def is_done(settings: FederationSettings, current: Round) -> bool:
        return is_finished(settings.rounds, current.number, current.state)

    # -- submissions -------------------------------------------------------------------------
    def submit(
        self,
        task: str,
        number: int,
        hospital: str,
        total: int,
        chunks: Iterable[tuple[int, bytes]],
        attempt: int = 0,
        epsilon: float = 0.0,
        signature: bytes = b"",
        certificate: bytes = b"",
    ) -> bool:
        """Stores a whole submission; returns True when it was a repeat of an accepted one.
        Under secure aggregation the sender must be in U2 and the upload carries its signature
        over the chunks' digests (checked by every member, not trusted here); `attempt` is unused."""
        if total < 1:
            raise InvalidArgument("total_chunks must be at least 1")
        if not (epsilon >= 0.0 and epsilon < float("inf")):
            raise InvalidArgument(
                "invalid epsilon", [FieldProblem("epsilon", "must be a finite number >= 0")]
            )
        settings = self._store.settings(task)
        current = self._store.current_round(task)
        decision = decide_submission(settings, current, number, hospital)
        if decision == "duplicate":
            for _ in chunks:  # drain the stream; the stored copy stands
                pass
            self._submissions.labels(task, "duplicate").inc()
            return True
        if settings.pairwise_masking and current.cohort is None:
            raise FailedPrecondition(
                f"round {number} of {task} is still collecting mask keys; submit once its cohort is fixed"
            )
        # Refused before reading the stream when the announced chunk count misfits the round.
        check = self._adder.upload_check(total, expected_layout(task, number, self._adder.params))
        attempt = current.attempt
        with self._upload_slot():
            upload = self._running.begin(task, number, hospital, attempt)
            try:
                # Each chunk is checked, added into the round's running sum and copied into the
                # transaction as it arrives; the round is locked only at the end, for the final
                # checks and the insert (nothing is locked while the sender is still sending).
                with self._store.submission(
                    task, number, hospital, total, settings.pairwise_masking, epsilon, signature, certificate
                ) as writer:
                    size = 0
                    for index, ciphertext in chunks:
                        size += len(ciphertext)
                        if size > MAX_UPLOAD_BYTES:
                            raise InvalidArgument(
                                "upload too large",
                                [FieldProblem("chunks", f"more than {MAX_UPLOAD_BYTES} bytes")],
                            )
                        loaded = check.add(index, ciphertext)
                        if loaded is not None:
                            writer.add(index, ciphertext)
                            self._running.add(upload, index, ciphertext, loaded)
                    # Validated whole before it counts: a bad upload is refused to its sender alone.
                    check.finish()
                    self._running.committing(upload)
            except DuplicateSubmission:
                self._running.withdraw(upload)
                self._submissions.labels(task, "duplicate").inc()
                return True
            except BaseException:
                # Refused or rolled back: what of it the running sum took in comes out again.
                self._running.withdraw(upload)
                raise
            self._running.commit(upload)
        self._store.note_submission(settings, number)
        self._submissions.labels(task, "accepted").inc()
        self._last_submitted.labels(task, hospital).set(number)
        self._wake.set()
        return False

    @contextmanager
    def _upload_slot(self) -> Iterator[None]:
        """At most `upload_slots` uploads stream at once: the others queue here, held back by
        gRPC's flow control, so the aggregator's memory and connections stay bounded whatever
        the number of hospitals, and none is refused for it (UNAVAILABLE only past the wait)."""
        if not self._upload_slots.acquire(timeout=self._upload_queue_seconds):
            raise Unavailable(
                f"{self._upload_slot_count} uploads in flight for over {self._upload_queue_seconds:g} s; retry"
            )
        try:
            yield
        finally:
            self._upload_slots.release()

    # -- pairwise masking ------------------------------------------------------------------------
    def publish_mask_key(self, task: str, number: int, hospital: str, key: SignedMaskKey) -> None:
        settings = self._store.settings(task)
        public_key = key.public_key
        if not settings.pairwise_masking:
            raise FailedPrecondition(f"the federation of {task} does not use pairwise masking")
        if hospital not in settings.hospitals:
            raise PermissionDenied(f"hospital {hospital!r} is not part of the federation for {task}")
        if len(public_key) != ADVERT_BYTES:
            raise InvalidArgument(
                "malformed mask key",
                [
                    FieldProblem(
                        "public_key",
                        f"must be the {ADVERT_BYTES}-byte advertisement: two X25519 public keys and a "
                        "SHA-256 commitment",
                    )
                ],
            )
        if self._mask_key_verifier is not None:
            ctx = RoundContext(settings.federation_id, task, settings.study_hash, number)
            try:
                self._mask_key_verifier.check_message(
                    hospital, advert_statement(ctx, hospital, public_key), key.signature, key.certificate
                )
            except MaskKeyRefused as refused:
                raise InvalidArgument("mask key refused", [FieldProblem("signature", str(refused))]) from None
        current = self._store.current_round(task)
        if number != current.number:
            raise FailedPrecondition(f"round {number} is not the current round {current.number} of {task}")
        self._store.publish_mask_key(task, number, hospital, key)
        self._wake.set()

    def mask_keys(self, task: str, number: int) -> dict[str, SignedMaskKey]:
        rounds = {r.number: r for r in self._store.rounds(task)}
        if number not in rounds:
            raise NotFound(f"round {number} of {task} does not exist")
        if rounds[number].cohort is None:
            raise FailedPrecondition(f"the cohort of round {number} of {task} is not fixed yet")
        return self._store.mask_keys(task, number)

    # -- secure aggregation stages ------------------------------------------------------------
    def _expected(self, current: Round, stage: str, stages: dict[str, frozenset[str]]) -> frozenset[str]:
        """Who may post in `stage`: the members of the stage before it (the cohort for shares)."""
        order = list(STAGES)
        i = order.index(stage)
        if i == 0:
            return current.cohort or frozenset()
        return stages.get(order[i - 1], frozenset())

    def post_message(
        self,
        task: str,
        number: int,
        hospital: str,
        stage: str,
        parts: list[tuple[str, bytes]],
        signature: bytes,
        certificate: bytes,
    ) -> None:
        settings = self._store.settings(task)
        if not settings.pairwise_masking:
            raise FailedPrecondition(f"the federation of {task} does not use secure aggregation")
        if hospital not in settings.hospitals:
            raise PermissionDenied(f"hospital {hospital!r} is not part of the federation for {task}")
        if stage == "uploads":
            raise InvalidArgument(
                "uploads go through SubmitUpdate", [FieldProblem("stage", "not a message stage")]
            )
        if stage in VOTE_STAGES:
            self._post_vote(settings, number, hospital, stage, parts, signature, certificate)
            return
        current = self._store.current_round(task)
        if number != current.number or current.cohort is None:
            raise FailedPrecondition(f"round {number} of {task} has no open {stage} stage")
        stages = self._store.stages(task, number)
        previous = list(STAGES)[list(STAGES).index(stage) - 1] if stage != "shares" else None
        if previous is not None and previous not in stages:
            raise FailedPrecondition(f"the {stage} stage of round {number} has not opened yet")
        expected = self._expected(current, stage, stages)
        if stage == "shares":
            bad = [to for to, _ in parts if to not in expected or to == hospital]
            if bad or len({to for to, _ in parts}) != len(parts):
                raise InvalidArgument(
                    "misaddressed shares",
                    [
                        FieldProblem(
                            "envelopes",
                            f"each recipient once, a cohort member other than the sender: {sorted(bad)}",
                        )
                    ],
                )
        self._store.post_message(task, number, stage, hospital, parts, signature, certificate, expected)
        self._wake.set()

    def _post_vote(
        self,
        settings: FederationSettings,
        number: int,
        hospital: str,
        stage: str,
        parts: list[tuple[str, bytes]],
        signature: bytes,
        certificate: bytes,
    ) -> None:
        """A vote or tally on a closed round: relayed as sent (each hospital checks every
        signature); only the round's survivors vote, only the voters tally."""
        task = settings.task
        rounds = {r.number: r for r in self._store.rounds(task)}
        if number < 1 or number not in rounds or rounds[number].state != RoundState.CLOSED:
            raise FailedPrecondition(f"round {number} of {task} is not closed: nothing to vote on")
        if len(parts) != 1 or parts[0][0] or not 1 <= len(parts[0][1]) <= MAX_VOTE_BYTES:
            raise InvalidArgument(
                "malformed vote",
                [
                    FieldProblem(
                        "payload", f"one broadcast payload of 1 to {MAX_VOTE_BYTES} bytes, no envelopes"
                    )
                ],
            )
        stages = self._store.stages(task, number)
        previous = VOTE_PREVIOUS[stage]
        if previous not in stages:
            raise FailedPrecondition(f"the {stage} stage of round {number} has not opened yet")
        self._store.post_message(
            task, number, stage, hospital, parts, signature, certificate, stages[previous]
        )
        self._wake.set()

    def stage(
        self,
        task: str,
        number: int,
        stage: str,
        reader: str,
        timeout: float,
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> tuple[bool, frozenset[str], list[tuple[str, bytes, bytes, bytes]]]:
        """(closed, members, messages readable by `reader`) of a stage, waiting up to `timeout`
        for it to close (or the round to end)."""
        deadline = self._clock.now().timestamp() + timeout
        with self._changed:
            while True:
                rounds = {r.number: r for r in self._store.rounds(task)}
                if number not in rounds:
                    raise NotFound(f"round {number} of {task} does not exist")
                stages = self._store.stages(task, number)
                over = rounds[number].state not in (RoundState.OPEN, RoundState.COLLECTING)
                if stage in VOTE_STAGES:
                    # Votes are relayed on a closed round: over only if it failed.
                    over = rounds[number].state == RoundState.FAILED
                remaining = deadline - self._clock.now().timestamp()
                if stage in stages or over or remaining <= 0 or self._stop.is_set() or not still_wanted():
                    break
                self._changed.wait(min(remaining, 1.0))
        closed = stage in stages
        if not closed or stage == "uploads":
            return closed, stages.get(stage, frozenset()), []
        recipient = reader if stage == "shares" else None
        return True, stages[stage], self._store.messages(task, number, stage, recipient)

    def upload(
        self, task: str, number: int, hospital: str, indexes: list[int]
    ) -> tuple[bytes, bytes, bytes, Iterable[tuple[int, bytes]]]:
        if "uploads" not in self._store.stages(task, number):
            raise FailedPrecondition(f"the uploads of round {number} of {task} are not closed yet")
        return self._store.upload(task, number, hospital, indexes)

    # -- the ticker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the ticker must survive a database hiccup
                log.exception("round ticker failed; retrying")
            self._wake.wait(self._tick_seconds)
            self._wake.clear()

    def tick(self) -> None:
        for task in self._store.tasks():
            settings = self._store.settings(task)
            current = self._store.current_round(task)
            self._current.labels(task).set(current.number)
            self._refused.labels(task)  # exported from 0, so an alert sees its first increase
            done = self.is_done(settings, current)
            self._deadline.labels(task).set(0 if done else current.deadline_at.timestamp())
            if current.state == RoundState.AGGREGATING:
                self._aggregate(settings, current)  # left over from a crash
                continue
            if settings.pairwise_masking:
                self._tick_votes(settings)
                self._tick_masked(settings, current)
                continue
            if current.quorum_at is None and len(current.submitted) >= settings.quorum:
                self._store.note_submission(settings, current.number)
                current = self._store.current_round(task)
            decision = decide_close(settings, current, self._clock.now())
            if decision == "aggregate" and self._store.mark_aggregating(task, current.number):
                # Re-read under the new state: an upload that committed while the state change
                # waited for its lock is in the sum; none can commit after it.
                self._aggregate(settings, self._store.current_round(task))
            elif decision == "fail":
                self._fail_round(
                    settings,
                    current.number,
                    f"deadline passed with {len(current.submitted)} of {settings.quorum} required submissions",
                )

    def _fail_round(self, settings: FederationSettings, number: int, reason: str) -> None:
        """Fails the round with its reason and opens the next: no round is left without an exit."""
        self._store.fail_round(settings, number, reason, next_round_number(settings, number))
        self._rounds.labels(settings.task, "failed").inc()
        log.warning("round failed", extra={"task": settings.task, "round": number, "reason": reason})
        self._notify()

    def _tick_masked(self, settings: FederationSettings, current: Round) -> None:
        """A secure-aggregation round: fix its cohort, close its stages one after another (each
        with whoever posted in it), then add the uploads of U3 (services/aggregator/core/cohorts.py)."""
        now = self._clock.now()
        if current.cohort is None:
            decision = decide_cohort(
                settings, current, self._store.mask_key_times(settings.task, current.number), now
            )
            if decision == "fix" and self._store.fix_cohort(settings, current.number):
                log.info("cohort fixed", extra={"task": settings.task, "round": current.number})
                self._notify()
            elif decision == "fail":
                self._fail_round(
                    settings, current.number, f"deadline passed with fewer than {settings.needed} mask keys"
                )
            return
        if current.quorum_at is None and len(current.submitted) >= settings.quorum:
            self._store.note_submission(settings, current.number)
            current = self._store.current_round(settings.task)
        stages = self._store.stages(settings.task, current.number)
        for stage in STAGES:
            if stage in stages:
                continue
            expected = self._expected(current, stage, stages)
            posted = (
                current.submitted
                if stage == "uploads"
                else self._store.poster_names(settings.task, current.number, stage)
            )
            opened = self._store.stage_opened_at(settings.task, current.number)
            step = decide_stage(settings, current, expected, posted, opened, now)
            if step == "close" and self._store.close_stage(settings, current.number, stage):
                log.info(
                    "stage closed",
                    extra={
                        "task": settings.task,
                        "round": current.number,
                        "stage": stage,
                        "missing": sorted(expected - posted),
                    },
                )
                self._notify()
            elif step == "fail":
                self._fail_round(
                    settings,
                    current.number,
                    f"deadline passed in the {stage} stage with {len(posted & expected)} of "
                    f"{len(expected)} members, fewer than the {settings.needed} required",
                )
            return
        if self._store.mark_aggregating(settings.task, current.number):
            self._aggregate(settings, self._store.current_round(settings.task))

    def _tick_votes(self, settings: FederationSettings) -> None:
        """Closes the vote stages of the two newest closed rounds (the acceptance vote,
        fibemrss.he.secagg.votes; the agents vote on a round before they train the next, so no
        older one is still voting): each when every expected voter posted, or at its deadline. A
        votes stage that closes with a refusal, or short of a survivor while others voted, counts
        a refused round (a study without the vote posts none: nothing is counted)."""
        now = self._clock.now()
        closed = sorted(
            (
                r.number
                for r in self._store.rounds(settings.task)
                if r.state == RoundState.CLOSED and r.number >= 1
            ),
            reverse=True,
        )
        for number in closed[:2]:
            stages = self._store.stages(settings.task, number)
            for stage in VOTE_STAGES:
                if stage in stages:
                    continue
                expected = stages.get(VOTE_PREVIOUS[stage], frozenset())
                posted = self._store.poster_names(settings.task, number, stage)
                opened = self._store.stage_opened_at(settings.task, number)
                if decide_vote_stage(settings, expected, posted, opened, now) != "close":
                    break
                if self._store.close_stage(settings, number, stage):
                    refusals = [
                        sender
                        for sender, payload, _, _ in self._store.messages(settings.task, number, stage, None)
                        if stage == "votes" and payload[-1:] != b"\x01"
                    ]
                    if stage == "votes" and posted and (refusals or not expected <= posted):
                        self._refused.labels(settings.task).inc()
                    log.info(
                        "vote stage closed",
                        extra={
                            "task": settings.task,
                            "round": number,
                            "stage": stage,
                            "missing": sorted(expected - posted),
                            "refusals": sorted(refusals),
                        },
                    )
                    self._notify()
                break

    def _aggregate(self, settings: FederationSettings, current: Round) -> None:
        began = time.perf_counter()
        try:
            total = self._store.chunk_count(settings.task, current.number)
        except FailedPrecondition as exc:
            # Uploads stored before whole-upload checks existed may disagree: nothing can add them.
            self._fail_round(settings, current.number, f"aggregation failed: {exc}")
            return
        cache: list[bytes] | None = []

        taken = self._running.take(settings.task, current.number, current.submitted, total, current.attempt)
        running: list[Sum | None] | None = None if taken is None else list(taken)
        del taken  # `running` alone holds the sums, so each goes once serialized

        def sum_at(index: int) -> bytes:
            nonlocal cache
            accumulator = running[index] if running is not None else None
            if accumulator is not None and running is not None:
                summed = accumulator.result()
                running[index] = None  # each position let go once serialized: never the sum twice
            else:
                summed = self._adder.add(self._store.chunks_at(settings.task, current.number, index))
            if cache is not None:
                cache.append(summed)
                if sum(len(c) for c in cache) > CACHE_LIMIT_BYTES:
                    cache = None  # a big model is served from the database, chunk by chunk
            return summed

        try:
            self._store.close_round(
                settings,
                current.number,
                total,
                len(current.submitted),
                next_round_number(settings, current.number),
                sum_at,
            )
        except HeError as exc:
            # Chunks passed the header checks at upload but not a full load: fail the round (the
            # next one opens) rather than retrying the same bytes forever.
            self._fail_round(settings, current.number, f"aggregation failed: {exc}")
            return
        self._latest = (settings.task, current.number, len(current.submitted), cache) if cache else None
        self._rounds.labels(settings.task, "closed").inc()
        log.info(
            "round closed",
            extra={
                "task": settings.task,
                "round": current.number,
                "contributors": len(current.submitted),
                "aggregate_seconds": round(time.perf_counter() - began, 3),
            },
        )
        self._notify()

    def cached_sum(self, task: str, number: int) -> tuple[int, list[bytes]] | None:
        """(contributors, chunks) of a closed round's sum if it is the newest one, else None."""
        latest = self._latest
        if latest is None or latest[0] != task or latest[1] != number:
            return None
        return latest[2], latest[3]

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
