"""Who is calling: the common name of the mutual-TLS client certificate, or the peer address.

Who is answering: every certificate also names its own identity as a DNS name
(`identity_dns_name`, "aggregator@central" -> "aggregator.central.fibemrss"), which clients
pin as the server name they verify (fibemrss/platform/channels.py), so a certificate of one
service cannot pose as another.
"""

from __future__ import annotations

import re

import grpc

IDENTITY_DOMAIN = "fibemrss"
# A role and a site are DNS labels: they are spelled into the certificate's DNS name.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def caller_identity(context: grpc.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name")
    first = names[0] if names else None
    if isinstance(first, bytes):
        return first.decode("utf-8", errors="replace")
    return f"unauthenticated:{context.peer()}"


def is_dns_label(name: str) -> bool:
    return _LABEL.fullmatch(name) is not None


def identity_dns_name(identity: str) -> str:
    """The DNS name a certificate of `identity` ("<role>@<site>") carries and a client pins."""
    role, at, site = identity.partition("@")
    if not at or not is_dns_label(role) or not is_dns_label(site):
        raise ValueError(
            f"identity {identity!r} is not <role>@<site> with role and site DNS labels "
            "(lowercase letters, digits and inner hyphens, at most 63)"
        )
    return f"{role}.{site}.{IDENTITY_DOMAIN}"
