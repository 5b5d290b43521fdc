"""`fibemrss certs init`: the mutual-TLS PKI, a CA and one certificate per `<role>@<site>`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fibemrss.platform.authorization import check_hospital_name
from fibemrss.tools.certs import init_pki


def add_parser(subparsers: Any) -> None:
    certs = subparsers.add_parser("certs", help="mutual-TLS PKI").add_subparsers(
        dest="certs_command", required=True
    )
    init = certs.add_parser("init", help="a CA and one certificate per <role>@<site> identity")
    init.add_argument("--out", required=True)
    init.add_argument("--hospitals", required=True, help="comma-separated hospital names")
    init.add_argument(
        "--hostnames",
        help="IDENTITY=NAME pairs, comma-separated: a Service name for that identity's certificate "
        "alone (each certificate names only its own service)",
    )
    init.set_defaults(func=run_init)


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
