"""KServe v2 (Open Inference Protocol) over REST: a Starlette adapter over `OpenInference`.

JSON tensors and the binary tensor data extension (the `Inference-Header-Content-Length` header;
tritonclient sends and asks for binary data by default) are read straight into the core's
`tensors.InferRequest` and written from its `InferResponse`, the values the gRPC edge passes too
(no protobuf on this path), so both transports answer alike. Errors are `{"error": "..."}` with 400 (bad request), 403, 404 or 503 as the protocol says;
field names are those of the REST body (`inputs[0].data`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.platform.http_server import Handler, guarded, json_error
from services.inference.core import tensors
from services.inference.core.open_inference import OpenInference

log = logging.getLogger(__name__)

Authorize = Callable[[str, str], None]
HEADER_LENGTH = "inference-header-content-length"
MAX_BODY_BYTES = 64 * 1024 * 1024
# The gRPC methods whose authorization rules the REST routes follow.
_METHOD = "/inference.GRPCInferenceService/"
# gRPC field paths as the REST body spells them.
_REST_FIELDS = [
    (re.compile(r"^inputs\[(\d+)\]\.contents(?:\.\w+)?(\[\d+\])?$"), r"inputs[\1].data\2"),
    (re.compile(r"^raw_input_contents\[(\d+)\]$"), r"inputs[\1].data (binary)"),
    (re.compile(r"^raw_input_contents$"), "inputs[].parameters.binary_data_size"),
    (re.compile(r"^model_version$"), "path: versions/{version}"),
]


def rest_field(field: str) -> str:
    for pattern, replacement in _REST_FIELDS:
        if pattern.match(field):
            return pattern.sub(replacement, field)
    return field


def error_response(exc: BaseException) -> JSONResponse:
    return json_error(exc, "kserve rest", rest_field)


class KServeRest:
    def __init__(self, core: OpenInference, authorize: Authorize | None) -> None:
        self._core = core
        self._authorize = authorize

    def routes(self) -> list[Route]:
        h = self._handler
        return [
            Route("/v2/health/live", h("ServerLive", self._live)),
            Route("/v2/health/ready", h("ServerReady", self._ready)),
            Route("/v2", h("ServerMetadata", self._server_metadata)),
            # Triton's repository extension: the index of the models (one per study) served.
            Route("/v2/repository/index", h("RepositoryIndex", self._repository_index), methods=["POST"]),
            Route("/v2/models/{name}", h("ModelMetadata", self._model_metadata)),
            Route("/v2/models/{name}/versions/{version}", h("ModelMetadata", self._model_metadata)),
            Route("/v2/models/{name}/ready", h("ModelReady", self._model_ready)),
            Route("/v2/models/{name}/versions/{version}/ready", h("ModelReady", self._model_ready)),
            Route("/v2/models/{name}/infer", h("ModelInfer", self._infer), methods=["POST"]),
            Route(
                "/v2/models/{name}/versions/{version}/infer", h("ModelInfer", self._infer), methods=["POST"]
            ),
        ]

    def _handler(self, method: str, handle: Handler) -> Handler:
        return guarded(self._authorize, _METHOD + method, handle, lambda exc, _request: error_response(exc))

    async def _live(self, request: Request) -> Response:
        live = self._core.server_live()
        return JSONResponse({"live": live}, status_code=200 if live else 400)

    async def _ready(self, request: Request) -> Response:
        ready = self._core.server_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    async def _server_metadata(self, request: Request) -> Response:
        meta = self._core.server_metadata()
        return JSONResponse({"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)})

    async def _repository_index(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > 65536:
            raise InvalidArgument("request too large", [FieldProblem("body", "over 65536 bytes")])
        ready = False
        if body.strip():
            doc, _ = _json_body(body, None)
            value = doc.get("ready", False)
            if not isinstance(value, bool):
                raise InvalidArgument("bad ready", [FieldProblem("ready", "must be true or false")])
            ready = value
        index = await run_in_threadpool(self._core.repository_index, "", ready)
        return JSONResponse(
            [
                {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                if m.reason
                else {"name": m.name, "version": m.version, "state": m.state}
                for m in index
            ]
        )

    async def _model_metadata(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version", "")
        meta = await run_in_threadpool(self._core.model_metadata, name, version)
        return JSONResponse(
            {
                "name": meta.name,
                "versions": list(meta.versions),
                "platform": meta.platform,
                "inputs": [_tensor_metadata(t) for t in meta.inputs],
                "outputs": [_tensor_metadata(t) for t in meta.outputs],
                "properties": dict(meta.properties),
            }
        )

    async def _model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version", "")
        ready = await run_in_threadpool(self._core.model_ready, name, version)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)

    async def _infer(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise InvalidArgument("request too large", [FieldProblem("body", f"over {MAX_BODY_BYTES} bytes")])
        infer_request, binary_outputs, all_binary = infer_request_from_rest(
            body,
            request.headers.get(HEADER_LENGTH),
            request.path_params["name"],
            request.path_params.get("version", ""),
        )
        answer = await run_in_threadpool(self._core.model_infer, infer_request)
        return infer_response_to_rest(answer, binary_outputs, all_binary)


def _tensor_metadata(t: tensors.TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def _json_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of a request and the binary tensor data after it."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgument(
                "bad binary request",
                [
                    FieldProblem(
                        "Inference-Header-Content-Length", "must be the JSON header's length in bytes"
                    )
                ],
            )
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise InvalidArgument("body is not JSON", [FieldProblem("body", "must be a JSON object")]) from None
    if not isinstance(doc, dict):
        raise InvalidArgument("body is not a JSON object", [FieldProblem("body", "must be a JSON object")])
    return doc, binary


def _flat_numbers(data: Any, field: str) -> list[float]:
    """A (nested) list of JSON numbers, flattened row-major without recursion (any nesting a JSON
    parser accepted)."""
    bad = InvalidArgument("bad tensor data", [FieldProblem(field, "must be a (nested) list of numbers")])
    if not isinstance(data, list):
        raise bad
    out: list[float] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise bad
            out.append(_to_float(v))
        else:
            stack.pop()
    return out


def _to_float(v: float) -> float:
    """A JSON number as a double; an integer too large for one (JSON allows any) becomes an
    infinity, which the core refuses naming the element like any other non-finite value."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def infer_request_from_rest(
    body: bytes, header_length: str | None, name: str, version: str
) -> tuple[tensors.InferRequest, set[str], bool]:
    """(the request, the outputs asked for as binary data, whether every output is binary)."""
    doc, binary = _json_body(body, header_length)
    problems: list[FieldProblem] = []
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("inputs are required", [FieldProblem("inputs", "must be a non-empty list")])
    tensors_in: list[tensors.InputTensor] = []
    raw_contents: list[bytes] = []
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            problems.append(FieldProblem(f"inputs[{i}]", "must be an object"))
            continue
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            problems.append(FieldProblem(f"inputs[{i}].shape", "must be a list of non-negative integers"))
            shape = []
        tensor_name, datatype = str(item.get("name", "")), str(item.get("datatype", ""))
        fp32: list[float] = []
        has_contents = False
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            problems.append(FieldProblem(f"inputs[{i}].parameters", "must be an object"))
            parameters = {}
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                problems.append(
                    FieldProblem(
                        f"inputs[{i}].parameters.binary_data_size", "does not match the binary data sent"
                    )
                )
            else:
                raw_contents.append(binary[offset : offset + size])
                offset += size
        elif "data" in item:
            if datatype == tensors.DATATYPE:
                try:
                    fp32 = _flat_numbers(item["data"], f"inputs[{i}].data")
                    has_contents = True
                except InvalidArgument as exc:
                    problems.extend(exc.violations)
        else:
            problems.append(FieldProblem(f"inputs[{i}].data", "is required (or binary_data_size)"))
        tensors_in.append(tensors.InputTensor(tensor_name, datatype, tuple(shape), fp32, has_contents))
    if raw_contents and len(raw_contents) != len(tensors_in):
        problems.append(FieldProblem("inputs", "either every input or none uses the binary data extension"))
    if offset != len(binary):
        problems.append(FieldProblem("body", "binary data beyond what the inputs' binary_data_size name"))
    outputs: list[str] = []
    binary_outputs: set[str] = set()
    request_parameters = doc.get("parameters") or {}
    all_binary = bool(isinstance(request_parameters, dict) and request_parameters.get("binary_data_output"))
    requested = doc.get("outputs") or []
    if not isinstance(requested, list):
        problems.append(FieldProblem("outputs", "must be a list"))
        requested = []
    for j, out in enumerate(requested):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            problems.append(FieldProblem(f"outputs[{j}].name", "is required"))
            continue
        outputs.append(out["name"])
        out_parameters = out.get("parameters") or {}
        if not isinstance(out_parameters, dict):
            problems.append(FieldProblem(f"outputs[{j}].parameters", "must be an object"))
        elif out_parameters.get("binary_data"):
            binary_outputs.add(out["name"])
    if problems:
        raise InvalidArgument("invalid inference request", problems)
    request = tensors.InferRequest(
        model_name=name,
        model_version=version,
        id=str(doc.get("id", "")),
        inputs=tuple(tensors_in),
        raw_input_contents=tuple(raw_contents),
        outputs=tuple(outputs),
    )
    return request, binary_outputs, all_binary


def infer_response_to_rest(
    answer: tensors.InferResponse, binary_outputs: set[str], all_binary: bool
) -> Response:
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in answer.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if all_binary or tensor.name in binary_outputs:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor.data.astype("<f4", copy=False).astype(float).ravel().tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": answer.model_name,
        "model_version": answer.model_version,
        "outputs": outputs,
    }
    if answer.parameters:
        doc["parameters"] = dict(sorted(answer.parameters.items()))
    if answer.id:
        doc["id"] = answer.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
