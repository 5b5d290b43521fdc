"""`fibemrss report`: the federation's results as plots, in one HTML file and a Markdown page."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fibemrss.tools.paths import DEFAULT_SHARED_DATA


def add_parser(subparsers: Any) -> None:
    report = subparsers.add_parser(
        "report", help="run the benchmarks and write report.html, REPORT.md, plots"
    )
    report.add_argument("--out", required=True, help="folder for report.html, REPORT.md, the PNGs and data/")
    report.add_argument("--quick", action="store_true", help="smaller benchmark sizes (about 5 minutes)")
    report.add_argument(
        "--from", dest="from_dir", help="read <name>.json from this folder instead of running"
    )
    report.add_argument("--shared-data", default=str(DEFAULT_SHARED_DATA))
    report.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Deferred: the benchmarks and matplotlib take seconds to import, which no other command pays.
    from fibemrss.tools.report.build import build_report

    shared = Path(args.shared_data)
    result = build_report(
        Path(args.out),
        shared if shared.is_dir() else None,
        args.quick,
        Path(args.from_dir) if args.from_dir else None,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(result, indent=2))
    return 0
