"""A hospital's agent. What the tools may use of it (benchmarks that play agents in process) is
named here, the service's public surface; the rest of its edges and adapters are its own
(contract "Tools use a service's core or its public surface, never its edges or adapters")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.hospital_agent.adapters.grpc_adapters import GrpcAggregator

__all__ = ["GrpcAggregator"]


def __getattr__(name: str) -> Any:
    # Imported when asked for: importing the core alone does not pull in gRPC.
    if name == "GrpcAggregator":
        from services.hospital_agent.adapters.grpc_adapters import GrpcAggregator

        return GrpcAggregator
    raise AttributeError(name)
