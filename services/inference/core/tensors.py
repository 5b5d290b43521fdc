"""Open Inference Protocol tensors as plain values, and the checks on the one FP32 input (no wire types).

A transport turns its message into an `InferRequest` (the gRPC edge from protobuf, the REST edge
from JSON and the binary data extension) and an `InferResponse` back into its own. Every check
names the offending field as the gRPC request spells it (the REST edge renames them), so a client
gets INVALID_ARGUMENT with one field violation per problem rather than a generic error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.errors import FieldProblem, InvalidArgument

INPUT_NAME = "features"
OUTPUT_NAMES = ("probability", "logit")
DATATYPE = "FP32"
# Bounds one request's memory well below the 64 MiB message limit.
MAX_BATCH = 65536


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable (the batch)


@dataclass(frozen=True)
class InputTensor:
    """One input tensor as received: its typed FP32 values unless the request sends raw bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    fp32: Sequence[float] | np.ndarray = ()
    has_contents: bool = False  # typed contents were sent (they must not be, beside raw bytes)
    # The protocol's other typed-contents fields (`int64_contents`, ...) that hold data.
    other_contents: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: tuple[InputTensor, ...] = ()
    raw_input_contents: tuple[bytes, ...] = ()  # little-endian FP32, one entry per input
    outputs: tuple[str, ...] = ()  # the output names asked for; none: all of them


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # float32

    def raw(self) -> bytes:
        """Little-endian FP32 bytes: tritonclient reads only raw output contents."""
        return self.data.astype("<f4", copy=False).tobytes()


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, str | int]
    outputs: tuple[OutputTensor, ...]


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


def decode_features(request: InferRequest, input_dim: int) -> np.ndarray:
    """The request's one input as a float32 [batch, input_dim] array, or InvalidArgument (its
    structure only: what the values may hold is `input_limits.EncodedLimits`, under the model's
    statistics)."""
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
        if tensor.has_contents:
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
        for name in tensor.other_contents:
            problems.append(FieldProblem(f"inputs[0].contents.{name}", "FP32 data goes in fp32_contents"))
        if len(tensor.fp32) != count:
            problems.append(FieldProblem("inputs[0].contents.fp32_contents", f"must hold {count} values"))
        if problems:
            raise InvalidArgument("input tensor contents do not match its shape", problems)
        with np.errstate(over="ignore"):  # a number beyond FP32 becomes inf, refused just below
            x = np.asarray(tensor.fp32, dtype=np.float32).reshape(shape[0], shape[1])
    return x  # its values are checked by input_limits.EncodedLimits (finite, within the features)


def requested_outputs(names: Sequence[str]) -> list[str]:
    """The output names asked for, in request order; all of them when none is named."""
    if not names:
        return list(OUTPUT_NAMES)
    problems = [
        FieldProblem(f"outputs[{i}].name", f"must be one of {', '.join(OUTPUT_NAMES)}")
        for i, name in enumerate(names)
        if name not in OUTPUT_NAMES
    ]
    if problems:
        raise InvalidArgument("unknown output requested", problems)
    return list(names)
