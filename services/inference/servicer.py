"""The inference servicers: diagnosis references and the Open Inference Protocol (KServe v2).

Both are thin: check the request, convert it, ask the model, convert back. Domain errors are
raised, and the shared interceptor turns them into statuses with field violations.
"""

from __future__ import annotations

import json

import grpc

from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument, NotFound
from fibemrss.domain.feature_encoding import input_names
from fibemrss.domain.feature_extraction import extract
from fibemrss.inference.v1 import inference_pb2 as pb
from fibemrss.inference.v1 import inference_pb2_grpc
from fibemrss.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fibemrss.platform.identity import caller_identity
from fibemrss.serde.records import feature_values_from_proto
from services.inference import tensors
from services.inference.diagnosis import CAVEAT, LoadedModel, Reference, diagnose_values, infer
from services.inference.model_cache import ModelCache
from services.inference.patient_directory import PatientDirectory

MAX_BATCH_PATIENTS = 1024
SERVER_NAME = "fibemrss-inference"
SERVER_VERSION = "0.1.0"
PLATFORM = "fibemrss_numpy"


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
    )


class DiagnosisServicer(inference_pb2_grpc.DiagnosisServiceServicer):
    def __init__(self, cache: ModelCache, directory: PatientDirectory | None = None) -> None:
        self._cache = cache
        self._task_name = cache.task.name
        self._directory = directory

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
            values = extract(self._cache.task, record)[0]
        else:
            values = feature_values_from_proto(self._cache.task, request.patient)
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
        # Every record is checked before any is scored, so one call reports every bad field.
        rows, problems = [], []
        for i, patient in enumerate(request.patients):
            try:
                rows.append(feature_values_from_proto(self._cache.task, patient, field=f"patients[{i}]"))
            except InvalidArgument as exc:
                problems.extend(exc.violations)
        if problems:
            raise InvalidArgument("invalid patient records", problems)
        model = self._cache.get(request.model_version)
        refs = diagnose_values(model, rows)
        return pb.DiagnoseBatchResponse(references=[_reference_to_proto(model, r) for r in refs])


class KServeServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`; the model name is the task name, versions are numbers."""

    def __init__(self, cache: ModelCache) -> None:
        self._cache = cache
        self._task_name = cache.task.name
        self._input_names = input_names(cache.task)

    def _model(self, name: str, version: str, version_field: str) -> LoadedModel:
        if name != self._task_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self._task_name}")
        return self._cache.get(tensors.parse_version(version, version_field))

    def ServerLive(
        self, request: kserve.ServerLiveRequest, context: grpc.ServicerContext
    ) -> kserve.ServerLiveResponse:
        return kserve.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: kserve.ServerReadyRequest, context: grpc.ServicerContext
    ) -> kserve.ServerReadyResponse:
        # Strict readiness (as Triton's default): ready only when the one model can serve.
        return kserve.ServerReadyResponse(ready=self._cache.ready)

    def ModelReady(
        self, request: kserve.ModelReadyRequest, context: grpc.ServicerContext
    ) -> kserve.ModelReadyResponse:
        if request.name != self._task_name:
            return kserve.ModelReadyResponse(ready=False)
        return kserve.ModelReadyResponse(
            ready=self._cache.has(tensors.parse_version(request.version, "version"))
        )

    def ServerMetadata(
        self, request: kserve.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> kserve.ServerMetadataResponse:
        return kserve.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    def ModelMetadata(
        self, request: kserve.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> kserve.ModelMetadataResponse:
        model = self._model(request.name, request.version, "version")
        spec = tensors.input_spec(model.input_dim)
        tensor = kserve.ModelMetadataResponse.TensorMetadata
        return kserve.ModelMetadataResponse(
            name=self._task_name,
            versions=[str(v) for v in self._cache.versions()],
            platform=PLATFORM,
            inputs=[tensor(name=spec.name, datatype=spec.datatype, shape=spec.shape)],
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in tensors.output_specs()],
            properties={
                "model_version": str(model.version),
                "federated_round": str(model.federated_round),
                "architecture": model.task.model,
                "threshold": repr(model.threshold),
                # Column j of `features` is the encoded input named here; see docs/inference.md.
                "input_columns": json.dumps(self._input_names),
                "input_encoding": (
                    "numeric: (value - mean) / std, then a <name>_missing indicator (1 with value 0 "
                    "when missing); categorical: one-hot <name>=<code>, all 0 when missing"
                ),
                "feature_statistics": json.dumps(model.stats.to_json()),
            },
        )

    def ModelInfer(
        self, request: kserve.ModelInferRequest, context: grpc.ServicerContext
    ) -> kserve.ModelInferResponse:
        model = self._model(request.model_name, request.model_version, "model_version")
        wanted = tensors.requested_outputs(request)
        x = tensors.decode_features(request, model.input_dim)
        probability, logit = infer(model, x)
        response = kserve.ModelInferResponse(
            model_name=self._task_name, model_version=str(model.version), id=request.id
        )
        values = {"probability": probability, "logit": logit}
        for name in wanted:
            tensors.add_output(response, name, values[name])
        return response
