"""The aggregator's gRPC servicer: converts requests and delegates to the Coordinator."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.domain.errors import (
    FailedPrecondition,
    FieldProblem,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from fibemrss.domain.text import text_problems
from fibemrss.he.mask_signatures import SignedMaskKey
from fibemrss.platform.identity import caller_identity
from fibemrss.serde.values import timestamp_to_proto
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.core.ports import FederationRecords
from services.aggregator.core.proposals import Proposal, check_same_study, latest, pinned_hash, propose
from services.aggregator.core.round_state import FederationSettings, Round, RoundState, base_round

_STATES = {
    RoundState.OPEN: pb.ROUND_STATE_OPEN,
    RoundState.COLLECTING: pb.ROUND_STATE_COLLECTING,
    RoundState.AGGREGATING: pb.ROUND_STATE_AGGREGATING,
    RoundState.CLOSED: pb.ROUND_STATE_CLOSED,
    RoundState.FAILED: pb.ROUND_STATE_FAILED,
}
MAX_WAIT_SECONDS = 30.0
_MESSAGE_STAGES = {
    pb.ROUND_STAGE_SHARES: "shares",
    pb.ROUND_STAGE_SURVIVORS: "survivors",
    pb.ROUND_STAGE_REVEALS: "reveals",
}
_ALL_STAGES = {**_MESSAGE_STAGES, pb.ROUND_STAGE_UPLOADS: "uploads"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadLimits:
    """An upload whose sender stalls (no chunk for `idle_seconds`) or drags on past
    `total_seconds` is cancelled; it held no lock and stored nothing."""

    idle_seconds: float = 30.0
    total_seconds: float = 300.0


class UploadWatchdog:
    """Cancels one upload call at its limits, which ends the handler's blocked read."""

    def __init__(self, context: grpc.ServicerContext, limits: UploadLimits) -> None:
        self._context, self._limits = context, limits
        self._began = self._last = time.monotonic()
        self._done = threading.Event()
        self.expired = ""
        threading.Thread(target=self._watch, name="upload-watchdog", daemon=True).start()

    def chunk_arrived(self) -> None:
        self._last = time.monotonic()

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(0.2, self._limits.idle_seconds / 4)):
            now = time.monotonic()
            if now - self._last > self._limits.idle_seconds:
                self.expired = f"no chunk for {self._limits.idle_seconds:g} s"
            elif now - self._began > self._limits.total_seconds:
                self.expired = f"upload longer than {self._limits.total_seconds:g} s"
            if self.expired:
                log.warning("upload cancelled", extra={"reason": self.expired})
                self._context.cancel()
                return


DEFAULT_MIN_CONTRIBUTORS = 3


def check_hospital_identity(context: grpc.ServicerContext, hospital: str) -> None:
    """With mutual TLS, an agent's certificate names its hospital ("agent@<hospital>")."""
    identity = caller_identity(context)
    if identity.startswith("unauthenticated:"):
        return  # plaintext loopback deployments (the demo); TLS deployments always have a name
    if identity != f"agent@{hospital}":
        raise PermissionDenied(f"caller {identity} may not act for hospital {hospital!r}")


def check_names(**fields: str) -> None:
    """Names PostgreSQL cannot hold (a NUL character) are refused before any query."""
    if problems := text_problems(fields):
        raise InvalidArgument("text that cannot be stored", problems)


class AggregatorServicer(federation_pb2_grpc.AggregatorServiceServicer):
    def __init__(
        self, coordinator: Coordinator, store: FederationRecords, upload_limits: UploadLimits | None = None
    ) -> None:
        self._coordinator = coordinator
        self._store = store
        self._upload_limits = upload_limits or UploadLimits()

    def _round_info(self, r: Round, settings: FederationSettings, rounds: list[Round]) -> pb.RoundInfo:
        """`rounds` is the task's whole history, read once per request by the caller."""
        return pb.RoundInfo(
            task=r.task,
            round=r.number,
            state=_STATES[r.state],
            submitted=sorted(r.submitted),
            quorum=settings.quorum,
            deadline=timestamp_to_proto(r.deadline_at),
            rounds=settings.rounds,
            federation_done=self._coordinator.is_done(settings, r),
            base_round=base_round(rounds, r.number),
            failure=self._store.failure(r.task, r.number) if r.state == RoundState.FAILED else "",
            pairwise_masking=settings.pairwise_masking,
            attempt=r.attempt,
            cohort_fixed=r.cohort is not None,
            cohort=sorted(r.cohort or ()),
            federation_id=settings.federation_id,
            min_contributors=settings.min_contributors,
            epsilon=r.epsilon,
            study_hash=settings.study_hash,
        )

    def _current_info(self, task: str) -> pb.RoundInfo:
        settings = self._store.settings(task)  # NotFound for a task without a federation
        rounds = self._store.rounds(task)
        return self._round_info(rounds[-1], settings, rounds)

    def _status(self, task: str) -> pb.FederationStatus:
        settings = self._store.settings(task)
        rounds = self._store.rounds(task)
        return pb.FederationStatus(
            task=task,
            rounds=settings.rounds,
            quorum=settings.quorum,
            hospitals=list(settings.hospitals),
            current=self._round_info(rounds[-1], settings, rounds),
            history=[self._round_info(r, settings, rounds) for r in rounds],
            pairwise_masking=settings.pairwise_masking,
            min_contributors=settings.min_contributors,
            study_hash=settings.study_hash,
        )

    def StartFederation(
        self, request: pb.StartFederationRequest, context: grpc.ServicerContext
    ) -> pb.StartFederationResponse:
        if not request.task:
            raise InvalidArgument("task is required", [FieldProblem("task", "is required")])
        check_names(task=request.task, study_hash=request.study_hash)
        settings = FederationSettings(
            task=request.task,
            rounds=request.rounds,
            quorum=request.quorum,
            grace_seconds=request.grace_seconds,
            deadline_seconds=request.deadline_seconds or 300.0,
            hospitals=tuple(request.hospitals),
            pairwise_masking=request.pairwise_masking,
            min_contributors=request.min_contributors or DEFAULT_MIN_CONTRIBUTORS,
            study_hash=pinned_hash(self._store, request.task, request.study_hash),
        )
        self._coordinator.start_federation(settings)
        return pb.StartFederationResponse(status=self._status(request.task))

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.GetRoundResponse:
        check_names(task=request.task)
        asked = request.wait_seconds if math.isfinite(request.wait_seconds) else 0.0
        wait = min(max(asked, 0.0), MAX_WAIT_SECONDS)
        if request.HasField("wait_for_round"):
            self._coordinator.wait_for_round(request.task, request.wait_for_round, wait, context.is_active)
        elif request.wait_for_cohort:
            self._coordinator.wait_for_cohort(request.task, wait, context.is_active)
        return pb.GetRoundResponse(round=self._current_info(request.task))

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument(
                "empty submission stream", [FieldProblem("chunks", "send at least one chunk")]
            )
        problems = [
            FieldProblem(f, "is required on the first chunk")
            for f, v in (("task", first.task), ("hospital", first.hospital))
            if not v
        ]
        if first.total_chunks < 1:
            problems.append(FieldProblem("total_chunks", "must be at least 1"))
        problems += text_problems({"task": first.task, "hospital": first.hospital})
        if problems:
            raise InvalidArgument("incomplete first chunk", problems)
        check_hospital_identity(context, first.hospital)
        check_same_study(
            first.task, self._store.settings(first.task).study_hash, first.hospital, first.study_hash
        )

        watchdog = UploadWatchdog(context, self._upload_limits)

        def chunks() -> Iterator[tuple[int, bytes]]:
            yield first.index, first.ciphertext
            try:
                for chunk in request_iterator:
                    watchdog.chunk_arrived()
                    yield chunk.index, chunk.ciphertext
            except grpc.RpcError:
                raise Unavailable(f"upload cancelled: {watchdog.expired or 'the sender went away'}") from None

        try:
            duplicate = self._coordinator.submit(
                first.task,
                first.round,
                first.hospital,
                first.total_chunks,
                chunks(),
                first.attempt,
                first.epsilon,
                first.signature,
                first.certificate,
            )
        finally:
            watchdog.close()
        return pb.SubmitUpdateResponse(duplicate=duplicate, round=self._current_info(first.task))

    def FetchAggregate(
        self, request: pb.FetchAggregateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchAggregateResponse]:
        check_names(task=request.task, hospital=request.hospital)
        if request.hospital:
            check_hospital_identity(context, request.hospital)
        rounds = {r.number: r for r in self._store.rounds(request.task)}
        if request.round not in rounds:
            raise NotFound(f"round {request.round} of {request.task} does not exist")
        if rounds[request.round].state != RoundState.CLOSED:
            raise FailedPrecondition(f"round {request.round} is {rounds[request.round].state}, not closed")
        cached = self._coordinator.cached_sum(request.task, request.round)
        if cached is not None:
            contributors, chunks = cached
            for index, data in enumerate(chunks):
                yield pb.FetchAggregateResponse(
                    index=index, total_chunks=len(chunks), ciphertext=data, contributors=contributors
                )
            return
        for index, total, contributors, data in self._store.aggregate(request.task, request.round):
            yield pb.FetchAggregateResponse(
                index=index, total_chunks=total, ciphertext=data, contributors=contributors
            )

    def PublishMaskKey(
        self, request: pb.PublishMaskKeyRequest, context: grpc.ServicerContext
    ) -> pb.PublishMaskKeyResponse:
        problems = [
            FieldProblem(f, "is required")
            for f, v in (("task", request.task), ("hospital", request.hospital))
            if not v
        ]
        problems += text_problems({"task": request.task, "hospital": request.hospital})
        if problems:
            raise InvalidArgument("incomplete mask key", problems)
        check_hospital_identity(context, request.hospital)
        check_same_study(
            request.task, self._store.settings(request.task).study_hash, request.hospital, request.study_hash
        )
        self._coordinator.publish_mask_key(
            request.task,
            request.round,
            request.hospital,
            SignedMaskKey(request.public_key, request.signature, request.certificate),
        )
        return pb.PublishMaskKeyResponse(round=self._current_info(request.task))

    def GetMaskKeys(
        self, request: pb.GetMaskKeysRequest, context: grpc.ServicerContext
    ) -> pb.GetMaskKeysResponse:
        check_names(task=request.task)
        keys = self._coordinator.mask_keys(request.task, request.round)
        return pb.GetMaskKeysResponse(
            keys=[
                pb.MaskKey(
                    hospital=h, public_key=k.public_key, signature=k.signature, certificate=k.certificate
                )
                for h, k in sorted(keys.items())
            ]
        )

    def PostRoundMessage(
        self, request: pb.PostRoundMessageRequest, context: grpc.ServicerContext
    ) -> pb.PostRoundMessageResponse:
        check_names(task=request.task, hospital=request.hospital)
        stage = _MESSAGE_STAGES.get(request.stage)
        if stage is None:
            raise InvalidArgument(
                "unknown stage", [FieldProblem("stage", "must be SHARES, SURVIVORS or REVEALS")]
            )
        check_hospital_identity(context, request.hospital)
        check_same_study(
            request.task, self._store.settings(request.task).study_hash, request.hospital, request.study_hash
        )
        if stage == "shares":
            check_names(**{f"envelopes[{i}].to": e.to for i, e in enumerate(request.envelopes)})
            parts = [(e.to, bytes(e.data)) for e in request.envelopes]
        else:
            parts = [("", bytes(request.payload))]
        self._coordinator.post_message(
            request.task,
            request.round,
            request.hospital,
            stage,
            parts,
            bytes(request.signature),
            bytes(request.certificate),
        )
        return pb.PostRoundMessageResponse(round=self._current_info(request.task))

    def GetRoundStage(
        self, request: pb.GetRoundStageRequest, context: grpc.ServicerContext
    ) -> pb.GetRoundStageResponse:
        check_names(task=request.task, hospital=request.hospital)
        stage = _ALL_STAGES.get(request.stage)
        if stage is None:
            raise InvalidArgument("unknown stage", [FieldProblem("stage", "must name a round stage")])
        if request.hospital:
            check_hospital_identity(context, request.hospital)
        asked = request.wait_seconds if math.isfinite(request.wait_seconds) else 0.0
        closed, members, messages = self._coordinator.stage(
            request.task,
            request.round,
            stage,
            request.hospital,
            min(max(asked, 0.0), MAX_WAIT_SECONDS),
            context.is_active,
        )
        return pb.GetRoundStageResponse(
            closed=closed,
            members=sorted(members),
            messages=[
                pb.RoundMessage(sender=s, data=d, signature=g, certificate=c) for s, d, g, c in messages
            ],
            round=self._current_info(request.task),
        )

    def FetchUpload(
        self, request: pb.FetchUploadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchUploadResponse]:
        check_names(task=request.task, hospital=request.hospital)
        digests, signature, certificate, chunks = self._coordinator.upload(
            request.task, request.round, request.hospital, list(request.indexes)
        )
        yield pb.FetchUploadResponse(digests=digests, signature=signature, certificate=certificate, index=-1)
        for index, data in chunks:
            yield pb.FetchUploadResponse(index=index, ciphertext=data)

    def GetFederationStatus(
        self, request: pb.GetFederationStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetFederationStatusResponse:
        check_names(task=request.task)
        return pb.GetFederationStatusResponse(status=self._status(request.task))

    # -- study proposals (services/aggregator/core/proposals.py) ----------------------------------------------
    def ProposeStudy(
        self, request: pb.ProposeStudyRequest, context: grpc.ServicerContext
    ) -> pb.ProposeStudyResponse:
        proposal, duplicate = propose(self._store, caller_identity(context), request.document)
        return pb.ProposeStudyResponse(proposal=proposal_to_proto(proposal), duplicate=duplicate)

    def GetStudyProposal(
        self, request: pb.GetStudyProposalRequest, context: grpc.ServicerContext
    ) -> pb.GetStudyProposalResponse:
        if not request.study:
            raise InvalidArgument("study is required", [FieldProblem("study", "name the study")])
        check_names(study=request.study)
        return pb.GetStudyProposalResponse(proposal=proposal_to_proto(latest(self._store, request.study)))


def proposal_to_proto(p: Proposal) -> pb.StudyProposal:
    return pb.StudyProposal(
        study=p.study,
        version=p.version,
        study_hash=p.study_hash,
        document=p.document,
        proposed_by=p.proposed_by,
        proposed_at=timestamp_to_proto(p.proposed_at),
    )
