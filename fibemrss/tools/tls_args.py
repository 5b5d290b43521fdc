"""The mutual-TLS options every client command shares (--tls-ca, --tls-cert, --tls-key)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fibemrss.platform.config import TlsFiles


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "mutual TLS (needed against `fibemrss up`, `demo --serve` and real deployments)"
    )
    group.add_argument("--tls-ca", help="CA certificate (PEM), e.g. pki/ca.crt")
    group.add_argument("--tls-cert", help="client certificate, e.g. pki/operator@cleveland.crt")
    group.add_argument("--tls-key", help="client key, e.g. pki/operator@cleveland.key")
    group.add_argument(
        "--server-identity",
        help="the identity the server must present (default: the service called, at the client "
        "certificate's own site, e.g. gateway@cleveland; the aggregator is aggregator@central)",
    )


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("--tls-ca, --tls-cert and --tls-key go together")
    return TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)


def server_identity(args: argparse.Namespace, role: str) -> str | None:
    """The identity the server called must present, pinned by `open_channel(server=...)`.

    `--server-identity`, else `role` at the site of the client certificate (`operator@h` calls
    `gateway@h`), the aggregator being `aggregator@central`; None without TLS.
    """
    tls = tls_from_args(args)
    if tls is None:
        return None
    if getattr(args, "server_identity", None):
        return str(args.server_identity)
    if role == "aggregator":
        return "aggregator@central"
    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    site = str(names[0].value).partition("@")[2] if names else ""
    if not site:
        raise ValueError(f"{tls.cert} names no <role>@<site>: give --server-identity")
    return f"{role}@{site}"
