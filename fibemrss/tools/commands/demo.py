"""`fibemrss demo`: federate the UCI heart-disease hospitals end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fibemrss.tools.demo import run_demo
from fibemrss.tools.paths import DEFAULT_SHARED_DATA
from fibemrss.tools.workdir import work_folder


def add_parser(subparsers: Any) -> None:
    demo = subparsers.add_parser("demo", help="federate the UCI heart-disease hospitals end to end")
    demo.add_argument(
        "--rounds", type=int, help="federated rounds (default: the study's, 15 for heart-disease-v1)"
    )
    demo.add_argument(
        "--study", help="a study document (YAML/JSON) instead of heart-disease-v1 (docs/studies.md)"
    )
    demo.add_argument("--shared-data", default=str(DEFAULT_SHARED_DATA), help="for FHIR studies: shared/data")
    demo.add_argument("--json", help="write rounds, final accuracy and the diagnosis here")
    demo.add_argument("--workdir")
    demo.add_argument("--database-url")
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument(
        "--dp",
        action="store_true",
        help="patient-level DP-SGD in local training (task heart-disease-v1-dp: epsilon 1, delta 1e-3 "
        "over 15 rounds); prints the epsilon spent per round",
    )
    demo.add_argument(
        "--serve", action="store_true", help="keep serving after the rounds until SIGINT/SIGTERM"
    )
    demo.add_argument(
        "--endpoints-json", default="endpoints.json", help="with --serve: where to write endpoints"
    )
    demo.add_argument(
        "--console-port",
        type=int,
        default=0,
        help="with --serve: hospital i's console on 127.0.0.1:PORT+i; the consoles start when "
        "FIBEMRSS_OIDC_* name a sign-in provider (docs/console.md)",
    )
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with work_folder(args.workdir) as workdir:
        run_demo(
            workdir,
            args.rounds,
            Path(args.json) if args.json else None,
            quiet=args.quiet,
            database_url=args.database_url,
            serve_endpoints=Path(args.endpoints_json) if args.serve else None,
            study_file=Path(args.study) if args.study else None,
            shared_data=Path(args.shared_data),
            dp=args.dp,
            console_port=args.console_port,
        )
    return 0
