"""The aggregator's round logic on its ports: the Coordinator over the in-memory round store and a
clock the test advances, so no test sleeps and none needs PostgreSQL. Its members are played by
the protocol's own state machine (fibemrss.he.secagg) with the real codec: the cohort is fixed,
each stage closes when every expected member posted or at grace with a dropout, the sum of the
survivors is exact once the revealed shares remove the masks, and a round with too few members
fails at its deadline and opens the next. The same rounds over PostgreSQL and gRPC:
tests/integration/test_masked_rounds.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from fibemrss.domain.errors import FailedPrecondition
from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import UpdateCodec, slot_count
from fibemrss.he.keys import HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.secagg.protocol import (
    RoundContext,
    RoundTranscript,
    SecAggMember,
    Signatures,
    Signed,
    unmask_correction,
)
from services.aggregator.adapters.memory_store import MemoryStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.core.round_state import FederationSettings, RoundState

TASK = "core-task"
HOSPITALS = ("a", "b", "c", "d")
N = 500
WEIGHTS = {"a": 303, "b": 294, "c": 123, "d": 200}
GRACE = 1.0
DEADLINE = 4.0
NO_TLS = Signatures(None, None)


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self._now = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


class Round:
    """One secure-aggregation round driven straight through the Coordinator; `tick()` is the
    ticker's one step, called by the test instead of a thread."""

    def __init__(self, keys: tuple[bytes, bytes]) -> None:
        self.key: HospitalKey = load_hospital_key(keys[0])
        self.clock = FakeClock()
        self.store = MemoryStore(self.clock)
        self.coordinator = Coordinator(
            self.store, CiphertextAdder(load_aggregator_key(keys[1])), clock=self.clock
        )
        self.coordinator.start_federation(
            FederationSettings(
                TASK, 3, 3, GRACE, DEADLINE, HOSPITALS, pairwise_masking=True, min_contributors=3
            )
        )
        self.members: dict[str, SecAggMember] = {}
        self.sent: dict[str, list[bytes]] = {}

    def tick(self) -> None:
        self.coordinator.tick()

    def ctx(self) -> RoundContext:
        s = self.store.settings(TASK)
        return RoundContext(s.federation_id, TASK, s.study_hash, self.store.current_round(TASK).number)

    def publish(self, hospital: str) -> None:
        member = SecAggMember(
            hospital, self.ctx(), NO_TLS, frozenset(HOSPITALS), 3, self.key.params.plain_modulus
        )
        self.members[hospital] = member
        self.coordinator.publish_mask_key(TASK, 0, hospital, member.signed_advert())

    def stage(self, name: str, reader: str = "") -> tuple[bool, frozenset[str], list]:
        return self.coordinator.stage(TASK, 0, name, reader, timeout=0)

    def share(self, hospitals: tuple[str, ...]) -> None:
        adverts = self.coordinator.mask_keys(TASK, 0)
        for h in hospitals:
            self.members[h].accept_cohort(adverts)
            self.coordinator.post_message(
                TASK, 0, h, "shares", sorted(self.members[h].share_boxes().items()), b"", b""
            )

    def accept_shares(self, hospitals: tuple[str, ...]) -> None:
        for h in hospitals:
            closed, members, messages = self.stage("shares", h)
            assert closed
            self.members[h].accept_shares(members, {sender: data for sender, data, _, _ in messages})

    def submit(self, hospital: str, values: np.ndarray) -> bool:
        mask = self.members[hospital].mask(slot_count(ChunkKind.WEIGHTED_UPDATE, values.size))
        chunks = UpdateCodec(self.key).encrypt(values, WEIGHTS[hospital], mask)
        signed = self.members[hospital].sign_upload(chunks)
        self.sent[hospital] = chunks
        return self.coordinator.submit(
            TASK,
            0,
            hospital,
            len(chunks),
            enumerate(chunks),
            signature=signed.signature,
            certificate=signed.certificate,
        )

    def sign_survivors(self, hospitals: tuple[str, ...]) -> frozenset[str]:
        closed, u3, _ = self.stage("uploads")
        assert closed
        for h in hospitals:
            signed = self.members[h].sign_survivors(u3)
            self.coordinator.post_message(
                TASK, 0, h, "survivors", [("", b"")], signed.signature, signed.certificate
            )
        return u3

    def reveal(self, hospitals: tuple[str, ...], u3: frozenset[str]) -> None:
        closed, _, messages = self.stage("survivors")
        assert closed
        sigs = {sender: Signed(signature, certificate) for sender, _, signature, certificate in messages}
        for h in hospitals:
            payload, signed = self.members[h].reveal(u3, sigs)
            self.coordinator.post_message(
                TASK, 0, h, "reveals", [("", payload)], signed.signature, signed.certificate
            )

    def unmasked(self, ctx: RoundContext, contributors: int) -> tuple[np.ndarray, int]:
        _, shares, _ = self.stage("shares")
        _, uploads, _ = self.stage("uploads")
        _, _, survivors = self.stage("survivors")
        closed, _, reveals = self.stage("reveals")
        assert closed
        transcript = RoundTranscript(
            self.coordinator.mask_keys(TASK, 0),
            shares,
            uploads,
            {s: Signed(g, c) for s, _, g, c in survivors},
            {s: (p, Signed(g, c)) for s, p, g, c in reveals},
        )
        correction = unmask_correction(
            ctx,
            transcript,
            NO_TLS,
            frozenset(HOSPITALS),
            3,
            slot_count(ChunkKind.WEIGHTED_UPDATE, N),
            self.key.params.plain_modulus,
        )
        cached = self.coordinator.cached_sum(TASK, 0)
        assert cached is not None and cached[0] == contributors
        return UpdateCodec(self.key).decrypt_average(cached[1], N, 3, correction)

    def closed_stages(self) -> list[str]:
        return sorted(self.store.stages(TASK, 0))


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keys()


@pytest.fixture
def rnd(keys: tuple[bytes, bytes]) -> Round:
    return Round(keys)


def test_each_stage_closes_as_soon_as_every_expected_member_posted_and_the_sum_is_exact(rnd: Round) -> None:
    rng = np.random.default_rng(5)
    updates = {h: rng.uniform(-1, 1, N) for h in HOSPITALS}
    for h in ("a", "b", "c"):
        rnd.publish(h)
    rnd.tick()
    assert rnd.store.current_round(TASK).cohort is None  # three keys of four, no time passed
    with pytest.raises(FailedPrecondition):  # keys are read only once the cohort is fixed
        rnd.coordinator.mask_keys(TASK, 0)
    rnd.publish("d")
    rnd.tick()
    current = rnd.coordinator.wait_for_cohort(TASK, timeout=0)
    assert current.cohort == frozenset(HOSPITALS)
    assert sorted(rnd.coordinator.mask_keys(TASK, 0)) == list(HOSPITALS)
    ctx = rnd.ctx()

    rnd.share(("a", "b", "c"))
    rnd.tick()
    assert rnd.stage("shares") == (False, frozenset(), [])
    rnd.share(("d",))
    rnd.tick()
    assert rnd.closed_stages() == ["shares"]
    rnd.accept_shares(HOSPITALS)

    for h in HOSPITALS:
        assert rnd.submit(h, updates[h]) is False
    again = rnd.sent["a"]  # a retried upload (its answer was lost) is answered as a duplicate
    assert rnd.coordinator.submit(TASK, 0, "a", len(again), enumerate(again)) is True
    rnd.tick()
    assert rnd.closed_stages() == ["shares", "uploads"]
    u3 = rnd.sign_survivors(HOSPITALS)
    assert u3 == frozenset(HOSPITALS)
    rnd.tick()
    assert rnd.closed_stages() == ["shares", "survivors", "uploads"]
    # A post stored but its answer lost: the identical message again, after the stage closed with
    # it, is answered OK (the retry of an honest hospital); any other message is still refused.
    signed = rnd.members["b"].sign_survivors(u3)  # made once: the same signed message
    rnd.coordinator.post_message(TASK, 0, "b", "survivors", [("", b"")], signed.signature, signed.certificate)
    with pytest.raises(FailedPrecondition, match="survivors stage of round 0 .* is closed"):
        rnd.coordinator.post_message(TASK, 0, "b", "survivors", [("", b"x")], signed.signature, b"")
    rnd.reveal(HOSPITALS, u3)
    rnd.tick()  # closes the reveal stage
    rnd.tick()  # aggregates
    assert rnd.clock.now() == datetime(2026, 1, 1, tzinfo=UTC)  # every step without time passing

    rounds = rnd.store.rounds(TASK)
    assert [(r.number, r.state) for r in rounds] == [(0, RoundState.CLOSED), (1, RoundState.OPEN)]
    assert rnd.coordinator.wait_for_round(TASK, 1, timeout=0).number == 1
    average, total = rnd.unmasked(ctx, 4)
    expected = sum(WEIGHTS[h] * updates[h] for h in HOSPITALS) / sum(WEIGHTS.values())
    assert total == sum(WEIGHTS.values())
    assert np.max(np.abs(average - expected)) <= rnd.key.params.average_error_bound
    # Under secure aggregation the signed uploads stay for every member to check the sum.
    digests, _, _, first = rnd.coordinator.upload(TASK, 0, "c", [0])
    assert len(digests) == 32 * rnd.store.chunk_count(TASK, 0) and first[0][1]


def test_a_stage_closes_at_grace_without_its_dropout_whose_late_upload_is_refused(rnd: Round) -> None:
    rng = np.random.default_rng(6)
    updates = {h: rng.uniform(-1, 1, N) for h in HOSPITALS}
    for h in HOSPITALS:
        rnd.publish(h)
    rnd.tick()
    ctx = rnd.ctx()
    rnd.share(HOSPITALS)
    rnd.tick()
    rnd.accept_shares(HOSPITALS)
    for h in ("a", "b", "c"):
        rnd.submit(h, updates[h])
    rnd.tick()
    rnd.clock.advance(GRACE - 0.01)
    rnd.tick()
    assert rnd.closed_stages() == ["shares"]  # d may still upload within the grace
    rnd.clock.advance(0.02)
    rnd.tick()
    closed, members, _ = rnd.stage("uploads")
    assert closed and members == frozenset({"a", "b", "c"})
    with pytest.raises(FailedPrecondition):  # d dropped out: its upload is now too late
        rnd.submit("d", updates["d"])
    survivors = ("a", "b", "c")
    u3 = rnd.sign_survivors(survivors)
    rnd.tick()
    rnd.reveal(survivors, u3)
    rnd.tick()
    rnd.tick()
    assert rnd.store.rounds(TASK)[0].state == RoundState.CLOSED
    average, total = rnd.unmasked(ctx, 3)
    expected = sum(WEIGHTS[h] * updates[h] for h in survivors) / sum(WEIGHTS[h] for h in survivors)
    assert total == sum(WEIGHTS[h] for h in survivors)
    assert np.max(np.abs(average - expected)) <= rnd.key.params.average_error_bound


def test_a_round_with_too_few_keys_fails_at_its_deadline_and_the_next_opens(rnd: Round) -> None:
    rnd.publish("a")
    rnd.publish("b")
    rnd.clock.advance(DEADLINE - 0.01)
    rnd.tick()
    assert rnd.store.current_round(TASK).state == RoundState.OPEN
    rnd.clock.advance(0.02)
    rnd.tick()
    failed, opened = rnd.store.rounds(TASK)
    assert failed.state == RoundState.FAILED and failed.cohort is None
    assert "fewer than 3 mask keys" in rnd.store.failure(TASK, 0)
    assert opened.number == 1 and opened.state == RoundState.OPEN
    assert opened.deadline_at == rnd.clock.now() + timedelta(seconds=DEADLINE)
    assert rnd.coordinator.wait_for_round(TASK, 1, timeout=0).number == 1


def test_a_round_whose_stage_keeps_too_few_members_fails_at_the_stage_deadline(rnd: Round) -> None:
    for h in HOSPITALS:
        rnd.publish(h)
    rnd.tick()
    rnd.share(("a", "b"))
    rnd.clock.advance(GRACE + 0.5)  # past the grace, but two of four is below the three needed
    rnd.tick()
    assert rnd.closed_stages() == []
    rnd.clock.advance(DEADLINE)
    rnd.tick()
    assert rnd.store.rounds(TASK)[0].state == RoundState.FAILED
    assert rnd.store.failure(TASK, 0) == (
        "deadline passed in the shares stage with 2 of 4 members, fewer than the 3 required"
    )
    assert rnd.stage("shares") == (False, frozenset(), [])
    assert rnd.store.current_round(TASK).number == 1


def test_a_federation_of_more_hospitals_than_a_sum_can_hold_is_refused_naming_the_field(rnd: Round) -> None:
    """The codec's sums decrypt exactly for at most max_parties contributions: a federation of
    more is refused when it starts, not after a whole round of work (found at 128 hospitals)."""
    from fibemrss.domain.errors import InvalidArgument

    limit = rnd.key.params.max_parties
    many = tuple(f"h{i:03d}" for i in range(limit + 1))
    with pytest.raises(InvalidArgument) as refused:
        rnd.coordinator.start_federation(
            FederationSettings("wide", 1, 3, GRACE, DEADLINE, many, pairwise_masking=True, min_contributors=3)
        )
    assert [v.field for v in refused.value.violations] == ["hospitals"]
    assert f"at most {limit}" in refused.value.violations[0].description
    rnd.coordinator.start_federation(  # exactly the limit is fine
        FederationSettings(
            "wide", 1, 3, GRACE, DEADLINE, many[:limit], pairwise_masking=True, min_contributors=3
        )
    )


def test_a_finished_federation_is_archived_and_its_study_starts_again_with_a_new_id(rnd: Round) -> None:
    """The in-memory store as PostgreSQL (tests/integration/test_aggregator_many_studies.py): the
    study of a finished federation (every round over, here failed for want of keys) runs again."""
    settings = FederationSettings(
        "again", 1, 3, GRACE, DEADLINE, HOSPITALS, pairwise_masking=True, min_contributors=3
    )
    rnd.coordinator.start_federation(settings)
    first = rnd.store.settings("again").federation_id
    for _ in range(2):  # rounds 0 and 1 fail at their deadline: the federation is finished
        rnd.clock.advance(DEADLINE + 0.01)
        rnd.tick()
    last = rnd.store.current_round("again")
    assert rnd.coordinator.is_done(rnd.store.settings("again"), last)
    rnd.coordinator.start_federation(settings)
    second = rnd.store.settings("again").federation_id
    assert second != first
    assert [(r.number, r.state) for r in rnd.store.rounds("again")] == [(0, RoundState.OPEN)]
    archived = f"again@{first.hex()}"
    assert rnd.store.settings(archived).federation_id == first
    assert [(r.number, r.state) for r in rnd.store.rounds(archived)] == [
        (0, RoundState.FAILED),
        (1, RoundState.FAILED),
    ]
    assert "fewer than 3 mask keys" in rnd.store.failure(archived, 1)
    # Running now: the same settings change nothing, others are refused.
    rnd.coordinator.start_federation(settings)
    assert rnd.store.settings("again").federation_id == second
    with pytest.raises(FailedPrecondition, match="other settings"):
        rnd.coordinator.start_federation(dataclasses.replace(settings, rounds=2))
