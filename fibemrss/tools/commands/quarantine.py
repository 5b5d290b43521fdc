"""`fibemrss quarantine list|resolve`: review the records a gateway held back, with their reasons."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.platform.channels import open_channel
from fibemrss.tools.tls_args import add_tls_arguments, server_identity, tls_from_args

_STATUSES = ("open", "accepted", "rejected")


def add_parser(subparsers: Any) -> None:
    q = subparsers.add_parser("quarantine", help="list and resolve a gateway's quarantined records")
    sub = q.add_subparsers(dest="quarantine_command", required=True)

    listing = sub.add_parser("list", help="quarantined records with their reasons (the read is audited)")
    listing.add_argument("--gateway", required=True, help="HOST:PORT")
    listing.add_argument("--status", choices=_STATUSES, default="open")
    listing.add_argument("--purpose", default="data quality review", help="written to the audit log")
    listing.add_argument("--json", action="store_true")
    add_tls_arguments(listing)
    listing.set_defaults(func=cmd_list)

    resolve = sub.add_parser("resolve", help="accept (optionally corrected) or reject one record")
    resolve.add_argument("--gateway", required=True, help="HOST:PORT")
    resolve.add_argument("--id", type=int, required=True, help="the quarantined record's id")
    decision = resolve.add_mutually_exclusive_group(required=True)
    decision.add_argument("--accept", action="store_true")
    decision.add_argument("--reject", action="store_true")
    resolve.add_argument(
        "--correct",
        action="append",
        default=[],
        metavar="INDEX=VALUE[:UNIT]",
        help="with --accept: replace observation INDEX's value (and UCUM unit), e.g. 3=5.2:mmol/L",
    )
    resolve.add_argument("--reason", required=True, help="why; written to the audit log")
    add_tls_arguments(resolve)
    resolve.set_defaults(func=cmd_resolve)


def _stub(args: argparse.Namespace) -> tuple[Any, Any]:
    channel = open_channel(args.gateway, tls_from_args(args), server_identity(args, "gateway"))
    return channel, emr_pb2_grpc.EmrGatewayServiceStub(channel)


def _record_to_dict(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "patient_key": r.patient_key,
        "source_system": r.source_system,
        "source_id": r.source_id,
        "status": emr_pb2.QuarantineStatus.Name(r.status).removeprefix("QUARANTINE_STATUS_").lower(),
        "reasons": list(r.reasons),
        "observations": [
            {
                "index": i,
                "code": o.code.code,
                "value": o.value if o.HasField("value") else None,
                "unit": o.unit,
            }
            for i, o in enumerate(r.record.observations)
        ],
        **({"resolved_by": r.resolved_by, "resolution_reason": r.resolution_reason} if r.resolved_by else {}),
    }


def cmd_list(args: argparse.Namespace) -> int:
    status = getattr(emr_pb2, f"QUARANTINE_STATUS_{args.status.upper()}")
    channel, stub = _stub(args)
    records: list[dict[str, Any]] = []
    token = ""
    with channel:
        while True:
            page = stub.ListQuarantine(
                emr_pb2.ListQuarantineRequest(purpose=args.purpose, status=status, page_token=token),
                timeout=60,
            )
            records += [_record_to_dict(r) for r in page.records]
            token = page.next_page_token
            if not token:
                break
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{len(records)} {args.status} quarantined record(s)")
        for r in records:
            print(f"  #{r['id']}  {r['source_system']} {r['source_id']}  patient {r['patient_key']}")
            for reason in r["reasons"]:
                print(f"      - {reason}")
    return 0


def _correction(text: str) -> tuple[int, float, str]:
    index, sep, rest = text.partition("=")
    value, _, unit = rest.partition(":")
    try:
        return int(index), float(value), unit
    except ValueError:
        raise ValueError(f"--correct {text!r} must look like INDEX=VALUE or INDEX=VALUE:UNIT") from None


def cmd_resolve(args: argparse.Namespace) -> int:
    if args.reject and args.correct:
        raise ValueError("--correct goes with --accept only")
    request = emr_pb2.ResolveQuarantineRequest(
        id=args.id,
        resolution=emr_pb2.RESOLUTION_ACCEPT if args.accept else emr_pb2.RESOLUTION_REJECT,
        reason=args.reason,
        corrections=[
            emr_pb2.ObservationCorrection(observation_index=i, value=v, unit=u)
            for i, v, u in map(_correction, args.correct)
        ],
    )
    channel, stub = _stub(args)
    with channel:
        response = stub.ResolveQuarantine(request, timeout=60)
    print(
        json.dumps(
            {"fate": emr_pb2.Fate.Name(response.fate), "record": _record_to_dict(response.record)}, indent=2
        )
    )
    return 0
