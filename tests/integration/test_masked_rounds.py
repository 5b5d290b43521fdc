"""Pairwise-masked rounds through the real aggregator (gRPC, PostgreSQL, TenSEAL): the cohort's
key stage, a sum exact to the codec's precision, individual uploads deleted with the commit of
their sum, and nothing decryptable from what the aggregator stored or received, with one
hospital's key or with two of four colluding; a hospital that drops out after the others
submitted restarts the round without it, and its own update stays hidden."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fibemrss.db.pool import Database
from fibemrss.federation.v1 import federation_pb2 as pb
from fibemrss.federation.v1 import federation_pb2_grpc
from fibemrss.he.chunk_format import ChunkKind, unpack_chunk
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor, slot_count
from fibemrss.he.keys import HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.masking import (
    MaskContext,
    MaskKeyPair,
    cohort_mask,
    expand_mask,
    pairwise_seed,
    round_key_seed,
)
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig
from fibemrss.platform.server import start_server
from services.aggregator.ciphertexts import CiphertextAdder
from services.aggregator.coordinator import Coordinator
from services.aggregator.servicer import AggregatorServicer
from services.aggregator.store import AggregatorStore

TASK = "masked-task"
HOSPITALS = ("a", "b", "c", "d")
N = 262_143  # two chunks with the weight slot: enough values for a correlation to mean something
WEIGHTS = {"a": 303, "b": 294, "c": 123, "d": 200}


class Harness:
    def __init__(self, url: str, keys: tuple[bytes, bytes]) -> None:
        self.key: HospitalKey = load_hospital_key(keys[0])
        self.db = Database(url)
        self.coordinator = Coordinator(
            AggregatorStore(self.db), CiphertextAdder(load_aggregator_key(keys[1])), tick_seconds=0.05
        )

        def register(server, registry):
            federation_pb2_grpc.add_AggregatorServiceServicer_to_server(
                AggregatorServicer(self.coordinator, AggregatorStore(self.db)), server
            )
            return [pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name]

        self.running = start_server(
            "aggregator-test", register, ServerConfig("127.0.0.1:0", "127.0.0.1:0", None, None)
        )
        self.coordinator.start()
        self.channel = open_channel(self.running.address)
        self.stub = federation_pb2_grpc.AggregatorServiceStub(self.channel)
        self.captured: list[tuple[str, int, int, list[bytes]]] = []  # what a recording proxy sees

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=0)
        self.coordinator.stop()
        self.db.close()

    def round(self) -> pb.RoundInfo:
        return self.stub.GetRound(pb.GetRoundRequest(task=TASK)).round

    def key_pair(self, hospital: str, info: pb.RoundInfo) -> MaskKeyPair:
        context = MaskContext(info.federation_id, TASK, info.round, info.attempt)
        return MaskKeyPair(round_key_seed(hospital.encode() * 32, context))

    def publish(self, hospital: str) -> None:
        info = self.round()
        self.stub.PublishMaskKey(
            pb.PublishMaskKeyRequest(
                task=TASK,
                round=info.round,
                hospital=hospital,
                public_key=self.key_pair(hospital, info).public_key,
            )
        )

    def cohort(self) -> pb.RoundInfo:
        return self.stub.GetRound(
            pb.GetRoundRequest(task=TASK, wait_for_cohort=True, wait_seconds=10), timeout=20
        ).round

    def masked_chunks(self, hospital: str, values: np.ndarray, info: pb.RoundInfo) -> list[bytes]:
        keys = {
            k.hospital: k.public_key
            for k in self.stub.GetMaskKeys(pb.GetMaskKeysRequest(task=TASK, round=info.round)).keys
        }
        assert set(keys) == set(info.cohort)
        context = MaskContext(info.federation_id, TASK, info.round, info.attempt)
        mask = cohort_mask(
            self.key_pair(hospital, info),
            hospital,
            keys,
            context,
            slot_count(ChunkKind.WEIGHTED_UPDATE, values.size),
            self.key.params.plain_modulus,
        )
        return UpdateEncryptor(self.key).encrypt(values, WEIGHTS[hospital], mask)

    def submit(
        self, hospital: str, chunks: list[bytes], info: pb.RoundInfo, cut_after: int | None = None
    ) -> None:
        sent: list[bytes] = []
        self.captured.append((hospital, info.round, info.attempt, sent))

        def requests() -> Iterator[pb.SubmitUpdateRequest]:
            for i, data in enumerate(chunks):
                if cut_after is not None and i >= cut_after:
                    # The hospital dies mid-stream: its last message is garbage and the stream ends.
                    yield pb.SubmitUpdateRequest(index=len(chunks) + 5, ciphertext=b"")
                    return
                sent.append(data)
                yield pb.SubmitUpdateRequest(
                    task=TASK,
                    round=info.round,
                    hospital=hospital,
                    total_chunks=len(chunks),
                    index=i,
                    ciphertext=data,
                    attempt=info.attempt,
                )

        self.stub.SubmitUpdate(requests(), timeout=60)

    def aggregate(self, number: int) -> list[bytes]:
        return [
            c.ciphertext for c in self.stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=number))
        ]


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keys()


@pytest.fixture
def harness(fresh_database, keys) -> Iterator[Harness]:
    h = Harness(fresh_database("aggregator"), keys)
    h.stub.StartFederation(
        pb.StartFederationRequest(
            task=TASK,
            rounds=3,
            quorum=3,
            grace_seconds=1.0,
            deadline_seconds=4.0,
            hospitals=list(HOSPITALS),
            pairwise_masking=True,
            min_contributors=3,
        )
    )
    yield h
    h.stop()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]))


def stored_ciphertexts(db: Database) -> int:
    with db.transaction() as cur:
        cur.execute("SELECT count(*) FROM submission_chunks")
        return int(cur.fetchone()[0])


def centered(values: np.ndarray, t: int) -> np.ndarray:
    v = values.astype(np.int64) % t
    return np.where(v > t // 2, v - t, v)


def test_a_masked_round_sums_exactly_keeps_no_upload_and_no_upload_decrypts(harness: Harness) -> None:
    rng = np.random.default_rng(3)
    updates = {h: rng.uniform(-1, 1, N) for h in HOSPITALS}
    with pytest.raises(grpc.RpcError) as early:  # no cohort yet: masks cannot be made
        harness.submit("a", UpdateEncryptor(harness.key).encrypt(updates["a"], 1), harness.round())
    assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for h in HOSPITALS:
        harness.publish(h)
    info = harness.cohort()
    assert info.cohort_fixed and list(info.cohort) == list(HOSPITALS) and info.attempt == 1
    with pytest.raises(grpc.RpcError) as late_key:  # the cohort is fixed: no other key now
        harness.stub.PublishMaskKey(
            pb.PublishMaskKeyRequest(task=TASK, round=0, hospital="a", public_key=b"k" * 32)
        )
    assert late_key.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    harness.publish("a")  # the same key again (a restarted agent) is fine

    for h in HOSPITALS:
        harness.submit(h, harness.masked_chunks(h, updates[h], info), info)
    info1 = harness.stub.GetRound(pb.GetRoundRequest(task=TASK, wait_for_round=1, wait_seconds=10)).round
    assert info1.round == 1
    # The individual uploads went with the transaction that committed their sum.
    assert stored_ciphertexts(harness.db) == 0

    decryptor = UpdateDecryptor(harness.key)
    average, total = decryptor.decrypt_average(harness.aggregate(0), N, min_parties=3)
    expected = sum(WEIGHTS[h] * updates[h] for h in HOSPITALS) / sum(WEIGHTS.values())
    assert total == sum(WEIGHTS.values())
    assert np.max(np.abs(average - expected)) <= harness.key.params.average_error_bound

    # Everything the aggregator received (the proxy's capture) with the shared key: noise.
    t = harness.key.params.plain_modulus
    for hospital, _, _, chunks in harness.captured[1:]:
        seen = decryptor.decrypt_slots(chunks, N)
        assert correlation(seen[1:], updates[hospital]) < 0.01
    # a and b collude against c: they strip their own pairwise masks with c; d's still hides it.
    pairs = {h: harness.key_pair(h, info) for h in HOSPITALS}
    context = MaskContext(info.federation_id, TASK, 0, 1)
    upload_c = next(chunks for h, _, _, chunks in harness.captured if h == "c")
    known = np.zeros(N + 1, dtype=np.int64)
    for colluder in ("a", "b"):
        known += expand_mask(
            pairwise_seed(pairs[colluder], colluder, "c", pairs["c"].public_key, context), N + 1, t
        )
    stripped = centered(decryptor.decrypt_slots(upload_c, N) + known, t)
    assert correlation(stripped[1:], updates["c"]) < 0.01
    # With d's seed as well, the same arithmetic gives c's update back: the attack is right.
    known += expand_mask(pairwise_seed(pairs["d"], "d", "c", pairs["c"].public_key, context), N + 1, t) * -1
    assert correlation(centered(decryptor.decrypt_slots(upload_c, N) + known, t)[1:], updates["c"]) > 0.999


def test_a_dropout_restarts_the_round_without_it_and_its_update_stays_hidden(harness: Harness) -> None:
    rng = np.random.default_rng(4)
    updates = {h: rng.uniform(-1, 1, N) for h in HOSPITALS}
    for h in HOSPITALS:
        harness.publish(h)
    info = harness.cohort()
    assert list(info.cohort) == list(HOSPITALS)
    for h in ("a", "b", "c"):
        harness.submit(h, harness.masked_chunks(h, updates[h], info), info)
    # d dies in the middle of its upload: the proxy saw its first chunk; nothing was accepted.
    with pytest.raises(grpc.RpcError):
        harness.submit("d", harness.masked_chunks("d", updates["d"], info), info, cut_after=1)

    # After the deadline the round restarts as attempt 2 with the three that submitted.
    retry = harness.stub.GetRound(
        pb.GetRoundRequest(task=TASK, wait_for_round=1, wait_seconds=10), timeout=20
    ).round
    assert retry.round == 0 and retry.attempt == 2 and list(retry.cohort) == ["a", "b", "c"]
    assert list(retry.submitted) == [] and stored_ciphertexts(harness.db) == 0
    with pytest.raises(grpc.RpcError) as stale:  # an upload masked for attempt 1 no longer fits
        harness.submit("a", harness.captured[0][3], info)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as dropped:
        harness.submit("d", UpdateEncryptor(harness.key).encrypt(updates["d"], 200), retry)
    assert dropped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for h in ("a", "b", "c"):
        harness.submit(h, harness.masked_chunks(h, updates[h], retry), retry)
    assert (
        harness.stub.GetRound(pb.GetRoundRequest(task=TASK, wait_for_round=1, wait_seconds=10)).round.round
        == 1
    )

    decryptor = UpdateDecryptor(harness.key)
    average, total = decryptor.decrypt_average(harness.aggregate(0), N, min_parties=3)
    survivors = ("a", "b", "c")
    expected = sum(WEIGHTS[h] * updates[h] for h in survivors) / sum(WEIGHTS[h] for h in survivors)
    assert total == sum(WEIGHTS[h] for h in survivors)
    assert np.max(np.abs(average - expected)) <= harness.key.params.average_error_bound

    # d's captured chunk, with the key and a and b colluding (their seeds with d, both attempts
    # of their own uploads): c's pairwise mask with d was never revealed, so d's values are noise.
    t = harness.key.params.plain_modulus
    d_chunk = next(chunks for h, _, _, chunks in harness.captured if h == "d" and chunks)[0]
    _, blobs = unpack_chunk(d_chunk)
    # The attacker decrypts the lone chunk it captured, ciphertext by ciphertext.
    slots = np.concatenate([decryptor._decrypt_one(b) for b in blobs])  # noqa: SLF001
    pairs = {h: harness.key_pair(h, info) for h in HOSPITALS}
    context = MaskContext(info.federation_id, TASK, 0, 1)
    known = np.zeros(slots.size, dtype=np.int64)
    for colluder in ("a", "b"):
        known += expand_mask(
            pairwise_seed(pairs[colluder], colluder, "d", pairs["d"].public_key, context), slots.size, t
        )
    stripped = centered(slots + known, t)
    assert correlation(stripped[1:], updates["d"][: slots.size - 1]) < 0.01


def test_a_cohort_below_the_minimum_never_forms_and_the_round_fails(harness: Harness) -> None:
    harness.publish("a")
    harness.publish("b")
    failed = harness.stub.GetRound(
        pb.GetRoundRequest(task=TASK, wait_for_round=1, wait_seconds=10), timeout=20
    ).round
    assert failed.round == 1
    history = harness.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=TASK)).status.history
    assert history[0].state == pb.ROUND_STATE_FAILED and "mask keys" in history[0].failure
    assert not history[0].cohort_fixed
    with pytest.raises(grpc.RpcError) as none:
        list(harness.stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=0)))
    assert none.value.code() == grpc.StatusCode.FAILED_PRECONDITION
