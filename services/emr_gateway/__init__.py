"""A hospital's EMR gateway. What the tools may use of it (benchmarks that ingest in process with
the service's own store) is named here, the service's public surface; the rest of its edges and
adapters are its own (contract "Tools use a service's core or its public surface, never its edges
or adapters")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.emr_gateway.adapters.store import GatewayStore

__all__ = ["GatewayStore"]


def __getattr__(name: str) -> Any:
    # Imported when asked for: importing the core alone does not pull in the database driver.
    if name == "GatewayStore":
        from services.emr_gateway.adapters.store import GatewayStore

        return GatewayStore
    raise AttributeError(name)
