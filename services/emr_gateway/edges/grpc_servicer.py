"""The gateway's gRPC servicer: converts requests to use-case calls (`use_cases.py`) and back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument
from fibemrss.domain.site_policy import StudyDecision, policy_to_json
from fibemrss.platform.identity import caller_identity
from fibemrss.serde.records import record_to_proto
from fibemrss.serde.values import timestamp_to_proto, training_example_to_proto
from services.emr_gateway.core.ingestion import Outcome
from services.emr_gateway.core.quarantine_review import Correction
from services.emr_gateway.core.study_decisions import Review, StudyReview
from services.emr_gateway.core.use_cases import (
    CsvPayload,
    Gateway,
    QuarantineEntry,
    QuarantineStatus,
    listing_problems,
)

_FATES = {
    "accepted": emr_pb2.FATE_ACCEPTED,
    "duplicate": emr_pb2.FATE_DUPLICATE,
    "quarantined": emr_pb2.FATE_QUARANTINED,
    "rejected": emr_pb2.FATE_REJECTED,
    "unsupported": emr_pb2.FATE_UNSUPPORTED,
}
_FIELDS = {
    "accepted": "accepted",
    "duplicate": "duplicates",
    "quarantined": "quarantined",
    "rejected": "rejected",
    "unsupported": "unsupported",
}
_STATUSES: dict[QuarantineStatus, emr_pb2.QuarantineStatus.ValueType] = {
    "open": emr_pb2.QUARANTINE_STATUS_OPEN,
    "accepted": emr_pb2.QUARANTINE_STATUS_ACCEPTED,
    "rejected": emr_pb2.QUARANTINE_STATUS_REJECTED,
}
EXAMPLES_PER_MESSAGE = 256


def _entry_to_proto(e: QuarantineEntry) -> emr_pb2.QuarantinedRecord:
    p = e.record.provenance
    return emr_pb2.QuarantinedRecord(
        id=e.id,
        patient_key=e.patient_key,
        source_system=p.source_system,
        source_id=p.source_id,
        payload_sha256=p.payload_sha256,
        reasons=e.reasons,
        record=record_to_proto(e.record, patient_key=e.patient_key),
        status=_STATUSES[e.status],
        created_at=timestamp_to_proto(e.created_at),
        resolved_at=timestamp_to_proto(e.resolved_at),
        resolved_by=e.resolved_by,
        resolution_reason=e.resolution_reason,
    )


def _page(request: emr_pb2.ListQuarantineRequest) -> tuple[QuarantineStatus, int]:
    """(status, after id) of a listing request."""
    problems: list[FieldProblem] = []
    status: QuarantineStatus = "open"
    if request.status != emr_pb2.QUARANTINE_STATUS_UNSPECIFIED:
        names: dict[emr_pb2.QuarantineStatus.ValueType, QuarantineStatus] = {
            v: k for k, v in _STATUSES.items()
        }
        if request.status not in names:
            problems.append(FieldProblem("status", "is not a known quarantine status"))
        status = names.get(request.status, "open")
    after = 0
    if request.page_token:
        # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
        if (
            not (request.page_token.isascii() and request.page_token.isdigit())
            or len(request.page_token) > 18
        ):
            problems.append(FieldProblem("page_token", "is not a token this server returned"))
        else:
            after = int(request.page_token)
    problems += listing_problems(request.purpose, request.page_size)
    if problems:
        raise InvalidArgument("invalid listing request", problems)
    return status, after


def _outcome_to_proto(o: Outcome) -> emr_pb2.RecordOutcome:
    return emr_pb2.RecordOutcome(
        index=o.index,
        source_id=o.source_id,
        fate=_FATES[o.fate],
        reasons=o.reasons,
        violations=[emr_pb2.FieldViolation(field=v.field, description=v.description) for v in o.violations],
        patient_key=o.patient_key,
    )


class EmrGatewayServicer(emr_pb2_grpc.EmrGatewayServiceServicer):
    def __init__(self, gateway: Gateway, studies: StudyReview | None = None) -> None:
        self._gateway = gateway
        self._studies = studies

    def Ingest(self, request: emr_pb2.IngestRequest, context: grpc.ServicerContext) -> emr_pb2.IngestResponse:
        kind = request.WhichOneof("payload")
        if kind == "csv":
            csv = request.csv
            result = self._gateway.ingest_payload(
                kind, CsvPayload(csv.content, csv.profile, csv.profile_file, csv.source_name, csv.first_row)
            )
        else:
            result = self._gateway.ingest_payload(kind, getattr(request, kind).content if kind else b"")
        response = emr_pb2.IngestResponse(
            outcomes=[_outcome_to_proto(o) for o in result.outcomes], resources=result.resources
        )
        for o in result.outcomes:
            field = _FIELDS[o.fate]
            setattr(response, field, getattr(response, field) + 1)
        return response

    def ListQuarantine(
        self, request: emr_pb2.ListQuarantineRequest, context: grpc.ServicerContext
    ) -> emr_pb2.ListQuarantineResponse:
        status, after = _page(request)
        page = self._gateway.list_quarantine(
            caller_identity(context), request.purpose, status, after, request.page_size
        )
        return emr_pb2.ListQuarantineResponse(
            records=[_entry_to_proto(e) for e in page.entries],
            next_page_token=str(page.next_after) if page.next_after is not None else "",
        )

    def ResolveQuarantine(
        self, request: emr_pb2.ResolveQuarantineRequest, context: grpc.ServicerContext
    ) -> emr_pb2.ResolveQuarantineResponse:
        accept = {emr_pb2.RESOLUTION_ACCEPT: True, emr_pb2.RESOLUTION_REJECT: False}.get(request.resolution)
        resolved, stored = self._gateway.resolve_quarantine(
            caller_identity(context),
            request.id,
            accept,
            [Correction(c.observation_index, c.value, c.unit or None) for c in request.corrections],
            request.reason,
        )
        return emr_pb2.ResolveQuarantineResponse(
            record=_entry_to_proto(resolved), fate=_FATES[stored] if stored else emr_pb2.FATE_REJECTED
        )

    def GetPatient(
        self, request: emr_pb2.GetPatientRequest, context: grpc.ServicerContext
    ) -> emr_pb2.GetPatientResponse:
        record = self._gateway.read_patient(
            caller_identity(context), request.patient_key, request.purpose, request.on_behalf_of
        )
        return emr_pb2.GetPatientResponse(record=record_to_proto(record, patient_key=request.patient_key))

    def GetIngestStats(
        self, request: emr_pb2.GetIngestStatsRequest, context: grpc.ServicerContext
    ) -> emr_pb2.GetIngestStatsResponse:
        s = self._gateway.stats()
        return emr_pb2.GetIngestStatsResponse(
            patients=s["patients"],
            observations=s["observations"],
            conditions=s["conditions"],
            encounters=s["encounters"],
            quarantined=s["quarantine"],
            source_records=s["source_records"],
        )

    def StreamTrainingExamples(
        self, request: emr_pb2.StreamTrainingExamplesRequest, context: grpc.ServicerContext
    ) -> Iterator[emr_pb2.StreamTrainingExamplesResponse]:
        batch = emr_pb2.StreamTrainingExamplesResponse()
        for example in self._gateway.training_examples(
            caller_identity(context), request.task, request.purpose
        ):
            batch.examples.append(training_example_to_proto(example))
            if len(batch.examples) >= EXAMPLES_PER_MESSAGE:
                yield batch
                batch = emr_pb2.StreamTrainingExamplesResponse()
        if batch.examples:
            yield batch

    # -- study review (core/study_decisions.py) -------------------------------------------------------
    def _review(self) -> StudyReview:
        if self._studies is None:
            raise FailedPrecondition("this gateway does not review studies")
        return self._studies

    def ReviewStudy(
        self, request: emr_pb2.ReviewStudyRequest, context: grpc.ServicerContext
    ) -> emr_pb2.ReviewStudyResponse:
        return review_to_proto(self._review().review(caller_identity(context), request.document))

    def DecideStudy(
        self, request: emr_pb2.DecideStudyRequest, context: grpc.ServicerContext
    ) -> emr_pb2.DecideStudyResponse:
        decision = self._review().decide(
            caller_identity(context), request.document, request.approve, request.reason
        )
        return emr_pb2.DecideStudyResponse(decision=decision_to_proto(decision))


def decision_to_proto(d: StudyDecision) -> emr_pb2.StudyDecision:
    out = emr_pb2.StudyDecision(
        study=d.study,
        study_hash=d.study_hash,
        version=d.version,
        decision=d.decision,
        reason=d.reason,
        decided_by=d.decided_by,
        decided_at=d.decided_at,
    )
    if d.eligible is not None:
        out.eligible = d.eligible
    return out


def review_to_proto(r: Review) -> emr_pb2.ReviewStudyResponse:
    out = emr_pb2.ReviewStudyResponse(
        study=r.task.name,
        version=r.task.version,
        study_hash=r.study_hash,
        patients=r.patients,
        eligible=r.eligible,
        consent_excluded=r.consent_excluded,
        policy_json=json.dumps(policy_to_json(r.policy), sort_keys=True),
        policy_set=r.policy_set,
        problems=[emr_pb2.PolicyProblem(rule=p.field, description=p.description) for p in r.problems],
        code_systems=r.code_systems,
        model=r.task.model,
    )
    if r.decision is not None:
        out.decision.CopyFrom(decision_to_proto(r.decision))
    if r.epsilon is not None:
        out.epsilon = r.epsilon
    return out
