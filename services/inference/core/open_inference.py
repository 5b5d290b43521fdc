"""The Open Inference Protocol (KServe v2) for every transport: gRPC (`edges/kserve_grpc.py`) and
REST (`edges/kserve_rest.py`) call these same methods, so both give the same answers and the same
errors.

It works on names, numbers and tensors (`tensors.InferRequest`, numpy arrays), never on a wire
message; domain errors name the offending field as the gRPC request spells it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fibemrss.domain.errors import InvalidArgument, NotFound
from fibemrss.domain.feature_encoding import input_names
from services.inference.core import tensors
from services.inference.core.diagnosis import LoadedModel, infer
from services.inference.core.input_limits import EncodedLimits, element_fields
from services.inference.core.model_cache import ModelCache

SERVER_NAME = "fibemrss-inference"
SERVER_VERSION = "0.1.0"
PLATFORM = "fibemrss_numpy"


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[tensors.TensorSpec]
    outputs: list[tensors.TensorSpec]
    properties: dict[str, str]


class OpenInference:
    """The model name is the task name; versions are the published version numbers."""

    def __init__(self, cache: ModelCache) -> None:
        self._cache = cache
        self.model_name = cache.task.name
        self._input_names = input_names(cache.task)

    def _model(self, name: str, version: str, version_field: str) -> LoadedModel:
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model_name}")
        return self._cache.get(tensors.parse_version(version, version_field))

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        # Strict readiness (as Triton's default): ready only when the one model can serve.
        return self._cache.ready

    def model_ready(self, name: str, version: str) -> bool:
        if name != self.model_name:
            return False
        return self._cache.has(tensors.parse_version(version, "version"))

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION, extensions=())

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        model = self._model(name, version, "version")
        return ModelMetadata(
            name=self.model_name,
            versions=[str(v) for v in self._cache.versions()],
            platform=PLATFORM,
            inputs=[tensors.input_spec(model.input_dim)],
            outputs=tensors.output_specs(),
            properties={
                "model_version": str(model.version),
                "federated_round": str(model.federated_round),
                "model_kind": model.kind,
                "base_model_version": str(model.base_version),
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

    def model_infer(self, request: tensors.InferRequest) -> tensors.InferResponse:
        model = self._model(request.model_name, request.model_version, "model_version")
        wanted = tensors.requested_outputs(request.outputs)
        x = tensors.decode_features(request, model.input_dim)
        limits = model.limits or EncodedLimits.build(model.task, model.stats)
        problems = limits.problems(x, element_fields(bool(request.raw_input_contents)))
        if problems:
            raise InvalidArgument("input values outside what the model's features allow", problems)
        probability, logit = infer(model, x)
        values = {"probability": probability, "logit": logit}
        return tensors.InferResponse(
            model_name=self.model_name,
            model_version=str(model.version),
            id=request.id,
            # Which model answered (global or personalized), as response parameters (KServe v2).
            parameters={"model_kind": model.kind, "base_model_version": model.base_version},
            outputs=tuple(
                tensors.OutputTensor(name, tensors.DATATYPE, values[name].shape, values[name])
                for name in wanted
            ),
        )
