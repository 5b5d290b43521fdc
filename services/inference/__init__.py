"""A hospital's inference service. What the tools may use of it (the benchmark that times a
Diagnose call in process, through the servicer the service runs) is named here, the service's
public surface; the rest of its edges and adapters are its own (contract "Tools use a service's
core or its public surface, never its edges or adapters")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.inference.edges.diagnosis_grpc import DiagnosisServicer

__all__ = ["DiagnosisServicer"]


def __getattr__(name: str) -> Any:
    # Imported when asked for: importing the core alone does not pull in gRPC.
    if name == "DiagnosisServicer":
        from services.inference.edges.diagnosis_grpc import DiagnosisServicer

        return DiagnosisServicer
    raise AttributeError(name)
