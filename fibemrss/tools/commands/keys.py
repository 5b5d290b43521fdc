"""`fibemrss keys`: the HE key ceremony at the holder hospital, and the secret key's delivery
to every other hospital sealed to that hospital's own agent key (`fibemrss.he.key_delivery`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fibemrss.he.key_delivery import SealedKey, open_hospital_key, seal_hospital_key
from fibemrss.he.keys import write_key_files, write_private_file
from fibemrss.he.site_certificates import Revoked
from fibemrss.platform.revocation import Revocations


def add_parser(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="HE key ceremony").add_subparsers(
        dest="keys_command", required=True
    )
    init = keys.add_parser("init", help="write hospital.he (secret) and aggregator.he (public only)")
    init.add_argument("--out", required=True)
    init.add_argument("--force", action="store_true", help="overwrite existing key files")
    init.set_defaults(func=run_init)

    seal = keys.add_parser(
        "seal", help="at the holder: seal hospital.he to another hospital's agent certificate"
    )
    seal.add_argument("--key", required=True, help="hospital.he, made here by `keys init`")
    seal.add_argument(
        "--for", dest="recipient", required=True, help="the recipient's agent@<site> certificate"
    )
    seal.add_argument(
        "--ca", required=True, help="the federation CA (ca.crt): the recipient's must be from it"
    )
    seal.add_argument("--signer-cert", required=True, help="this hospital's agent certificate")
    seal.add_argument("--signer-key", required=True, help="this hospital's agent private key")
    seal.add_argument("--study", required=True, help="the study (federation) the key is for")
    seal.add_argument(
        "--out", required=True, help="the sealed file (not secret: only the recipient opens it)"
    )
    seal.add_argument("--crl", help="the federation CA's revocation list (crl.pem): a revoked recipient is refused")
    seal.set_defaults(func=run_seal)

    open_ = keys.add_parser("open", help="at a recipient: open a sealed HE key into hospital.he (0600)")
    open_.add_argument("--sealed", required=True)
    open_.add_argument("--ca", required=True, help="the federation CA (ca.crt)")
    open_.add_argument("--cert", required=True, help="this hospital's agent certificate")
    open_.add_argument("--key", required=True, help="this hospital's agent private key")
    open_.add_argument("--study", required=True, help="the study (federation) the key is for")
    open_.add_argument("--holder", required=True, help="the hospital that made the key (the study names it)")
    open_.add_argument("--out", required=True, help="where to write hospital.he")
    open_.add_argument("--force", action="store_true", help="replace an existing hospital.he")
    open_.add_argument("--crl", help="the federation CA's revocation list (crl.pem): a revoked holder is refused")
    open_.set_defaults(func=run_open)


def run_init(args: argparse.Namespace) -> int:
    hospital, aggregator = write_key_files(Path(args.out), overwrite=args.force)
    print(json.dumps({"hospital": str(hospital), "aggregator": str(aggregator)}))
    return 0


def run_seal(args: argparse.Namespace) -> int:
    sealed = seal_hospital_key(
        Path(args.key).read_bytes(),
        study=args.study,
        recipient_certificate_pem=Path(args.recipient).read_bytes(),
        ca_pem=Path(args.ca).read_bytes(),
        signer_certificate_pem=Path(args.signer_cert).read_bytes(),
        signer_key_pem=Path(args.signer_key).read_bytes(),
        revoked=_revoked(args),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(sealed)
    envelope = SealedKey.from_bytes(sealed)
    print(
        json.dumps(
            {
                "sealed": str(out),
                "study": envelope.study,
                "from": envelope.sender,
                "to": envelope.recipient,
                # What the recipient printed at `certs request`: compare the two out of band.
                "to_public_key_sha256": envelope.recipient_key.hex(),
            }
        )
    )
    return 0


def run_open(args: argparse.Namespace) -> int:
    key = open_hospital_key(
        Path(args.sealed).read_bytes(),
        study=args.study,
        holder=args.holder,
        ca_pem=Path(args.ca).read_bytes(),
        certificate_pem=Path(args.cert).read_bytes(),
        private_key_pem=Path(args.key).read_bytes(),
        revoked=_revoked(args),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(out, key, overwrite=args.force)
    print(json.dumps({"hospital": str(out), "study": args.study, "from": f"agent@{args.holder}"}))
    return 0


def _revoked(args: argparse.Namespace) -> Revoked | None:
    return Revocations(args.crl, args.ca).refusal if args.crl else None
