"""`fibemrss study validate|hash|show|list`: study documents, checked and identified before anyone
runs them; `propose|review|approve|refuse|policy`: the federation proposes a study, each hospital
reviews it against its site policy and decides (docs/studies.md)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from fibemrss.db.pool import Database
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.site_policy import parse_site_policy, policy_to_json
from fibemrss.domain.study import parse_study, study_hash, study_to_json
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import TASKS, get_task
from fibemrss.platform.channels import open_channel
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.study_review import (
    decide,
    document_of,
    format_review,
    proposal,
    propose,
    review,
    review_to_dict,
)
from fibemrss.tools.tls_args import add_tls_arguments, server_identity, tls_from_args


def add_parser(subparsers: Any) -> None:
    study = subparsers.add_parser(
        "study", help="study documents: validate, hash, show; propose, review, approve, refuse; site policy"
    ).add_subparsers(dest="study_command", required=True)
    for name, text in (
        ("validate", "check a document; every bad field is named (exit 1)"),
        ("hash", "the study's identity: SHA-256 of its canonical form"),
        ("show", "what the study reads, predicts and trains, as JSON"),
    ):
        p = study.add_parser(name, help=text)
        p.add_argument("study", help="a document (YAML or JSON) or the name of a shipped study")
        p.set_defaults(func=run, study_command=name)
    listing = study.add_parser("list", help="the shipped studies and their hashes")
    listing.set_defaults(func=run_list)

    p = study.add_parser("propose", help="operator@central: propose a study document to the federation")
    p.add_argument("study", help="a document (YAML or JSON) or the name of a shipped study")
    p.add_argument("--aggregator", required=True, help="HOST:PORT")
    add_tls_arguments(p)
    p.set_defaults(func=run_propose)
    for name, text in (
        (
            "review",
            "operator@h: what a proposed study reads, how many patients here it may read, the site policy",
        ),
        ("approve", "operator@h: approve the proposed study (its hash) at this hospital"),
        ("refuse", "operator@h: refuse the proposed study at this hospital"),
    ):
        p = study.add_parser(name, help=text)
        p.add_argument("study", help="the proposed study's name")
        p.add_argument("--aggregator", required=True, help="HOST:PORT, where the proposal is read")
        p.add_argument("--gateway", required=True, help="HOST:PORT of this hospital's gateway")
        if name != "review":
            p.add_argument("--hash", help="the hash you reviewed; refused if the proposal now has another")
            p.add_argument("--reason", default="", help="why (required to refuse); audited")
        p.add_argument("--json", action="store_true")
        add_tls_arguments(p)
        p.set_defaults(func=run_review, study_command=name)
    p = study.add_parser("policy", help="a hospital's site policy: show it, or set it from a file")
    p.add_argument("file", nargs="?", help="a site policy document to set (YAML or JSON)")
    p.add_argument("--database-url", required=True, help="the hospital's PostgreSQL (DATABASE_URL)")
    p.set_defaults(func=run_policy)


def _load(ref: str) -> TaskSpec:
    path = Path(ref)
    if path.is_file():
        return parse_study(path.read_bytes(), path.name)
    return get_task(ref)


def run(args: argparse.Namespace) -> int:
    try:
        task = _load(args.study)
    except InvalidArgument as exc:
        for v in exc.violations:
            print(f"{v.field}: {v.description}", file=sys.stderr)
        print(f"fibemrss: {args.study}: {exc}", file=sys.stderr)
        return 1
    if args.study_command == "validate":
        print(f"{task.name} version {task.version}: valid ({study_hash(task)})")
    elif args.study_command == "hash":
        print(study_hash(task))
    else:
        print(json.dumps({"hash": study_hash(task), **study_to_json(task)}, indent=2))
    return 0


def _document(ref: str) -> bytes:
    path = Path(ref)
    if path.is_file():
        return path.read_bytes()
    return document_of(get_task(ref))


def _refused(exc: grpc.RpcError) -> int:
    """A refused call: every bad field on its own line, then the reason."""
    for field, why in field_violations(exc):
        print(f"{field}: {why}", file=sys.stderr)
    print(f"fibemrss: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def run_propose(args: argparse.Namespace) -> int:
    try:
        return _propose(args)
    except grpc.RpcError as exc:
        return _refused(exc)


def run_review(args: argparse.Namespace) -> int:
    try:
        return _review(args)
    except grpc.RpcError as exc:
        return _refused(exc)


def _propose(args: argparse.Namespace) -> int:
    with open_channel(args.aggregator, tls_from_args(args), server_identity(args, "aggregator")) as ch:
        response = propose(ch, _document(args.study))
    p = response.proposal
    state = "already proposed" if response.duplicate else "proposed"
    print(f"{p.study} version {p.version} {p.study_hash}: {state} by {p.proposed_by}")
    return 0


def _review(args: argparse.Namespace) -> int:
    tls = tls_from_args(args)
    with open_channel(args.aggregator, tls, server_identity(args, "aggregator")) as ch:
        proposed = proposal(ch, args.study)
    if args.study_command != "review" and args.hash and args.hash != proposed.study_hash:
        print(
            f"fibemrss: {args.study} is now proposed as {proposed.study_hash}, not {args.hash}: review it again",
            file=sys.stderr,
        )
        return 1
    task = parse_study(proposed.document, "proposal")
    with open_channel(args.gateway, tls, server_identity(args, "gateway")) as ch:
        if args.study_command == "review":
            r = review(ch, proposed.document)
            print(json.dumps(review_to_dict(r, task), indent=2) if args.json else format_review(r, task))
            return 0
        d = decide(ch, proposed.document, args.study_command == "approve", args.reason)
    if args.json:
        print(
            json.dumps({"study": d.study, "hash": d.study_hash, "decision": d.decision, "by": d.decided_by})
        )
    else:
        print(
            f"{d.study} version {d.version} {d.study_hash}: {d.decision} by {d.decided_by} at {d.decided_at}"
        )
    return 0


def run_policy(args: argparse.Namespace) -> int:
    db = Database(args.database_url, max_connections=1)
    try:
        store = StudyStore(db)
        if args.file:
            try:
                policy = parse_site_policy(Path(args.file).read_bytes(), args.file)
            except InvalidArgument as exc:
                for v in exc.violations:
                    print(f"{v.field}: {v.description}", file=sys.stderr)
                print(f"fibemrss: {args.file}: {exc}", file=sys.stderr)
                return 1
            store.set_site_policy(policy, f"{getpass.getuser()} (fibemrss study policy)")
        policy, is_set = store.site_policy()
    finally:
        db.close()
    print(json.dumps({"set": is_set, "policy": policy_to_json(policy)}, indent=2))
    return 0


def run_list(args: argparse.Namespace) -> int:
    for name in sorted(TASKS):
        print(f"{name}  version {TASKS[name].version}  {study_hash(TASKS[name])}")
    return 0
