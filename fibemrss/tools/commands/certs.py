"""`fibemrss certs init`: the mutual-TLS PKI, a CA and one certificate per `<role>@<site>`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fibemrss.tools.certs import init_pki


def add_parser(subparsers: Any) -> None:
    certs = subparsers.add_parser("certs", help="mutual-TLS PKI").add_subparsers(
        dest="certs_command", required=True
    )
    init = certs.add_parser("init", help="a CA and one certificate per <role>@<site> identity")
    init.add_argument("--out", required=True)
    init.add_argument("--hospitals", required=True, help="comma-separated hospital names")
    init.add_argument("--hostnames", help="extra DNS names for the certificates (Service names)")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    identities = ["aggregator@central", "operator@central"]
    for h in args.hospitals.split(","):
        identities += [f"{role}@{h}" for role in ("gateway", "agent", "inference", "operator", "ehr")]
    paths = init_pki(Path(args.out), identities, args.hostnames.split(",") if args.hostnames else None)
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
