"""Reads a patient's normalized record from the hospital's own gateway, for Diagnose by key."""

from __future__ import annotations

import grpc

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.domain.errors import NotFound, PermissionDenied, Unavailable
from fibemrss.domain.records import PatientRecord
from fibemrss.platform.channels import ServerIdentityMismatch
from fibemrss.serde.records import record_from_proto

PURPOSE = "diagnosis reference"


class PatientDirectory:
    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = emr_pb2_grpc.EmrGatewayServiceStub(channel)

    def fetch(self, patient_key: str, on_behalf_of: str) -> PatientRecord:
        """The record, read for `on_behalf_of` (the caller's identity), which the gateway audits."""
        try:
            response = self._stub.GetPatient(
                emr_pb2.GetPatientRequest(
                    patient_key=patient_key, purpose=PURPOSE, on_behalf_of=on_behalf_of
                ),
                timeout=10,
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"the gateway has no patient {patient_key}") from None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise PermissionDenied("the gateway refused this service's identity") from None
            if isinstance(exc, ServerIdentityMismatch):
                raise Unavailable(exc.details()) from None
            raise Unavailable(f"the hospital gateway did not answer ({code.name})") from None
        return record_from_proto(response.record)
