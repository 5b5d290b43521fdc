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
from services.inference.core.model_cache import StudyModels

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


@dataclass(frozen=True)
class ModelIndex:
    """One entry of the model repository index (Triton's repository extension)."""

    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str


class OpenInference:
    """Each study served is its own model, named by the study; versions are the published
    version numbers of that study's model."""

    def __init__(self, studies: StudyModels) -> None:
        self._studies = studies

    def _model(self, name: str, version: str, version_field: str) -> LoadedModel:
        return self._studies.cache(name).get(tensors.parse_version(version, version_field))

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        # Ready once a study's model can serve: a study approved since has no model for a while,
        # and must not take the others out of service (its own ModelReady says so).
        return self._studies.ready

    def model_ready(self, name: str, version: str) -> bool:
        if name not in self._studies.names():
            return False
        return self._studies.cache(name).has(tensors.parse_version(version, "version"))

    def repository_index(self, repository: str, ready_only: bool) -> list[ModelIndex]:
        """Every study served, with its newest servable version: how hospital software finds
        what this hospital serves (tritonclient's get_model_repository_index)."""
        if repository:
            raise NotFound(
                f"unknown model repository {repository[:80]!r}; this server has one (leave it empty)"
            )
        out = []
        for name in self._studies.names():
            try:
                cache = self._studies.cache(name)
            except NotFound:
                continue  # retired between the two reads
            versions = cache.versions()
            if cache.ready and versions:
                out.append(ModelIndex(name, str(versions[0]), "READY", ""))
            elif not ready_only:
                out.append(
                    ModelIndex(name, "", "UNAVAILABLE", "no model version of this study is published yet")
                )
        return out

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION, extensions=())

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        model = self._model(name, version, "version")
        return ModelMetadata(
            name=model.task.name,
            versions=[str(v) for v in self._studies.cache(name).versions()],
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
                "input_columns": json.dumps(input_names(model.task)),
                "study": model.task.name,
                "study_description": model.task.description,
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
            model_name=model.task.name,
            model_version=str(model.version),
            id=request.id,
            # Which model answered (global or personalized), as response parameters (KServe v2).
            parameters={"model_kind": model.kind, "base_model_version": model.base_version},
            outputs=tuple(
                tensors.OutputTensor(name, tensors.DATATYPE, values[name].shape, values[name])
                for name in wanted
            ),
        )
