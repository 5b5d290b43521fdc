"""Open Inference Protocol tensors <-> numpy for the one FP32 input and the FP32 outputs (no gRPC).

Every check names the offending request field, so a client gets INVALID_ARGUMENT with one
field violation per problem rather than a generic error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.kserve.v2 import grpc_service_pb2 as kserve

INPUT_NAME = "features"
OUTPUT_NAMES = ("probability", "logit")
DATATYPE = "FP32"
# Bounds one request's memory well below the 64 MiB message limit.
MAX_BATCH = 65536

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


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable (the batch)


def input_spec(input_dim: int) -> TensorSpec:
    return TensorSpec(INPUT_NAME, DATATYPE, (-1, input_dim))


def output_specs() -> list[TensorSpec]:
    return [TensorSpec(name, DATATYPE, (-1, 1)) for name in OUTPUT_NAMES]


def parse_version(text: str, field: str) -> int:
    """'' -> 0 (the newest); '7' -> 7; anything else is a field violation."""
    if not text:
        return 0
    if not text.isdigit() or int(text) <= 0:
        raise InvalidArgument(
            "bad model version", [FieldProblem(field, "must be a published version number such as '3'")]
        )
    return int(text)


def decode_features(request: kserve.ModelInferRequest, input_dim: int) -> np.ndarray:
    """The request's one input as a float32 [batch, input_dim] array, or InvalidArgument."""
    if len(request.inputs) != 1:
        raise InvalidArgument(
            "wrong number of inputs",
            [FieldProblem("inputs", f"exactly one input tensor {INPUT_NAME!r} is expected")],
        )
    tensor = request.inputs[0]
    problems: list[FieldProblem] = []
    if tensor.name != INPUT_NAME:
        problems.append(FieldProblem("inputs[0].name", f"must be {INPUT_NAME!r}"))
    if tensor.datatype != DATATYPE:
        problems.append(FieldProblem("inputs[0].datatype", f"must be {DATATYPE}"))
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != input_dim or not 1 <= shape[0] <= MAX_BATCH:
        problems.append(
            FieldProblem("inputs[0].shape", f"must be [batch, {input_dim}] with 1 <= batch <= {MAX_BATCH}")
        )
    if problems:
        raise InvalidArgument("input tensor does not match the model", problems)
    count = shape[0] * shape[1]
    raw = request.raw_input_contents
    if raw:
        if tensor.HasField("contents"):
            problems.append(
                FieldProblem("inputs[0].contents", "must be unset when raw_input_contents is used")
            )
        if len(raw) != 1:
            problems.append(FieldProblem("raw_input_contents", "must hold one entry per input"))
        elif len(raw[0]) != 4 * count:
            problems.append(
                FieldProblem("raw_input_contents[0]", f"must hold {4 * count} bytes ({count} FP32 values)")
            )
        if problems:
            raise InvalidArgument("input tensor contents do not match its shape", problems)
        x = np.frombuffer(raw[0], dtype="<f4").reshape(shape[0], shape[1])
    else:
        contents = tensor.contents
        for name in _OTHER_CONTENTS:
            if len(getattr(contents, name)):
                problems.append(FieldProblem(f"inputs[0].contents.{name}", "FP32 data goes in fp32_contents"))
        if len(contents.fp32_contents) != count:
            problems.append(FieldProblem("inputs[0].contents.fp32_contents", f"must hold {count} values"))
        if problems:
            raise InvalidArgument("input tensor contents do not match its shape", problems)
        x = np.asarray(contents.fp32_contents, dtype=np.float32).reshape(shape[0], shape[1])
    if not np.isfinite(x).all():
        field = "raw_input_contents[0]" if raw else "inputs[0].contents.fp32_contents"
        raise InvalidArgument("non-finite input", [FieldProblem(field, "must hold finite numbers only")])
    return x


def requested_outputs(request: kserve.ModelInferRequest) -> list[str]:
    """The output names asked for, in request order; all of them when none is named."""
    if not request.outputs:
        return list(OUTPUT_NAMES)
    problems = [
        FieldProblem(f"outputs[{i}].name", f"must be one of {', '.join(OUTPUT_NAMES)}")
        for i, o in enumerate(request.outputs)
        if o.name not in OUTPUT_NAMES
    ]
    if problems:
        raise InvalidArgument("unknown output requested", problems)
    return [o.name for o in request.outputs]


def add_output(response: kserve.ModelInferResponse, name: str, values: np.ndarray) -> None:
    """Appends an FP32 output as raw bytes: tritonclient reads only raw_output_contents."""
    response.outputs.add(name=name, datatype=DATATYPE, shape=values.shape)
    response.raw_output_contents.append(values.astype("<f4", copy=False).tobytes())
