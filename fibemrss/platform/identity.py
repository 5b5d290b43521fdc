"""Who is calling: the common name of the mutual-TLS client certificate, or the peer address."""

from __future__ import annotations

import grpc


def caller_identity(context: grpc.ServicerContext) -> str:
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    if names:
        return names[0].decode("utf-8", errors="replace")
    return f"unauthenticated:{context.peer()}"
