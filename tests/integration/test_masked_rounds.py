"""Secure aggregation through the real aggregator (gRPC, PostgreSQL, TenSEAL), its members
played by the protocol's own state machine (fibemrss.he.secagg): the key, share, upload,
survivor and reveal stages, a sum exact to the codec's precision once the revealed shares remove
the masks, every upload kept with its signature for the members to check, and nothing
decryptable from any one upload; a hospital that dies in the middle of its upload after sharing
is recovered from the survivors' shares without anyone uploading twice, and its late upload is
refused."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.pool import Database
from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import UpdateCodec, UpdateDecryptor, slot_count
from fibemrss.he.keys import HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.mask_signatures import SignedMaskKey
from fibemrss.he.secagg.protocol import (
    RoundContext,
    RoundTranscript,
    SecAggMember,
    Signatures,
    Signed,
    decode_reveal,
    unmask_correction,
)
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig
from fibemrss.platform.server import start_server
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.edges.grpc_servicer import AggregatorServicer

TASK = "masked-task"
HOSPITALS = ("a", "b", "c", "d")
N = 20_000
WEIGHTS = {"a": 303, "b": 294, "c": 123, "d": 200}
STAGE = {
    "shares": pb.ROUND_STAGE_SHARES,
    "uploads": pb.ROUND_STAGE_UPLOADS,
    "survivors": pb.ROUND_STAGE_SURVIVORS,
    "reveals": pb.ROUND_STAGE_REVEALS,
}
NO_TLS = Signatures(None, None)
UNSIGNED = Signed()


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
        self.members: dict[str, SecAggMember] = {}
        self.captured: list[tuple[str, list[bytes]]] = []  # what a recording proxy sees

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=0)
        self.coordinator.stop()
        self.db.close()

    def round(self) -> pb.RoundInfo:
        return self.stub.GetRound(pb.GetRoundRequest(task=TASK)).round

    def ctx(self, info: pb.RoundInfo) -> RoundContext:
        return RoundContext(info.federation_id, TASK, info.study_hash, info.round)

    def publish(self, hospital: str) -> None:
        info = self.round()
        member = self.members.setdefault(
            hospital,
            SecAggMember(
                hospital, self.ctx(info), NO_TLS, frozenset(HOSPITALS), 3, self.key.params.plain_modulus
            ),
        )
        self.stub.PublishMaskKey(
            pb.PublishMaskKeyRequest(
                task=TASK, round=info.round, hospital=hospital, public_key=member.signed_advert().public_key
            )
        )

    def cohort(self) -> pb.RoundInfo:
        return self.stub.GetRound(
            pb.GetRoundRequest(task=TASK, wait_for_cohort=True, wait_seconds=10), timeout=20
        ).round

    def adverts(self, number: int) -> dict[str, SignedMaskKey]:
        keys = self.stub.GetMaskKeys(pb.GetMaskKeysRequest(task=TASK, round=number)).keys
        return {k.hospital: SignedMaskKey(k.public_key, k.signature, k.certificate) for k in keys}

    def post(
        self, hospital: str, stage: str, envelopes=(), payload: bytes = b"", signed: Signed = UNSIGNED
    ) -> None:
        self.stub.PostRoundMessage(
            pb.PostRoundMessageRequest(
                task=TASK,
                round=self.round().round,
                hospital=hospital,
                stage=STAGE[stage],
                envelopes=[pb.Envelope(to=to, data=data) for to, data in envelopes],
                payload=payload,
                signature=signed.signature,
                certificate=signed.certificate,
            )
        )

    def stage(self, name: str, hospital: str = "", number: int = 0) -> pb.GetRoundStageResponse:
        return self.stub.GetRoundStage(
            pb.GetRoundStageRequest(
                task=TASK, round=number, stage=STAGE[name], hospital=hospital, wait_seconds=10
            ),
            timeout=20,
        )

    def share(self, hospitals=HOSPITALS) -> None:
        adverts = self.adverts(0)
        for h in hospitals:
            self.members[h].accept_cohort(adverts)
            self.post(h, "shares", sorted(self.members[h].share_boxes().items()))
        for h in hospitals:
            st = self.stage("shares", h)
            assert st.closed
            self.members[h].accept_shares(st.members, {m.sender: bytes(m.data) for m in st.messages})

    def masked_chunks(self, hospital: str, values: np.ndarray) -> list[bytes]:
        mask = self.members[hospital].mask(slot_count(ChunkKind.WEIGHTED_UPDATE, values.size))
        return UpdateCodec(self.key).encrypt(values, WEIGHTS[hospital], mask)

    def submit(self, hospital: str, chunks: list[bytes], cut_after: int | None = None) -> None:
        sent: list[bytes] = []
        self.captured.append((hospital, sent))
        signed = self.members[hospital].sign_upload(chunks)

        def requests() -> Iterator[pb.SubmitUpdateRequest]:
            for i, data in enumerate(chunks):
                if cut_after is not None and i >= cut_after:
                    # The hospital dies mid-stream: its last message is garbage and the stream ends.
                    yield pb.SubmitUpdateRequest(index=len(chunks) + 5, ciphertext=b"")
                    return
                sent.append(data)
                yield pb.SubmitUpdateRequest(
                    task=TASK,
                    round=0,
                    hospital=hospital,
                    total_chunks=len(chunks),
                    index=i,
                    ciphertext=data,
                    signature=signed.signature,
                    certificate=signed.certificate,
                )

        self.stub.SubmitUpdate(requests(), timeout=60)

    def finish(self, survivors_online) -> frozenset[str]:
        """Survivors sign U3 and reveal; returns U3."""
        u3 = frozenset(self.stage("uploads").members)
        for h in survivors_online:
            self.post(h, "survivors", signed=self.members[h].sign_survivors(u3))
        sigs = {m.sender: Signed(m.signature, m.certificate) for m in self.stage("survivors").messages}
        for h in survivors_online:
            payload, signed = self.members[h].reveal(u3, sigs)
            self.post(h, "reveals", payload=payload, signed=signed)
        return u3

    def transcript(self) -> RoundTranscript:
        reveals = self.stage("reveals")
        assert reveals.closed
        return RoundTranscript(
            self.adverts(0),
            frozenset(self.stage("shares").members),
            frozenset(self.stage("uploads").members),
            {m.sender: Signed(m.signature, m.certificate) for m in self.stage("survivors").messages},
            {m.sender: (bytes(m.data), Signed(m.signature, m.certificate)) for m in reveals.messages},
        )

    def aggregate(self, number: int) -> list[bytes]:
        return [
            c.ciphertext for c in self.stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=number))
        ]

    def unmasked(self, info: pb.RoundInfo) -> tuple[np.ndarray, int]:
        correction = unmask_correction(
            self.ctx(info),
            self.transcript(),
            NO_TLS,
            frozenset(HOSPITALS),
            3,
            slot_count(ChunkKind.WEIGHTED_UPDATE, N),
            self.key.params.plain_modulus,
        )
        return UpdateCodec(self.key).decrypt_average(self.aggregate(0), N, 3, correction)


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


def test_a_secure_round_sums_exactly_keeps_signed_uploads_and_no_upload_decrypts(harness: Harness) -> None:
    rng = np.random.default_rng(3)
    updates = {h: rng.uniform(-1, 1, N) for h in HOSPITALS}
    for h in HOSPITALS:
        harness.publish(h)
    info = harness.cohort()
    assert info.cohort_fixed and list(info.cohort) == list(HOSPITALS)
    with pytest.raises(grpc.RpcError) as late_key:  # the cohort is fixed: no other key now
        harness.stub.PublishMaskKey(
            pb.PublishMaskKeyRequest(task=TASK, round=0, hospital="a", public_key=b"k" * 96)
        )
    assert late_key.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as early:  # no upload before the share stage closed
        harness.submit(
            "a", UpdateCodec(harness.key).encrypt(updates["a"], 1)
        ) if False else harness.stub.SubmitUpdate(
            iter(
                [
                    pb.SubmitUpdateRequest(
                        task=TASK, round=0, hospital="a", total_chunks=1, index=0, ciphertext=b"x"
                    )
                ]
            ),
            timeout=20,
        )
    assert early.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    harness.share()
    for h in HOSPITALS:
        harness.submit(h, harness.masked_chunks(h, updates[h]))
    assert harness.finish(HOSPITALS) == frozenset(HOSPITALS)
    info1 = harness.stub.GetRound(pb.GetRoundRequest(task=TASK, wait_for_round=1, wait_seconds=10)).round
    assert info1.round == 1

    average, total = harness.unmasked(info)
    expected = sum(WEIGHTS[h] * updates[h] for h in HOSPITALS) / sum(WEIGHTS.values())
    assert total == sum(WEIGHTS.values())
    assert np.max(np.abs(average - expected)) <= harness.key.params.average_error_bound
    # Every upload is kept with its signed digests, for any member to check the sum against.
    assert stored_ciphertexts(harness.db) == 4 * len(harness.captured[0][1])
    first = list(
        harness.stub.FetchUpload(pb.FetchUploadRequest(task=TASK, round=0, hospital="c", indexes=[0]))
    )
    assert len(first[0].digests) == 32 * len(harness.captured[0][1]) and first[1].ciphertext
    # Everything the aggregator received, with the shared key: noise.
    decryptor = UpdateDecryptor(harness.key)
    for hospital, chunks in harness.captured:
        seen = decryptor.decrypt_slots(chunks, N)
        assert correlation(seen[1:], updates[hospital]) < 0.02


def test_a_dropout_mid_upload_is_recovered_from_shares_and_never_uploads_again(harness: Harness) -> None:
    rng = np.random.default_rng(4)
    updates = {h: rng.uniform(-1, 1, N) for h in HOSPITALS}
    for h in HOSPITALS:
        harness.publish(h)
    info = harness.cohort()
    harness.share()
    for h in ("a", "b", "c"):
        harness.submit(h, harness.masked_chunks(h, updates[h]))
    # d dies in the middle of its upload: the proxy saw its first chunk; nothing was accepted.
    d_chunks = harness.masked_chunks("d", updates["d"])
    with pytest.raises(grpc.RpcError):
        harness.submit("d", d_chunks, cut_after=0)
    # The grace passes: the upload stage closes with a, b, c. d's complete upload is now refused.
    uploads = harness.stage("uploads")
    assert uploads.closed and list(uploads.members) == ["a", "b", "c"]
    with pytest.raises(grpc.RpcError) as late:
        harness.submit("d", d_chunks)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert harness.finish(("a", "b", "c")) == frozenset({"a", "b", "c"})
    assert (
        harness.stub.GetRound(pb.GetRoundRequest(task=TASK, wait_for_round=1, wait_seconds=10)).round.round
        == 1
    )

    average, total = harness.unmasked(info)
    survivors = ("a", "b", "c")
    expected = sum(WEIGHTS[h] * updates[h] for h in survivors) / sum(WEIGHTS[h] for h in survivors)
    assert total == sum(WEIGHTS[h] for h in survivors)
    assert np.max(np.abs(average - expected)) <= harness.key.params.average_error_bound
    # One upload each, never a second; of d nothing was stored, and no share of d's self-mask seed
    # was revealed (only its mask key's, to remove its pairwise masks from the others' uploads).
    with harness.db.transaction() as cur:
        cur.execute("SELECT hospital, count(*) FROM submissions GROUP BY hospital ORDER BY hospital")
        assert cur.fetchall() == [("a", 1), ("b", 1), ("c", 1)]
    revealed = [
        (o, k)
        for m in harness.stage("reveals").messages
        for o, k, _ in decode_reveal(bytes(m.data), m.sender)
    ]
    assert ("d", b"s") in revealed and ("d", b"b") not in revealed


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
