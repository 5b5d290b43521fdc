"""The gateway's gRPC servicer: converts requests, calls the ingestion domain and the store."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter

from fibemrss.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.errors import FieldProblem, InvalidArgument, NotFound
from fibemrss.feature_extraction import extract
from fibemrss.identity import caller_identity
from fibemrss.proto_convert import record_to_proto
from fibemrss.task_spec import get_task
from services.emr_gateway.csv_mapping import load_profile, parse_with_profile
from services.emr_gateway.csv_profiles import PROFILES
from services.emr_gateway.formats import candidates_for
from services.emr_gateway.ingestion import Candidate, Outcome, ingest, resource_counts
from services.emr_gateway.pseudonym import Pseudonymizer
from services.emr_gateway.quarantine_review import Correction, corrected_record
from services.emr_gateway.store import GatewayStore, QuarantineEntry

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
_STATUSES = {
    "open": emr_pb2.QUARANTINE_STATUS_OPEN,
    "accepted": emr_pb2.QUARANTINE_STATUS_ACCEPTED,
    "rejected": emr_pb2.QUARANTINE_STATUS_REJECTED,
}
EXAMPLES_PER_MESSAGE = 256
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _text(content: bytes, field: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            "content is not UTF-8", [FieldProblem(field, f"not valid UTF-8 at byte {exc.start}")]
        ) from None


def _csv_candidates(request: emr_pb2.CsvExport) -> list[Candidate]:
    source = request.source_name or "csv"
    if request.profile_file:
        if request.profile:
            raise InvalidArgument(
                "two profiles", [FieldProblem("csv.profile", "set either profile or profile_file, not both")]
            )
        profile = load_profile(request.profile_file)
        rows = parse_with_profile(profile, _text(request.content, "csv.content"), source)
    else:
        parse = PROFILES.get(request.profile)
        if parse is None:
            known = ", ".join(sorted(PROFILES))
            raise InvalidArgument(
                "unknown CSV profile",
                [FieldProblem("csv.profile", f"{request.profile[:40]!r} is not one of {known}")],
            )
        rows = parse(_text(request.content, "csv.content"), source)
    return [Candidate(r.index, r.source_id, r.record, r.violations) for r in rows]


def _ts(value: object) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]
    return ts


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
        created_at=_ts(e.created_at),
        resolved_at=_ts(e.resolved_at),
        resolved_by=e.resolved_by,
        resolution_reason=e.resolution_reason,
    )


def _page(request: emr_pb2.ListQuarantineRequest) -> tuple[str, int, int]:
    """(status, after id, page size) of a listing request."""
    problems: list[FieldProblem] = []
    status = "open"
    if request.status != emr_pb2.QUARANTINE_STATUS_UNSPECIFIED:
        names = {v: k for k, v in _STATUSES.items()}
        if request.status not in names:
            problems.append(FieldProblem("status", "is not a known quarantine status"))
        status = names.get(request.status, "open")
    if request.page_size < 0:
        problems.append(FieldProblem("page_size", "must not be negative"))
    size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = 0
    if request.page_token:
        if not request.page_token.isdigit() or len(request.page_token) > 18:
            problems.append(FieldProblem("page_token", "is not a token this server returned"))
        else:
            after = int(request.page_token)
    if not request.purpose.strip():
        problems.append(FieldProblem("purpose", "say why quarantined records are read"))
    if problems:
        raise InvalidArgument("invalid listing request", problems)
    return status, after, size


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
    def __init__(
        self, store: GatewayStore, pseudonyms: Pseudonymizer, records: Counter | None = None
    ) -> None:
        self._store = store
        self._pseudonyms = pseudonyms
        # fibemrss_ingested_records_total{fate}: every record's fate (quarantine rate, rejections).
        self._records = records

    def Ingest(self, request: emr_pb2.IngestRequest, context: grpc.ServicerContext) -> emr_pb2.IngestResponse:
        kind = request.WhichOneof("payload")
        if kind == "csv":
            candidates = _csv_candidates(request.csv)
        elif kind is None:
            raise InvalidArgument("empty request", [FieldProblem("payload", "set one of fhir, hl7v2, csv")])
        else:
            candidates = candidates_for(kind, getattr(request, kind).content)
        outcomes = ingest(candidates, self._store, self._pseudonyms)
        if self._records is not None:
            for o in outcomes:
                self._records.labels(o.fate).inc()
        response = emr_pb2.IngestResponse(
            outcomes=[_outcome_to_proto(o) for o in outcomes],
            resources=resource_counts(candidates, outcomes),
        )
        for o in outcomes:
            field = _FIELDS[o.fate]
            setattr(response, field, getattr(response, field) + 1)
        return response

    def ListQuarantine(
        self, request: emr_pb2.ListQuarantineRequest, context: grpc.ServicerContext
    ) -> emr_pb2.ListQuarantineResponse:
        status, after, size = _page(request)
        entries = self._store.list_quarantine(status, after, size + 1)
        more = len(entries) > size
        entries = entries[:size]
        self._store.audit(
            caller_identity(context), "list_quarantine", request.purpose, f"status={status} n={len(entries)}"
        )
        return emr_pb2.ListQuarantineResponse(
            records=[_entry_to_proto(e) for e in entries],
            next_page_token=str(entries[-1].id) if more and entries else "",
        )

    def ResolveQuarantine(
        self, request: emr_pb2.ResolveQuarantineRequest, context: grpc.ServicerContext
    ) -> emr_pb2.ResolveQuarantineResponse:
        problems: list[FieldProblem] = []
        if request.id <= 0:
            problems.append(FieldProblem("id", "is required"))
        if request.resolution not in (emr_pb2.RESOLUTION_ACCEPT, emr_pb2.RESOLUTION_REJECT):
            problems.append(FieldProblem("resolution", "must be RESOLUTION_ACCEPT or RESOLUTION_REJECT"))
        if request.resolution == emr_pb2.RESOLUTION_REJECT and request.corrections:
            problems.append(FieldProblem("corrections", "only an accepted record can be corrected"))
        if not request.reason.strip():
            problems.append(FieldProblem("reason", "say why; it is written to the audit log"))
        if problems:
            raise InvalidArgument("invalid resolution", problems)
        entry = self._store.get_quarantined(request.id)
        accepted = None
        if request.resolution == emr_pb2.RESOLUTION_ACCEPT:
            corrections = [
                Correction(c.observation_index, c.value, c.unit or None) for c in request.corrections
            ]
            accepted = corrected_record(entry.record, corrections)
        resolved, stored = self._store.resolve_quarantine(
            entry.id,
            accepted,
            caller_identity(context),
            request.reason,
            entry.record.provenance.payload_sha256,
        )
        return emr_pb2.ResolveQuarantineResponse(
            record=_entry_to_proto(resolved), fate=_FATES[stored] if stored else emr_pb2.FATE_REJECTED
        )

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
