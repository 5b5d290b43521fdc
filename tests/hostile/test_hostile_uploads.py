"""A hostile or broken hospital's uploads: stalled, undecodable, of another layout. Each is refused
to its sender alone (or cancelled at its limit), and the round closes with the others.

A real aggregator process, mutual TLS over loopback, each agent with its own certificate.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.domain.feature_encoding import stats_vector_length
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.chunk_format import unpack_header
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import HospitalKey, load_hospital_key
from fibemrss.platform.status_mapping import field_violations
from tests.hostile.conftest import Federation, RunningAggregator, StartAggregator

_HEADER_BYTES = struct.calcsize("<4sBBBBH8sQIIH")  # the chunk header of fibemrss/he/chunk_format.py


@pytest.fixture(scope="module")
def aggregator(start_aggregator: StartAggregator) -> RunningAggregator:
    return start_aggregator(FIBEMRSS_UPLOAD_IDLE_SECONDS="1")


@pytest.fixture(scope="module")
def key(federation: Federation) -> HospitalKey:
    return load_hospital_key((federation.keys / "hospital.he").read_bytes())


class Client:
    def __init__(self, federation: Federation, aggregator: RunningAggregator, identity: str) -> None:
        self.channel = federation.channel(aggregator.address, identity)
        self.stub = federation_pb2_grpc.AggregatorServiceStub(self.channel)
        self.hospital = identity.split("@")[1]


@pytest.fixture(scope="module")
def clients(federation: Federation, aggregator: RunningAggregator) -> Iterator[dict[str, Client]]:
    out = {
        i: Client(federation, aggregator, i) for i in ("operator@central", "agent@a", "agent@b", "agent@c")
    }
    yield out
    for c in out.values():
        c.channel.close()


def start(clients: dict[str, Client], task: str, quorum: int = 2) -> None:
    clients["operator@central"].stub.StartFederation(
        pb.StartFederationRequest(
            min_contributors=1,  # these runs test uploads and capacity, not collusion
            task=task,
            rounds=1,
            quorum=quorum,
            grace_seconds=0,
            deadline_seconds=60,
            hospitals=["a", "b", "c"],
        ),
        timeout=10,
    )


def requests(
    task: str, hospital: str, chunks: list[bytes], total: int | None = None
) -> Iterator[pb.SubmitUpdateRequest]:
    for i, data in enumerate(chunks):
        yield pb.SubmitUpdateRequest(
            task=task, round=0, hospital=hospital, total_chunks=total or len(chunks), index=i, ciphertext=data
        )


def submit(
    client: Client, task: str, chunks: list[bytes], total: int | None = None
) -> pb.SubmitUpdateResponse:
    return client.stub.SubmitUpdate(requests(task, client.hospital, chunks, total), timeout=30)


def closed_sum(client: Client, key: HospitalKey, task: str, n: int) -> tuple[np.ndarray, int, int]:
    """(average, total weight, contributors) of round 0 once it closed."""
    info = client.stub.GetRound(pb.GetRoundRequest(task=task, wait_for_round=1, wait_seconds=20), timeout=30)
    assert info.round.round == 1, "round 0 did not close"
    parts = list(client.stub.FetchAggregate(pb.FetchAggregateRequest(task=task, round=0), timeout=30))
    average, weight = UpdateDecryptor(key).decrypt_average([p.ciphertext for p in parts], n)
    return average, weight, parts[0].contributors


def honest(clients: dict[str, Client], key: HospitalKey, task: str, n: int) -> None:
    for h, value in (("agent@b", 1.0), ("agent@c", 3.0)):
        assert not submit(clients[h], task, UpdateEncryptor(key).encrypt(np.full(n, value), 10)).duplicate


def test_a_stalled_upload_is_cancelled_holds_no_lock_and_the_round_closes_with_the_others(
    clients: dict[str, Client], key: HospitalKey
) -> None:
    start(clients, "stall")
    never = threading.Event()
    chunks = UpdateEncryptor(key).encrypt(np.full(key.params.slots_per_chunk, 9.0), 10)
    assert len(chunks) == 2

    def stalled() -> Iterator[pb.SubmitUpdateRequest]:
        yield from requests("stall", "a", chunks[:1], total=2)  # the first of two chunks
        never.wait(60)  # the sender stops sending and never closes its stream

    stuck = clients["agent@a"].stub.SubmitUpdate.future(stalled(), timeout=60)
    try:
        honest(clients, key, "stall", 4)
        average, weight, contributors = closed_sum(clients["agent@b"], key, "stall", 4)
        assert (contributors, weight) == (2, 20)
        np.testing.assert_allclose(average, np.full(4, 2.0), atol=1e-4)
        with pytest.raises(grpc.RpcError) as info:
            stuck.result(timeout=20)
        assert info.value.code() == grpc.StatusCode.CANCELLED  # at the 1 s idle limit
    finally:
        never.set()
        stuck.cancel()


def _corrupt_ciphertext(chunk: bytes) -> bytes:
    """The same header and lengths, the first ciphertext's bytes replaced by noise."""
    assert unpack_header(chunk).n_ciphertexts >= 1
    (length,) = struct.unpack_from("<I", chunk, _HEADER_BYTES)
    start = _HEADER_BYTES + 4
    return chunk[:start] + os.urandom(length) + chunk[start + length :]


def test_an_undecodable_chunk_is_refused_to_its_sender_and_the_round_closes_with_the_others(
    clients: dict[str, Client], key: HospitalKey
) -> None:
    start(clients, "undecodable")
    bad = [_corrupt_ciphertext(c) for c in UpdateEncryptor(key).encrypt(np.full(4, 9.0), 10)]
    with pytest.raises(grpc.RpcError) as info:
        submit(clients["agent@a"], "undecodable", bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(info.value)] == ["chunks[0].ciphertext"]
    honest(clients, key, "undecodable", 4)
    _, weight, contributors = closed_sum(clients["agent@b"], key, "undecodable", 4)
    assert (contributors, weight) == (2, 20)


def test_an_upload_of_another_layout_than_the_tasks_is_refused(
    clients: dict[str, Client], key: HospitalKey
) -> None:
    task = HEART_DISEASE_V1.name  # a task the aggregator knows: round 0 carries its statistics
    n = stats_vector_length(HEART_DISEASE_V1)
    start(clients, task)
    encrypt = UpdateEncryptor(key).encrypt
    with pytest.raises(grpc.RpcError) as count:
        submit(clients["agent@a"], task, encrypt(np.ones(n), 10), total=2)
    assert count.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(count.value)] == ["total_chunks"]
    with pytest.raises(grpc.RpcError) as size:
        submit(clients["agent@a"], task, encrypt(np.ones(n + 3), 10))
    assert size.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(size.value)] == ["chunks[0].ciphertext"]
    honest(clients, key, task, n)
    _, weight, contributors = closed_sum(clients["agent@b"], key, task, n)
    assert (contributors, weight) == (2, 20)


def test_two_hospitals_announcing_different_chunk_counts_cannot_leave_the_round_aggregating(
    clients: dict[str, Client], key: HospitalKey
) -> None:
    start(clients, "mismatch")  # a task without a spec at the aggregator: uploads must agree
    honest(clients, key, "mismatch", 4)  # closes the round at quorum 2; then a third, bigger one
    start(clients, "mismatch-3", quorum=3)
    submit(clients["agent@b"], "mismatch-3", UpdateEncryptor(key).encrypt(np.ones(4), 10))
    two_chunks = UpdateEncryptor(key).encrypt(np.ones(key.params.slots_per_chunk), 10)
    assert len(two_chunks) == 2
    with pytest.raises(grpc.RpcError) as info:
        submit(clients["agent@a"], "mismatch-3", two_chunks)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(info.value)] == ["total_chunks"]
    status = (
        clients["agent@b"]
        .stub.GetFederationStatus(pb.GetFederationStatusRequest(task="mismatch-3"), timeout=10)
        .status
    )
    assert list(status.current.submitted) == ["b"]
