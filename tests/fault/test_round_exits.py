"""No state from which a round cannot leave: for each state, what moves the round on.

The real coordinator and store over a real PostgreSQL and real HE; the ticker is driven by hand
so each state is reached exactly. Rows a current aggregator would refuse (uploads of different
chunk counts, an undecodable chunk) are written straight through the store, as an older version
or a corrupted database could have left them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from fibemrss.db.pool import Database
from fibemrss.he.codec import UpdateEncryptor
from fibemrss.he.keys import HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.core.round_state import FederationSettings, RoundState

TASK = "exits"


@pytest.fixture(scope="module")
def keys() -> tuple[HospitalKey, CiphertextAdder]:
    hospital, aggregator = generate_keys()
    return load_hospital_key(hospital), CiphertextAdder(load_aggregator_key(aggregator))


@pytest.fixture
def store(fresh_database) -> Iterator[AggregatorStore]:  # type: ignore[no-untyped-def]
    db = Database(fresh_database("aggregator"))
    yield AggregatorStore(db)
    db.close()


class ShiftedClock:
    """The wall clock moved on by what the test advanced: a deadline PostgreSQL stamped in real
    time passes for the coordinator without the test sleeping."""

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += timedelta(seconds=seconds)


def federation(
    store: AggregatorStore,
    adder: CiphertextAdder,
    quorum: int,
    deadline: float,
    clock: ShiftedClock | None = None,
) -> Coordinator:
    coordinator = Coordinator(store, adder, clock=clock)
    coordinator.start_federation(FederationSettings(TASK, 1, quorum, 0.0, deadline, ("a", "b", "c")))
    return coordinator


def raw_upload(store: AggregatorStore, hospital: str, chunks: list[bytes]) -> None:
    """Stores an upload as rows, without any of the aggregator's checks."""
    with store._db.transaction() as cur:
        cur.execute(
            "INSERT INTO submissions (task, round, hospital, total_chunks) VALUES (%s, 0, %s, %s)",
            (TASK, hospital, len(chunks)),
        )
        for i, c in enumerate(chunks):
            cur.execute(
                "INSERT INTO submission_chunks (task, round, hospital, idx, ciphertext) VALUES (%s, 0, %s, %s, %s)",
                (TASK, hospital, i, c),
            )


def state_of(store: AggregatorStore, number: int) -> RoundState:
    return {r.number: r.state for r in store.rounds(TASK)}[number]


def test_open_with_no_upload_fails_at_the_deadline_and_the_next_round_opens(store, keys) -> None:
    clock = ShiftedClock()
    coordinator = federation(store, keys[1], quorum=1, deadline=30, clock=clock)
    coordinator.tick()
    assert state_of(store, 0) == RoundState.OPEN
    clock.advance(31)
    coordinator.tick()
    assert state_of(store, 0) == RoundState.FAILED
    assert "deadline passed with 0 of 1" in store.failure(TASK, 0)
    assert state_of(store, 1) == RoundState.OPEN


def test_collecting_below_quorum_fails_at_the_deadline(store, keys) -> None:
    key, adder = keys
    clock = ShiftedClock()
    coordinator = federation(store, adder, quorum=2, deadline=30, clock=clock)
    coordinator.submit(TASK, 0, "a", 1, enumerate(UpdateEncryptor(key).encrypt(np.ones(3), 1)))
    assert state_of(store, 0) == RoundState.COLLECTING
    coordinator.tick()
    assert state_of(store, 0) == RoundState.COLLECTING  # before the deadline it waits
    clock.advance(31)
    coordinator.tick()
    assert state_of(store, 0) == RoundState.FAILED


def test_collecting_at_quorum_closes(store, keys) -> None:
    key, adder = keys
    coordinator = federation(store, adder, quorum=2, deadline=30)
    for h in ("a", "b"):
        coordinator.submit(TASK, 0, h, 1, enumerate(UpdateEncryptor(key).encrypt(np.ones(3), 1)))
    coordinator.tick()
    assert state_of(store, 0) == RoundState.CLOSED


def test_aggregating_left_by_a_crash_is_aggregated_again(store, keys) -> None:
    key, adder = keys
    coordinator = federation(store, adder, quorum=3, deadline=30)
    for h in ("a", "b"):
        raw_upload(store, h, UpdateEncryptor(key).encrypt(np.ones(3), 1))
    assert store.mark_aggregating(TASK, 0)
    coordinator.tick()
    assert state_of(store, 0) == RoundState.CLOSED


def test_aggregating_with_uploads_of_different_chunk_counts_fails_with_the_reason(store, keys) -> None:
    key, adder = keys
    coordinator = federation(store, adder, quorum=3, deadline=30)
    raw_upload(store, "a", UpdateEncryptor(key).encrypt(np.ones(3), 1))
    raw_upload(
        store,
        "b",
        UpdateEncryptor(key).encrypt(np.ones(key.params.slots_per_chunk * key.params.values_per_slot), 1),
    )
    assert store.mark_aggregating(TASK, 0)
    coordinator.tick()
    assert state_of(store, 0) == RoundState.FAILED
    assert "different chunk counts" in store.failure(TASK, 0)
    assert state_of(store, 1) == RoundState.OPEN


def test_aggregating_with_an_undecodable_stored_chunk_fails_with_the_reason(store, keys) -> None:
    key, adder = keys
    coordinator = federation(store, adder, quorum=3, deadline=30)
    good = UpdateEncryptor(key).encrypt(np.ones(3), 1)
    raw_upload(store, "a", good)
    start = struct.calcsize("<4sBBBBH8sQIIH") + 4  # past the chunk header and the first length
    raw_upload(store, "b", [good[0][:start] + bytes(16) + good[0][start + 16 :]])  # SEAL's header zeroed
    assert store.mark_aggregating(TASK, 0)
    coordinator.tick()
    assert state_of(store, 0) == RoundState.FAILED
    assert store.failure(TASK, 0).startswith("aggregation failed")
    assert state_of(store, 1) == RoundState.OPEN


def test_closed_and_failed_are_final_and_the_federation_is_done_after_the_last(store, keys) -> None:
    key, adder = keys
    clock = ShiftedClock()
    coordinator = federation(store, adder, quorum=1, deadline=30, clock=clock)
    coordinator.submit(TASK, 0, "a", 1, enumerate(UpdateEncryptor(key).encrypt(np.ones(3), 1)))
    coordinator.tick()
    clock.advance(31)
    coordinator.tick()  # round 1 (the last) fails at its deadline
    rounds = store.rounds(TASK)
    assert [r.state for r in rounds] == [RoundState.CLOSED, RoundState.FAILED]
    assert coordinator.is_done(store.settings(TASK), rounds[-1])
    coordinator.tick()
    assert [r.state for r in store.rounds(TASK)] == [RoundState.CLOSED, RoundState.FAILED]
