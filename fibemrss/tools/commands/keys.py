"""`fibemrss keys init`: the HE key ceremony."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fibemrss.he.keys import write_key_files


def add_parser(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="HE key ceremony").add_subparsers(
        dest="keys_command", required=True
    )
    init = keys.add_parser("init", help="write hospital.he (secret) and aggregator.he (public only)")
    init.add_argument("--out", required=True)
    init.add_argument("--force", action="store_true", help="overwrite existing key files")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    hospital, aggregator = write_key_files(Path(args.out), overwrite=args.force)
    print(json.dumps({"hospital": str(hospital), "aggregator": str(aggregator)}))
    return 0
