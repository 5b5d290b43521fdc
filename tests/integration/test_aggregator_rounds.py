"""The aggregator over real gRPC, real PostgreSQL and real HE: quorum, deadlines, idempotency, restarts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import psycopg2
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.pool import Database
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.params import DEFAULT_PARAMS
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig
from fibemrss.platform.server import RunningServer, start_server
from fibemrss.platform.status_mapping import field_violations
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.edges.grpc_servicer import AggregatorServicer

TASK = "test-task"
HOSPITALS = ["a", "b", "c"]


class CountingStore(AggregatorStore):
    """The real store, counting the chunk positions summed from the stored uploads (the path a
    round takes when the aggregator's running sum does not cover it)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.summed_from_database = 0

    def chunks_at(self, task: str, number: int, index: int) -> list[bytes]:
        self.summed_from_database += 1
        return super().chunks_at(task, number, index)


@dataclass
class Aggregator:
    url: str
    key: HospitalKey
    running: RunningServer
    coordinator: Coordinator
    db: Database
    stub: federation_pb2_grpc.AggregatorServiceStub
    channel: grpc.Channel
    store: CountingStore

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=0)
        self.coordinator.stop()
        self.db.close()


def start_aggregator(
    url: str, key: HospitalKey, agg_key_bytes: bytes, address: str = "127.0.0.1:0"
) -> Aggregator:
    db = Database(url)
    store = CountingStore(db)
    coordinator = Coordinator(store, CiphertextAdder(load_aggregator_key(agg_key_bytes)), tick_seconds=0.05)

    def register(server, registry):
        federation_pb2_grpc.add_AggregatorServiceServicer_to_server(
            AggregatorServicer(coordinator, store), server
        )
        return [pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name]

    running = start_server("aggregator-test", register, ServerConfig(address, "127.0.0.1:0", None, None))
    coordinator.start()
    channel = open_channel(running.address)
    return Aggregator(
        url, key, running, coordinator, db, federation_pb2_grpc.AggregatorServiceStub(channel), channel, store
    )


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keys()


@pytest.fixture
def aggregator(fresh_database, keys) -> Iterator[Aggregator]:
    agg = start_aggregator(fresh_database("aggregator"), load_hospital_key(keys[0]), keys[1])
    yield agg
    agg.stop()


def start(
    agg: Aggregator, quorum: int = 3, rounds: int = 3, grace: float = 0.0, deadline: float = 30.0
) -> None:
    agg.stub.StartFederation(
        pb.StartFederationRequest(
            task=TASK,
            rounds=rounds,
            quorum=quorum,
            grace_seconds=grace,
            deadline_seconds=deadline,
            hospitals=HOSPITALS,
            # These rounds are unmasked and some close with two uploads on purpose.
            min_contributors=min(quorum, 3),
        )
    )


def submit(
    agg: Aggregator, hospital: str, round_number: int, values: np.ndarray, weight: int
) -> pb.SubmitUpdateResponse:
    return submit_chunks(agg, hospital, round_number, UpdateEncryptor(agg.key).encrypt(values, weight))


def submit_chunks(
    agg: Aggregator, hospital: str, round_number: int, chunks: list[bytes]
) -> pb.SubmitUpdateResponse:

    def requests() -> Iterator[pb.SubmitUpdateRequest]:
        for i, data in enumerate(chunks):
            yield pb.SubmitUpdateRequest(
                task=TASK,
                round=round_number,
                hospital=hospital,
                total_chunks=len(chunks),
                index=i,
                ciphertext=data,
            )

    return agg.stub.SubmitUpdate(requests(), timeout=30)


def wait_round(agg: Aggregator, number: int) -> pb.RoundInfo:
    return agg.stub.GetRound(
        pb.GetRoundRequest(task=TASK, wait_for_round=number, wait_seconds=10), timeout=20
    ).round


def decrypt(agg: Aggregator, round_number: int, n: int) -> tuple[np.ndarray, int]:
    chunks = [
        c.ciphertext for c in agg.stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=round_number))
    ]
    return UpdateDecryptor(agg.key).decrypt_average(chunks, n)


def test_quorum_closes_the_round_and_the_sum_is_the_weighted_average(aggregator: Aggregator) -> None:
    start(aggregator)
    rng = np.random.default_rng(1)
    vectors = {h: rng.normal(size=10) for h in HOSPITALS}
    weights = {"a": 10, "b": 30, "c": 60}
    for h in HOSPITALS:
        submit(aggregator, h, 0, vectors[h], weights[h])
    info = wait_round(aggregator, 1)
    assert info.round == 1 and info.base_round == 0
    average, total = decrypt(aggregator, 0, 10)
    expected = sum(vectors[h] * weights[h] for h in HOSPITALS) / 100
    assert total == 100
    np.testing.assert_allclose(average, expected, atol=aggregator.key.params.average_error(3, 100))


def test_repeated_submission_is_idempotent_and_late_one_is_refused(aggregator: Aggregator) -> None:
    start(aggregator, quorum=2)
    assert not submit(aggregator, "a", 0, np.ones(4), 5).duplicate
    assert submit(aggregator, "a", 0, np.ones(4), 5).duplicate
    status = aggregator.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=TASK)).status
    assert list(status.current.submitted) == ["a"]
    submit(aggregator, "b", 0, np.ones(4), 5)
    wait_round(aggregator, 1)
    with pytest.raises(grpc.RpcError) as late:
        submit(aggregator, "c", 0, np.ones(4), 5)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The late hospital rejoins at the next round.
    assert not submit(aggregator, "c", 1, np.ones(4), 5).duplicate


def test_unknown_hospital_task_and_open_round_fetch_get_the_right_codes(aggregator: Aggregator) -> None:
    start(aggregator)
    with pytest.raises(grpc.RpcError) as stranger:
        submit(aggregator, "mallory", 0, np.ones(4), 5)
    assert stranger.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as unknown:
        aggregator.stub.GetRound(pb.GetRoundRequest(task="no-such-task"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as open_round:
        list(aggregator.stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=0)))
    assert open_round.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_malformed_chunk_is_invalid_argument_and_nothing_is_stored(aggregator: Aggregator) -> None:
    start(aggregator)
    request = pb.SubmitUpdateRequest(
        task=TASK, round=0, hospital="a", total_chunks=1, index=0, ciphertext=b"junk"
    )
    with pytest.raises(grpc.RpcError) as bad:
        aggregator.stub.SubmitUpdate(iter([request]))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(bad.value)[0][0] == "chunks[0].ciphertext"
    status = aggregator.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=TASK)).status
    assert list(status.current.submitted) == []
    with pytest.raises(grpc.RpcError) as settings:
        aggregator.stub.StartFederation(
            pb.StartFederationRequest(task="other", rounds=0, quorum=9, hospitals=["x"])
        )
    assert settings.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The default minimum of 3 contributors cannot be met by one hospital either.
    assert {f for f, _ in field_violations(settings.value)} == {"rounds", "quorum", "min_contributors"}


def test_deadline_without_quorum_fails_the_round_and_the_next_builds_on_the_last_closed(
    aggregator: Aggregator,
) -> None:
    start(aggregator, quorum=2, deadline=1.0)
    submit(aggregator, "a", 0, np.ones(3), 1)
    submit(aggregator, "b", 0, np.ones(3), 1)
    assert wait_round(aggregator, 1).round == 1  # quorum reached with no grace period: closed at once
    submit(aggregator, "a", 1, np.ones(3), 1)  # only one of the two required
    info = wait_round(aggregator, 2)
    history = aggregator.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=TASK)).status.history
    assert history[1].state == pb.ROUND_STATE_FAILED and "deadline" in history[1].failure
    assert info.round == 2 and info.base_round == 0


def test_grace_period_closes_at_quorum_without_waiting_for_everyone(aggregator: Aggregator) -> None:
    start(aggregator, quorum=2, grace=0.3)
    submit(aggregator, "a", 0, np.ones(3), 1)
    submit(aggregator, "b", 0, np.ones(3), 1)
    began = time.monotonic()
    assert wait_round(aggregator, 1).round == 1
    assert time.monotonic() - began < 5
    _, total = decrypt(aggregator, 0, 3)
    assert total == 2


def test_a_restarted_aggregator_finishes_a_round_caught_mid_aggregation(aggregator: Aggregator, keys) -> None:
    start(aggregator)
    for h in ("a", "b"):
        submit(aggregator, h, 0, np.full(3, 2.0), 4)
    # Simulate a crash: the process dies with the round marked AGGREGATING and no sum written.
    aggregator.coordinator.stop()
    aggregator.running.stop(grace=0)
    assert AggregatorStore(aggregator.db).mark_aggregating(TASK, 0)
    restarted = start_aggregator(aggregator.url, aggregator.key, keys[1], address=aggregator.running.address)
    try:
        assert wait_round(restarted, 1).round == 1
        average, total = decrypt(restarted, 0, 3)
        assert total == 8  # both accepted submissions are in the sum: nothing was lost
        assert restarted.store.summed_from_database == 1  # summed once from the stored uploads
        np.testing.assert_allclose(average, [2.0, 2.0, 2.0], atol=1e-4)
    finally:
        restarted.stop()


def test_a_refused_upload_leaves_the_running_sum_bit_for_bit(
    aggregator: Aggregator, keys: tuple[bytes, bytes]
) -> None:
    """Chunks go into the round's running sum as they stream in: an upload refused after some
    of them (a corrupt chunk in the middle of its stream, or a transaction that does not commit)
    is subtracted again, and the round's sum, taken from memory, is exactly the accepted ones'."""
    start(aggregator, quorum=3)
    n = 2 * DEFAULT_PARAMS.slots_per_chunk * DEFAULT_PARAMS.values_per_slot + 50  # three chunks
    rng = np.random.default_rng(5)
    encrypt = UpdateEncryptor(aggregator.key).encrypt
    vectors = {h: rng.normal(0.0, 1.0, n) for h in HOSPITALS}
    weights = {"a": 3, "b": 20, "c": 7}
    uploads = {h: encrypt(vectors[h], weights[h]) for h in HOSPITALS}
    assert len(uploads["a"]) == 3
    submit_chunks(aggregator, "a", 0, uploads["a"])
    middle = uploads["c"][1]
    corrupt = [uploads["c"][0], middle[:40] + b"\xff\xff" + middle[42:], uploads["c"][2]]
    with pytest.raises(grpc.RpcError) as refused:
        submit_chunks(aggregator, "c", 0, corrupt)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(refused.value)] == ["chunks[1].ciphertext"]
    # b's upload streams whole, and then its transaction fails in PostgreSQL.
    with aggregator.db.transaction() as cur:
        cur.execute("ALTER TABLE submissions ADD CONSTRAINT test_refuse_b CHECK (hospital <> 'b')")
    with pytest.raises(psycopg2.errors.CheckViolation):
        aggregator.coordinator.submit(TASK, 0, "b", 3, enumerate(uploads["b"]))
    with aggregator.db.transaction() as cur:
        cur.execute("ALTER TABLE submissions DROP CONSTRAINT test_refuse_b")
    submit_chunks(aggregator, "c", 0, uploads["c"])
    submit_chunks(aggregator, "b", 0, uploads["b"])
    wait_round(aggregator, 1)
    served = [
        c.ciphertext for c in aggregator.stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=0))
    ]
    adder = CiphertextAdder(load_aggregator_key(keys[1]))
    assert served == [adder.add(parts) for parts in zip(*uploads.values(), strict=True)]
    assert aggregator.store.summed_from_database == 0  # the sum came from memory, not the uploads
    average, total = UpdateDecryptor(aggregator.key).decrypt_average(served, n)
    assert total == 30
    expected = sum(vectors[h] * weights[h] for h in HOSPITALS) / 30
    np.testing.assert_allclose(average, expected, atol=aggregator.key.params.average_error(3, 30))
