"""The agent's ports over gRPC: the aggregator and the hospital's gateway.

Each call has a deadline; gRPC errors become the domain errors the protocol understands:
UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED and CANCELLED (a peer restarting,
busy, or ending a call at its limit) are `Unavailable`, NOT_FOUND is `NotFound` (no federation of
the task yet), anything else `PeerRefused`. The protocol retries them all, with backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import grpc

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.domain.errors import DomainError, NotFound, Unavailable
from fibemrss.domain.feature_extraction import TrainingExample
from fibemrss.he.mask_signatures import SignedMaskKey
from fibemrss.he.secagg.protocol import Signed
from fibemrss.serde.values import training_example_from_proto
from services.hospital_agent.core.ports import PeerRefused, Phase, RoundView, StageView

RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
)
_PHASES = {
    fpb.ROUND_STATE_OPEN: Phase.OPEN,
    fpb.ROUND_STATE_COLLECTING: Phase.COLLECTING,
    fpb.ROUND_STATE_AGGREGATING: Phase.AGGREGATING,
    fpb.ROUND_STATE_CLOSED: Phase.CLOSED,
    fpb.ROUND_STATE_FAILED: Phase.FAILED,
}
T = TypeVar("T")
_STAGES = {
    "shares": fpb.ROUND_STAGE_SHARES,
    "uploads": fpb.ROUND_STAGE_UPLOADS,
    "survivors": fpb.ROUND_STAGE_SURVIVORS,
    "reveals": fpb.ROUND_STAGE_REVEALS,
}


def domain_error(exc: grpc.RpcError) -> DomainError:
    code: grpc.StatusCode = exc.code()  # grpc.Call's, not RpcError's
    message = f"{code.name}: {exc.details()}"
    if code in RETRYABLE:
        return Unavailable(message)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    return PeerRefused(message)


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as exc:
        raise domain_error(exc) from None


def round_view_from_proto(info: fpb.RoundInfo) -> RoundView:
    phase = _PHASES.get(info.state)
    if phase is None:
        raise PeerRefused(f"the aggregator reported an unknown round state {info.state}")
    return RoundView(
        round=int(info.round),
        phase=phase,
        base_round=int(info.base_round),
        submitted=frozenset(info.submitted),
        federation_done=info.federation_done,
        pairwise_masking=info.pairwise_masking,
        attempt=max(int(info.attempt), 1),
        cohort=frozenset(info.cohort) if info.cohort_fixed else None,
        federation_id=bytes(info.federation_id),
        study_hash=info.study_hash,
    )


class GrpcAggregator:
    def __init__(
        self,
        channel: grpc.Channel,
        task: str,
        hospital: str,
        wait_seconds: float = 20.0,
        study_hash: str = "",
    ) -> None:
        """`study_hash`: the document the hospital trains, sent with every upload and key so the
        aggregator refuses them for a federation of another document."""
        self._stub = federation_pb2_grpc.AggregatorServiceStub(channel)
        self._task = task
        self._hospital = hospital
        self._study_hash = study_hash
        self._wait_seconds = wait_seconds

    def current_round(self, wait_for: int | None) -> RoundView:
        request = fpb.GetRoundRequest(task=self._task)
        if wait_for is not None:
            request.wait_for_round = wait_for
            request.wait_seconds = self._wait_seconds
        return round_view_from_proto(_call(lambda: self._stub.GetRound(request, timeout=60).round))

    def submit(
        self,
        round_number: int,
        chunks: Sequence[bytes],
        attempt: int = 0,
        epsilon: float = 0.0,
        signature: bytes = b"",
        certificate: bytes = b"",
    ) -> None:
        def requests() -> Iterator[fpb.SubmitUpdateRequest]:
            for i, data in enumerate(chunks):
                if i == 0:
                    yield fpb.SubmitUpdateRequest(
                        task=self._task,
                        round=round_number,
                        hospital=self._hospital,
                        total_chunks=len(chunks),
                        index=0,
                        ciphertext=data,
                        attempt=attempt,
                        epsilon=epsilon,
                        study_hash=self._study_hash,
                        signature=signature,
                        certificate=certificate,
                    )
                else:
                    yield fpb.SubmitUpdateRequest(index=i, ciphertext=data)

        _call(lambda: self._stub.SubmitUpdate(requests(), timeout=120))

    def fetch_aggregate(self, round_number: int) -> list[bytes]:
        request = fpb.FetchAggregateRequest(task=self._task, round=round_number, hospital=self._hospital)
        return _call(lambda: [c.ciphertext for c in self._stub.FetchAggregate(request, timeout=120)])

    def publish_mask_key(self, round_number: int, key: SignedMaskKey) -> RoundView:
        request = fpb.PublishMaskKeyRequest(
            task=self._task,
            round=round_number,
            hospital=self._hospital,
            public_key=key.public_key,
            signature=key.signature,
            certificate=key.certificate,
            study_hash=self._study_hash,
        )
        return round_view_from_proto(_call(lambda: self._stub.PublishMaskKey(request, timeout=60).round))

    def wait_for_cohort(self) -> RoundView:
        request = fpb.GetRoundRequest(task=self._task, wait_for_cohort=True, wait_seconds=self._wait_seconds)
        return round_view_from_proto(_call(lambda: self._stub.GetRound(request, timeout=60).round))

    def mask_keys(self, round_number: int) -> dict[str, SignedMaskKey]:
        request = fpb.GetMaskKeysRequest(task=self._task, round=round_number)
        response = _call(lambda: self._stub.GetMaskKeys(request, timeout=60))
        return {
            k.hospital: SignedMaskKey(bytes(k.public_key), bytes(k.signature), bytes(k.certificate))
            for k in response.keys
        }

    def post_message(
        self,
        round_number: int,
        stage: str,
        envelopes: Sequence[tuple[str, bytes]],
        payload: bytes,
        signature: bytes,
        certificate: bytes,
    ) -> None:
        request = fpb.PostRoundMessageRequest(
            task=self._task,
            round=round_number,
            hospital=self._hospital,
            stage=_STAGES[stage],
            envelopes=[fpb.Envelope(to=to, data=data) for to, data in envelopes],
            payload=payload,
            signature=signature,
            certificate=certificate,
            study_hash=self._study_hash,
        )
        _call(lambda: self._stub.PostRoundMessage(request, timeout=60))

    def round_stage(self, round_number: int, stage: str, wait: bool) -> StageView:
        request = fpb.GetRoundStageRequest(
            task=self._task,
            round=round_number,
            stage=_STAGES[stage],
            hospital=self._hospital,
            wait_seconds=self._wait_seconds if wait else 0.0,
        )
        response = _call(lambda: self._stub.GetRoundStage(request, timeout=60))
        return StageView(
            closed=response.closed,
            members=frozenset(response.members),
            messages={
                m.sender: (bytes(m.data), Signed(bytes(m.signature), bytes(m.certificate)))
                for m in response.messages
            },
        )

    def fetch_upload(
        self, round_number: int, hospital: str, indexes: Sequence[int]
    ) -> tuple[bytes, bytes, bytes, dict[int, bytes]]:
        request = fpb.FetchUploadRequest(
            task=self._task, round=round_number, hospital=hospital, indexes=indexes
        )
        responses = _call(lambda: list(self._stub.FetchUpload(request, timeout=120)))
        if not responses:
            raise PeerRefused(f"the aggregator sent nothing of {hospital}'s upload to round {round_number}")
        head = responses[0]
        chunks = {int(r.index): bytes(r.ciphertext) for r in responses[1:]}
        return bytes(head.digests), bytes(head.signature), bytes(head.certificate), chunks

    def closed_rounds(self) -> list[int]:
        request = fpb.GetFederationStatusRequest(task=self._task)
        status = _call(lambda: self._stub.GetFederationStatus(request, timeout=60).status)
        return [int(r.round) for r in status.history if r.state == fpb.ROUND_STATE_CLOSED]


class GrpcGateway:
    def __init__(self, channel: grpc.Channel, task: str) -> None:
        self._stub = emr_pb2_grpc.EmrGatewayServiceStub(channel)
        self._task = task

    def training_examples(self, purpose: str) -> Iterable[TrainingExample]:
        request = emr_pb2.StreamTrainingExamplesRequest(task=self._task, purpose=purpose)

        def read_all() -> list[TrainingExample]:
            return [
                training_example_from_proto(ex)
                for batch in self._stub.StreamTrainingExamples(request)
                for ex in batch.examples
            ]

        return _call(read_all)
