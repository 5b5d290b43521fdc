"""`fibemrss certs`: the mutual-TLS PKI, a CA and one certificate per `<role>@<site>`.

For a real federation each site runs `certs request` (its key never leaves it) and the CA's
operator `certs ca-init` once and `certs sign` per request; `certs init` runs that same ceremony
for every identity in one process (the demo, tests, test clusters). `certs revoke` withdraws a
certificate (a stolen key, a site that left) through the CA's signed revocation list, `crl.pem`
beside the CA, which services given FIBEMRSS_TLS_CRL enforce; `certs crl` re-issues that list.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from fibemrss.he.site_certificates import RevocationList, public_key_sha256
from fibemrss.platform.authorization import check_hospital_name
from fibemrss.tools.certs import (
    REVOCATION_REASONS,
    create_ca,
    init_pki,
    revoke,
    sign_request_file,
    write_request,
)


def add_parser(subparsers: Any) -> None:
    certs = subparsers.add_parser("certs", help="mutual-TLS PKI").add_subparsers(
        dest="certs_command", required=True
    )
    init = certs.add_parser(
        "init", help="a CA and one certificate per <role>@<site> identity, all in one process"
    )
    init.add_argument("--out", required=True)
    init.add_argument("--hospitals", required=True, help="comma-separated hospital names")
    init.add_argument(
        "--hostnames",
        help="IDENTITY=NAME pairs, comma-separated: a Service name for that identity's certificate "
        "alone (each certificate names only its own service)",
    )
    init.set_defaults(func=run_init)

    ca_init = certs.add_parser("ca-init", help="the federation CA alone: ca.crt and ca.key (0600)")
    ca_init.add_argument("--out", required=True, help="the CA's folder")
    ca_init.add_argument("--force", action="store_true", help="replace an existing CA")
    ca_init.set_defaults(func=run_ca_init)

    request = certs.add_parser(
        "request", help="at the site: a private key (0600, stays) and a signing request for the CA"
    )
    request.add_argument("--identity", required=True, help="<role>@<site>, e.g. agent@cleveland")
    request.add_argument("--out", required=True, help="writes <identity>.key and <identity>.csr here")
    request.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="a DNS name peers dial for this service (serving roles only; repeat for several)",
    )
    request.add_argument("--force", action="store_true", help="replace an existing key")
    request.set_defaults(func=run_request)

    sign = certs.add_parser(
        "sign", help="at the CA: sign a request, with the extensions the identity it names gets"
    )
    sign.add_argument("--ca-dir", required=True, help="the folder of ca.crt and ca.key")
    sign.add_argument("--csr", required=True)
    sign.add_argument("--out", required=True, help="the certificate (PEM) to send back to the site")
    sign.set_defaults(func=run_sign)

    withdraw = certs.add_parser(
        "revoke",
        help="at the CA: revoke certificates (a stolen key, a site that left); writes crl.pem beside the CA",
    )
    withdraw.add_argument("--ca-dir", required=True, help="the folder of ca.crt and ca.key")
    withdraw.add_argument("--cert", action="append", required=True, help="a certificate (PEM) to revoke; repeat")
    withdraw.add_argument("--reason", default="key-compromise", choices=sorted(REVOCATION_REASONS))
    withdraw.set_defaults(func=run_revoke)

    crl = certs.add_parser("crl", help="at the CA: (re-)issue crl.pem, the revocation list, with a fresh validity")
    crl.add_argument("--ca-dir", required=True, help="the folder of ca.crt and ca.key")
    crl.set_defaults(func=lambda args: _print_crl(Path(args.ca_dir), revoke(Path(args.ca_dir)), []))


def parse_hostnames(text: str | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in (text or "").split(","):
        if not item:
            continue
        identity, eq, name = item.partition("=")
        if not eq or not identity or not name:
            raise ValueError(f"--hostnames: {item!r} is not IDENTITY=NAME (say which certificate names it)")
        out.setdefault(identity, []).append(name)
    return out


def run_init(args: argparse.Namespace) -> int:
    identities = ["aggregator@central", "operator@central"]
    for h in args.hospitals.split(","):
        check_hospital_name(h)
        identities += [
            f"{role}@{h}" for role in ("gateway", "agent", "inference", "operator", "ehr", "ingest")
        ]
    paths = init_pki(Path(args.out), identities, parse_hostnames(args.hostnames))
    print(
        json.dumps(
            {
                "ca": str(Path(args.out) / "ca.crt"),
                "certs": {i: {"cert": str(p.cert), "key": str(p.key)} for i, p in paths.items()},
            },
            indent=2,
        )
    )
    return 0


def run_ca_init(args: argparse.Namespace) -> int:
    paths = create_ca(Path(args.out), overwrite=args.force)
    print(json.dumps({"ca": str(paths.cert), "ca_key": str(paths.key)}))
    return 0


def run_request(args: argparse.Namespace) -> int:
    paths = write_request(Path(args.out), args.identity, args.hostname, overwrite=args.force)
    csr = x509.load_pem_x509_csr(paths.csr.read_bytes())
    print(
        json.dumps(
            {
                "identity": args.identity,
                "key": str(paths.key),
                "csr": str(paths.csr),
                # Tell it to the CA and the HE key holder by a second channel; they check it.
                "public_key_sha256": public_key_sha256(csr.public_key()).hex(),
            }
        )
    )
    return 0


def run_sign(args: argparse.Namespace) -> int:
    certificate = sign_request_file(Path(args.ca_dir), Path(args.csr), Path(args.out))
    (common_name,) = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    print(
        json.dumps(
            {
                "identity": common_name.value,
                "cert": args.out,
                "dns_names": names.get_values_for_type(x509.DNSName),
                "public_key_sha256": public_key_sha256(certificate.public_key()).hex(),
                "not_valid_after": certificate.not_valid_after_utc.isoformat(),
            }
        )
    )
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    ca_dir = Path(args.ca_dir)
    pems = [Path(path).read_bytes() for path in args.cert]
    path = revoke(ca_dir, pems, args.reason)
    named = [x509.load_pem_x509_certificate(pem) for pem in pems]
    return _print_crl(ca_dir, path, [(c.subject.rfc4514_string(), c.serial_number) for c in named])


def _print_crl(ca_dir: Path, path: Path, revoked_now: list[tuple[str, int]]) -> int:
    listed = RevocationList.from_pem(path.read_bytes(), (ca_dir / "ca.crt").read_bytes())
    print(
        json.dumps(
            {
                "crl": str(path),
                "crl_number": listed.number,
                "revoked": [{"subject": subject, "serial": f"{serial:x}"} for subject, serial in revoked_now],
                "listed": len(listed.revoked),
                "next_update": listed.next_update.isoformat() if listed.next_update else None,
                # Copy it to every service's FIBEMRSS_TLS_CRL file: each re-reads it within a second.
            }
        )
    )
    return 0
