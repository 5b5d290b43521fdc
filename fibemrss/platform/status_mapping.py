"""The one place where domain errors become gRPC statuses (with google.rpc.BadRequest details)."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from fibemrss.domain import errors

log = logging.getLogger(__name__)

_CODES: list[tuple[type[errors.DomainError], int]] = [
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
]


def status_for(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status a client sees for `error`; unexpected errors become INTERNAL."""
    if isinstance(error, errors.DomainError):
        for kind, code in _CODES:
            if isinstance(error, kind):
                status = status_pb2.Status(code=code, message=str(error))
                if isinstance(error, errors.InvalidArgument) and error.violations:
                    detail = any_pb2.Any()
                    detail.Pack(
                        error_details_pb2.BadRequest(
                            field_violations=[
                                error_details_pb2.BadRequest.FieldViolation(
                                    field=v.field, description=v.description
                                )
                                for v in error.violations
                            ]
                        )
                    )
                    status.details.append(detail)
                return status
    # Never UNKNOWN and never the exception text: it may hold patient data.
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")


def abort_with(context: grpc.ServicerContext, error: BaseException) -> None:
    """Aborts the call with the status for `error` (raises, as context.abort does)."""
    context.abort_with_status(rpc_status.to_status(status_for(error)))


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """Client side: the (field, description) pairs of a BadRequest detail, if any."""
    # A failed call's RpcError is also a grpc.Call, which is what from_call reads; the stubs type
    # RpcError without Call's methods.
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    out: list[tuple[str, str]] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out
