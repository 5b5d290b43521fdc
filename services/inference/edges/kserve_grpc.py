"""`inference.GRPCInferenceService` (KServe v2 over gRPC): protobuf <-> the core's plain tensors.

The REST edge calls the same `OpenInference` methods, so both transports answer alike.
"""

from __future__ import annotations

import grpc
import numpy as np

from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from services.inference.core import tensors
from services.inference.core.open_inference import OpenInference

# The typed-contents fields other than fp32_contents: data there means a datatype mismatch.
_OTHER_CONTENTS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp64_contents",
    "bytes_contents",
)


def _input_from_proto(t: kserve.ModelInferRequest.InferInputTensor) -> tensors.InputTensor:
    if not t.HasField("contents"):
        # Raw bytes (what tritonclient sends): no typed contents to convert or to scan.
        return tensors.InputTensor(t.name, t.datatype, tuple(t.shape))
    contents = t.contents
    return tensors.InputTensor(
        name=t.name,
        datatype=t.datatype,
        shape=tuple(t.shape),
        fp32=np.asarray(contents.fp32_contents, dtype=np.float32),
        has_contents=True,
        other_contents=tuple(name for name in _OTHER_CONTENTS if len(getattr(contents, name))),
    )


def infer_request_from_proto(request: kserve.ModelInferRequest) -> tensors.InferRequest:
    return tensors.InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=tuple(_input_from_proto(t) for t in request.inputs),
        raw_input_contents=tuple(request.raw_input_contents),
        outputs=tuple(o.name for o in request.outputs),
    )


def infer_response_to_proto(answer: tensors.InferResponse) -> kserve.ModelInferResponse:
    response = kserve.ModelInferResponse(
        model_name=answer.model_name, model_version=answer.model_version, id=answer.id
    )
    for key, value in answer.parameters.items():
        if isinstance(value, str):
            response.parameters[key].string_param = value
        else:
            response.parameters[key].int64_param = value
    for output in answer.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(output.raw())
    return response


def _tensor_metadata(spec: tensors.TensorSpec) -> kserve.ModelMetadataResponse.TensorMetadata:
    return kserve.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape
    )


class KServeServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over `OpenInference`, which the REST edge calls too."""

    def __init__(self, core: OpenInference) -> None:
        self._core = core

    def ServerLive(
        self, request: kserve.ServerLiveRequest, context: grpc.ServicerContext
    ) -> kserve.ServerLiveResponse:
        return kserve.ServerLiveResponse(live=self._core.server_live())

    def ServerReady(
        self, request: kserve.ServerReadyRequest, context: grpc.ServicerContext
    ) -> kserve.ServerReadyResponse:
        return kserve.ServerReadyResponse(ready=self._core.server_ready())

    def ModelReady(
        self, request: kserve.ModelReadyRequest, context: grpc.ServicerContext
    ) -> kserve.ModelReadyResponse:
        return kserve.ModelReadyResponse(ready=self._core.model_ready(request.name, request.version))

    def ServerMetadata(
        self, request: kserve.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> kserve.ServerMetadataResponse:
        meta = self._core.server_metadata()
        return kserve.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=list(meta.extensions)
        )

    def ModelMetadata(
        self, request: kserve.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> kserve.ModelMetadataResponse:
        meta = self._core.model_metadata(request.name, request.version)
        return kserve.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[_tensor_metadata(t) for t in meta.inputs],
            outputs=[_tensor_metadata(t) for t in meta.outputs],
            properties=meta.properties,
        )

    def ModelInfer(
        self, request: kserve.ModelInferRequest, context: grpc.ServicerContext
    ) -> kserve.ModelInferResponse:
        return infer_response_to_proto(self._core.model_infer(infer_request_from_proto(request)))

    def RepositoryIndex(
        self, request: kserve.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> kserve.RepositoryIndexResponse:
        return kserve.RepositoryIndexResponse(
            models=[
                kserve.RepositoryIndexResponse.ModelIndex(
                    name=m.name, version=m.version, state=m.state, reason=m.reason
                )
                for m in self._core.repository_index(request.repository_name, request.ready)
            ]
        )
