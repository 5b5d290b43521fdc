"""`fibemrss models list|retire`: a hospital's published model versions, and retiring one."""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.platform.config import DEFAULT_TASK


def add_parser(subparsers: Any) -> None:
    models = subparsers.add_parser("models", help="a hospital's published model versions")
    sub = models.add_subparsers(dest="models_command", required=True)
    for name, helptext in (
        ("list", "every version, servable or retired"),
        ("retire", "stop serving one version"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--database-url", required=True, help="the hospital's PostgreSQL (DATABASE_URL)")
        p.add_argument("--task", default=DEFAULT_TASK)
        if name == "retire":
            p.add_argument("--version", type=int, required=True)
            p.add_argument("--reason", required=True, help="why; written to the audit log")
        p.set_defaults(func=cmd_list if name == "list" else cmd_retire)


def cmd_list(args: argparse.Namespace) -> int:
    db = Database(args.database_url, max_connections=1)
    try:
        with db.transaction() as cur:
            cur.execute(
                "SELECT version, federated_round, published_at, metrics, retired_at, retire_reason, "
                "kind, base_version, standby "
                "FROM model_versions WHERE task=%s ORDER BY version DESC",
                (args.task,),
            )
            rows = [
                {
                    "version": v,
                    "federated_round": r,
                    "published_at": p.isoformat(),
                    "metrics": m,
                    "retired": retired.isoformat() if retired else None,
                    **({"retire_reason": why} if why else {}),
                    "kind": kind,
                    **({"base_version": base} if base is not None else {}),
                    "standby": standby,
                }
                for v, r, p, m, retired, why, kind, base, standby in cur.fetchall()
            ]
    finally:
        db.close()
    print(json.dumps(rows, indent=2))
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    db = Database(args.database_url, max_connections=1)
    try:
        ModelStore(db).retire(
            args.task, args.version, actor=f"operator:{getpass.getuser()}", reason=args.reason
        )
    finally:
        db.close()
    print(json.dumps({"task": args.task, "retired": args.version}))
    return 0
