"""`fibemrss up`: PostgreSQL and every service on loopback until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fibemrss.tools.local_cluster import DEMO_HOSPITALS, LocalCluster, console_lines, console_oidc_from_env
from fibemrss.tools.workdir import wait_for_signal, work_folder, write_endpoints


def add_parser(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up", help="start PostgreSQL and every service on loopback until SIGINT/SIGTERM"
    )
    up.add_argument("--endpoints-json", help="write the service endpoints here once all are healthy")
    up.add_argument("--workdir", help="keep data, keys and logs here (default: a temporary folder)")
    up.add_argument("--hospitals", help="comma-separated hospital names (default: the four UCI hospitals)")
    up.add_argument(
        "--database-url",
        help="use this PostgreSQL server instead of an embedded one (its user migrates and makes each "
        "service's login: it needs CREATEDB and CREATEROLE)",
    )
    up.add_argument(
        "--console-port",
        type=int,
        default=0,
        help="hospital i's console on 127.0.0.1:PORT+i (default: any free port); the consoles start "
        "when FIBEMRSS_OIDC_* name a sign-in provider (docs/console.md)",
    )
    up.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    hospitals = tuple(args.hospitals.split(",")) if args.hospitals else DEMO_HOSPITALS
    with work_folder(args.workdir) as workdir:
        cluster = LocalCluster(
            workdir,
            hospitals,
            database_url=args.database_url,
            console_oidc=console_oidc_from_env(),
            console_port=args.console_port,
        )
        try:
            endpoints = cluster.start()
            if args.endpoints_json:
                write_endpoints(Path(args.endpoints_json), endpoints)
            print(json.dumps(endpoints, indent=2), flush=True)
            for line in console_lines(endpoints):  # stderr: stdout stays one JSON document
                print(line, file=sys.stderr, flush=True)
            wait_for_signal()
        finally:
            cluster.stop()
    return 0
