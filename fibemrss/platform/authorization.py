"""Who may call what, decided from the mutual-TLS identity "<role>@<site>" of the caller.

Hospital services answer only identities of their own hospital; the aggregator lets only the
federation operator start federations and checks per request that an agent acts for its own
hospital (services/aggregator/servicer.py).
"""

from __future__ import annotations

from collections.abc import Callable

from fibemrss.domain.errors import PermissionDenied, Unauthenticated

Authorize = Callable[[str, str], None]  # (caller identity, full method name) -> raises if refused

# Probes and tooling may use these on any authenticated connection.
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Methods that only some roles of the hospital may call (DESIGN.md's table). The MLLP and FHIR
# REST edges ask with these same names, so every transport follows one rule.
INGEST_METHOD = "/fibemrss.emr.v1.EmrGatewayService/Ingest"
_ROLES: dict[str, tuple[str, ...]] = {INGEST_METHOD: ("operator",)}


def _site(identity: str) -> str:
    if identity.startswith("unauthenticated:") or "@" not in identity:
        raise Unauthenticated("a client certificate naming <role>@<site> is required")
    return identity.rpartition("@")[2]


def hospital_policy(hospital: str) -> Authorize:
    def authorize(identity: str, method: str) -> None:
        if method.startswith(_OPEN_SERVICES):
            return
        if _site(identity) != hospital:
            raise PermissionDenied(
                f"{identity} may not call {method.rsplit('/', 1)[-1]} at hospital {hospital}"
            )
        roles = _ROLES.get(method)
        if roles is not None and identity.partition("@")[0] not in roles:
            allowed = " or ".join(f"{r}@{hospital}" for r in roles)
            raise PermissionDenied(f"only {allowed} may call {method.rsplit('/', 1)[-1]}, not {identity}")

    return authorize


def central_policy() -> Authorize:
    def authorize(identity: str, method: str) -> None:
        if method.startswith(_OPEN_SERVICES):
            return
        _site(identity)
        if method.endswith("/StartFederation") and identity != "operator@central":
            raise PermissionDenied(f"only operator@central may start a federation, not {identity}")

    return authorize
