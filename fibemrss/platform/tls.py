"""Mutual TLS for the non-gRPC edges (MLLP, HTTPS): the same CA, certificates and identities as gRPC.

A caller's identity is the common name of its verified client certificate, "<role>@<site>",
exactly as `identity.caller_identity` reads it from a gRPC call.
"""

from __future__ import annotations

import ssl
from typing import Any

from fibemrss.platform.config import TlsFiles


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """Presents the service's certificate and requires a client certificate signed by the CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """For our own clients (benchmarks, tools) of the MLLP and HTTPS edges."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def common_name(peer_certificate: dict[str, Any] | None) -> str | None:
    """The subject's commonName of a certificate as `SSLSocket.getpeercert()` returns it."""
    if not peer_certificate:
        return None
    for rdn in peer_certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, peer: object) -> str:
    """ "<role>@<site>" of a verified client certificate, or "unauthenticated:<peer>"."""
    name = common_name(ssl_object.getpeercert()) if ssl_object is not None else None
    return name if name else f"unauthenticated:{peer}"
