"""`fibemrss.inference.v1.DiagnosisService` over gRPC: diagnosis references (KServe v2: `kserve_grpc.py`).

Thin: check the request, convert it, ask the model, convert back. Domain errors are raised, and
the shared interceptor turns them into statuses with field violations.
"""

from __future__ import annotations

import grpc

from fibemrss.api.inference.v1 import inference_pb2 as pb
from fibemrss.api.inference.v1 import inference_pb2_grpc
from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument, NotFound
from fibemrss.domain.feature_extraction import FeatureValue
from fibemrss.domain.records import PatientRecord
from fibemrss.platform.identity import caller_identity
from fibemrss.serde.records import record_from_proto
from services.inference.core.diagnosis import CAVEAT, LoadedModel, Reference, diagnose_values
from services.inference.core.input_limits import MAX_VIOLATIONS, PatientInputs, capped
from services.inference.core.model_cache import ModelCache
from services.inference.core.ports import PatientSource

MAX_BATCH_PATIENTS = 1024


def _reference_to_proto(model: LoadedModel, ref: Reference) -> pb.DiagnoseResponse:
    return pb.DiagnoseResponse(
        probability=ref.probability,
        label=ref.label,
        threshold=model.threshold,
        model_name=model.task.name,
        model_version=model.version,
        federated_round=model.federated_round,
        top_contributions=[pb.FeatureContribution(feature=f, contribution=c) for f, c in ref.contributions],
        imputed_features=ref.imputed,
        risk_band=ref.risk_band,
        caveat=CAVEAT,
        model_kind=model.kind,
        base_model_version=model.base_version,
    )


class DiagnosisServicer(inference_pb2_grpc.DiagnosisServiceServicer):
    def __init__(self, cache: ModelCache, directory: PatientSource | None = None) -> None:
        self._cache = cache
        self._task_name = cache.task.name
        self._directory = directory
        self._inputs = PatientInputs(cache.task)

    def _values(self, record: PatientRecord, field: str) -> list[FeatureValue]:
        values, problems = self._inputs.read(record, field)
        if problems:
            raise InvalidArgument("invalid patient values", problems)
        return values

    def _check(self, task: str, model_version: int) -> None:
        if task and task != self._task_name:
            raise NotFound(f"this service serves {self._task_name}, not {task!r}")
        if model_version < 0:
            raise InvalidArgument(
                "bad model_version", [FieldProblem("model_version", "must be 0 (newest) or positive")]
            )

    def Diagnose(self, request: pb.DiagnoseRequest, context: grpc.ServicerContext) -> pb.DiagnoseResponse:
        self._check(request.task, request.model_version)
        subject = request.WhichOneof("subject")
        if subject is None:
            raise InvalidArgument(
                "patient is required", [FieldProblem("patient", "set patient or patient_key")]
            )
        if subject == "patient_key":
            if self._directory is None:
                raise FailedPrecondition(
                    "this inference service has no gateway to read patients from (FIBEMRSS_GATEWAY)"
                )
            record = self._directory.fetch(request.patient_key, on_behalf_of=caller_identity(context))
            # A stored record passed the gateway's checks; checked again, its fields named under the key.
            values = self._values(record, "patient_key")
        else:
            values = self._values(record_from_proto(request.patient), "patient")
        model = self._cache.get(request.model_version)
        return _reference_to_proto(model, diagnose_values(model, [values])[0])

    def DiagnoseBatch(
        self, request: pb.DiagnoseBatchRequest, context: grpc.ServicerContext
    ) -> pb.DiagnoseBatchResponse:
        self._check(request.task, request.model_version)
        if not 1 <= len(request.patients) <= MAX_BATCH_PATIENTS:
            raise InvalidArgument(
                "bad batch size",
                [FieldProblem("patients", f"must hold between 1 and {MAX_BATCH_PATIENTS} records")],
            )
        # Every record is checked before any is scored, so one call reports the bad fields (the
        # first MAX_VIOLATIONS of them, so that a batch of junk costs a bounded answer).
        rows: list[list[FeatureValue]] = []
        problems: list[FieldProblem] = []
        for i, patient in enumerate(request.patients):
            field = f"patients[{i}]"
            try:
                values, found = self._inputs.read(record_from_proto(patient, field), field)
            except InvalidArgument as exc:
                values, found = [], exc.violations
            rows.append(values)
            problems.extend(found)
            if len(problems) > MAX_VIOLATIONS:
                break
        if problems:
            raise InvalidArgument("invalid patient records", capped(problems, "patients"))
        model = self._cache.get(request.model_version)
        refs = diagnose_values(model, rows)
        return pb.DiagnoseBatchResponse(references=[_reference_to_proto(model, r) for r in refs])
