"""`fibemrss privacy ledger|budget`: a hospital's privacy spends per dataset, and its budgets."""

from __future__ import annotations

import argparse
import getpass
import json
import math
from typing import Any

from fibemrss.db.pool import Database
from fibemrss.db.privacy_ledger import PrivacyLedger
from fibemrss.domain.privacy import total


def add_parser(subparsers: Any) -> None:
    privacy = subparsers.add_parser("privacy", help="a hospital's privacy ledger and budgets")
    sub = privacy.add_subparsers(dest="privacy_command", required=True)
    ledger = sub.add_parser("ledger", help="every spend, and per dataset the total against its budget")
    ledger.add_argument("--database-url", required=True, help="the hospital's PostgreSQL (DATABASE_URL)")
    ledger.add_argument("--dataset", help="one dataset (default: all)")
    ledger.add_argument("--json", action="store_true")
    ledger.set_defaults(func=cmd_ledger)
    budget = sub.add_parser("budget", help="set a dataset's budget; the agent refuses rounds beyond it")
    budget.add_argument("--database-url", required=True, help="the hospital's PostgreSQL (DATABASE_URL)")
    budget.add_argument("--dataset", default="emr", help="the agent's FIBEMRSS_DATASET (default emr)")
    budget.add_argument("--epsilon", type=float, required=True)
    budget.add_argument("--delta", type=float, default=1e-3)
    budget.set_defaults(func=cmd_budget)


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"  # JSON has no infinity


def cmd_ledger(args: argparse.Namespace) -> int:
    db = Database(args.database_url, max_connections=1)
    try:
        ledger = PrivacyLedger(db)
        datasets = [args.dataset] if args.dataset else ledger.datasets()
        out: dict[str, Any] = {}
        for dataset in datasets:
            epsilon, delta = total(ledger.latest(dataset))
            budget = ledger.budget(dataset)
            out[dataset] = {
                "spent": {"epsilon": _number(epsilon), "delta": delta},
                "budget": None if budget is None else {"epsilon": budget.epsilon, "delta": budget.delta},
                "entries": [{**e, "epsilon": _number(e["epsilon"])} for e in ledger.entries(dataset)],
            }
    finally:
        db.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for dataset, d in out.items():
        b = d["budget"]
        print(
            f"dataset {dataset}: spent epsilon {d['spent']['epsilon']}, delta {d['spent']['delta']:g}; "
            + (f"budget epsilon {b['epsilon']:g}, delta {b['delta']:g}" if b else "no budget")
        )
        for e in d["entries"]:
            eps = e["epsilon"] if isinstance(e["epsilon"], str) else f"{e['epsilon']:.4g}"
            print(
                f"  {e['recorded_at'][:19]}  {e['task']:<22} federation {e['federation_id'][:8]}  "
                f"{e['kind']:<12} round {e['round']:>3}  cumulative epsilon {eps}  delta {e['delta']:g}"
            )
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    if not (args.epsilon >= 0 and 0 <= args.delta < 1):
        raise ValueError("--epsilon must be >= 0 and --delta in [0, 1)")
    db = Database(args.database_url, max_connections=1)
    try:
        PrivacyLedger(db).set_budget(
            args.dataset, args.epsilon, args.delta, actor=f"operator:{getpass.getuser()}"
        )
    finally:
        db.close()
    print(json.dumps({"dataset": args.dataset, "budget": {"epsilon": args.epsilon, "delta": args.delta}}))
    return 0
