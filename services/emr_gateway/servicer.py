"""The gateway's gRPC servicer: converts requests, calls the ingestion domain and the store."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from fibemrss.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.errors import FieldProblem, InvalidArgument, NotFound
from fibemrss.feature_extraction import extract
from fibemrss.identity import caller_identity
from fibemrss.proto_convert import record_to_proto
from fibemrss.task_spec import get_task
from services.emr_gateway.csv_profiles import PROFILES
from services.emr_gateway.ingestion import Candidate, Outcome, ingest
from services.emr_gateway.pseudonym import Pseudonymizer
from services.emr_gateway.store import GatewayStore

_FATES = {
    "accepted": emr_pb2.FATE_ACCEPTED,
    "duplicate": emr_pb2.FATE_DUPLICATE,
    "quarantined": emr_pb2.FATE_QUARANTINED,
    "rejected": emr_pb2.FATE_REJECTED,
    "unsupported": emr_pb2.FATE_UNSUPPORTED,
}
EXAMPLES_PER_MESSAGE = 256


def _text(content: bytes, field: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            "content is not UTF-8", [FieldProblem(field, f"not valid UTF-8 at byte {exc.start}")]
        ) from None


def _csv_candidates(request: emr_pb2.CsvExport) -> list[Candidate]:
    parse = PROFILES.get(request.profile)
    if parse is None:
        known = ", ".join(sorted(PROFILES))
        raise InvalidArgument(
            "unknown CSV profile", [FieldProblem("csv.profile", f"{request.profile!r} is not one of {known}")]
        )
    text = _text(request.content, "csv.content")
    source = request.source_name or "csv"
    return [Candidate(r.index, r.source_id, r.record, r.violations) for r in parse(text, source)]


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
    def __init__(self, store: GatewayStore, pseudonyms: Pseudonymizer) -> None:
        self._store = store
        self._pseudonyms = pseudonyms

    def Ingest(self, request: emr_pb2.IngestRequest, context: grpc.ServicerContext) -> emr_pb2.IngestResponse:
        kind = request.WhichOneof("payload")
        if kind == "csv":
            candidates = _csv_candidates(request.csv)
        elif kind is None:
            raise InvalidArgument("empty request", [FieldProblem("payload", "set one of fhir, hl7v2, csv")])
        else:
            from services.emr_gateway.formats import candidates_for

            candidates = candidates_for(kind, getattr(request, kind).content)
        outcomes = ingest(candidates, self._store, self._pseudonyms)
        response = emr_pb2.IngestResponse(outcomes=[_outcome_to_proto(o) for o in outcomes])
        for o in outcomes:
            field = {
                "accepted": "accepted",
                "duplicate": "duplicates",
                "quarantined": "quarantined",
                "rejected": "rejected",
                "unsupported": "unsupported",
            }[o.fate]
            setattr(response, field, getattr(response, field) + 1)
        return response

    def GetPatient(
        self, request: emr_pb2.GetPatientRequest, context: grpc.ServicerContext
    ) -> emr_pb2.GetPatientResponse:
        if not request.patient_key:
            raise InvalidArgument("patient_key is required", [FieldProblem("patient_key", "is required")])
        if not request.purpose:
            raise InvalidArgument(
                "purpose is required", [FieldProblem("purpose", "say why the record is read")]
            )
        record = self._store.get_patient(request.patient_key)
        self._store.audit(caller_identity(context), "read_patient", request.purpose, request.patient_key)
        return emr_pb2.GetPatientResponse(record=record_to_proto(record, patient_key=request.patient_key))

    def GetIngestStats(
        self, request: emr_pb2.GetIngestStatsRequest, context: grpc.ServicerContext
    ) -> emr_pb2.GetIngestStatsResponse:
        s = self._store.stats()
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
        try:
            task = get_task(request.task)
        except NotFound:
            raise
        self._store.audit(
            caller_identity(context), "stream_training_examples", request.purpose or "training", request.task
        )
        batch = emr_pb2.StreamTrainingExamplesResponse()
        for key, record in self._store.current_patients():
            values, label = extract(task, record)
            example = batch.examples.add(patient_key=key)
            for v in values:
                fv = example.features.add()
                if isinstance(v, str):
                    fv.category = v
                elif v is not None:
                    fv.number = float(v)
            if label is not None:
                example.label = label
            if len(batch.examples) >= EXAMPLES_PER_MESSAGE:
                yield batch
                batch = emr_pb2.StreamTrainingExamplesResponse()
        if batch.examples:
            yield batch
