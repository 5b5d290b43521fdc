"""The diagnosis-reference servicer: validates the patient, asks the model, converts back."""

from __future__ import annotations

import grpc

from fibemrss.errors import FieldProblem, InvalidArgument, NotFound
from fibemrss.inference.v1 import inference_pb2 as pb
from fibemrss.inference.v1 import inference_pb2_grpc
from fibemrss.proto_convert import record_from_proto
from services.inference.diagnosis import CAVEAT, diagnose
from services.inference.model_cache import ModelCache


class DiagnosisServicer(inference_pb2_grpc.DiagnosisServiceServicer):
    def __init__(self, cache: ModelCache, task_name: str) -> None:
        self._cache = cache
        self._task_name = task_name

    def Diagnose(self, request: pb.DiagnoseRequest, context: grpc.ServicerContext) -> pb.DiagnoseResponse:
        if request.task and request.task != self._task_name:
            raise NotFound(f"this service serves {self._task_name}, not {request.task!r}")
        if not request.HasField("patient"):
            raise InvalidArgument("patient is required", [FieldProblem("patient", "is required")])
        if request.model_version < 0:
            raise InvalidArgument(
                "bad model_version", [FieldProblem("model_version", "must be 0 (newest) or positive")]
            )
        record = record_from_proto(request.patient)
        model = self._cache.get(request.model_version)
        ref = diagnose(model, record)
        return pb.DiagnoseResponse(
            probability=ref.probability,
            label=ref.label,
            threshold=model.threshold,
            model_name=model.task.name,
            model_version=model.version,
            federated_round=model.federated_round,
            top_contributions=[
                pb.FeatureContribution(feature=f, contribution=c) for f, c in ref.contributions
            ],
            imputed_features=ref.imputed,
            risk_band=ref.risk_band,
            caveat=CAVEAT,
        )
