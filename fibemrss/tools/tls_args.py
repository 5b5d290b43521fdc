"""The mutual-TLS options every client command shares (--tls-ca, --tls-cert, --tls-key)."""

from __future__ import annotations

import argparse

from fibemrss.platform.config import TlsFiles


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "mutual TLS (needed against `fibemrss up`, `demo --serve` and real deployments)"
    )
    group.add_argument("--tls-ca", help="CA certificate (PEM), e.g. pki/ca.crt")
    group.add_argument("--tls-cert", help="client certificate, e.g. pki/operator@cleveland.crt")
    group.add_argument("--tls-key", help="client key, e.g. pki/operator@cleveland.key")


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("--tls-ca, --tls-cert and --tls-key go together")
    return TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
