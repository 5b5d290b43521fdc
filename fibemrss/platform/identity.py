"""Who is calling: the common name of the mutual-TLS client certificate, or the peer address."""

from __future__ import annotations

import grpc


def caller_identity(context: grpc.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name")
    first = names[0] if names else None
    if isinstance(first, bytes):
        return first.decode("utf-8", errors="replace")
    return f"unauthenticated:{context.peer()}"
