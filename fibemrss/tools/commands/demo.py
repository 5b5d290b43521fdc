"""`fibemrss demo`: federate the UCI heart-disease hospitals end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fibemrss.tools.demo import TOGETHER, run_demo, run_studies_demo
from fibemrss.tools.paths import DEFAULT_SHARED_DATA
from fibemrss.tools.workdir import work_folder


def add_parser(subparsers: Any) -> None:
    demo = subparsers.add_parser("demo", help="federate the UCI heart-disease hospitals end to end")
    demo.add_argument(
        "--rounds", type=int, help="federated rounds (default: the study's, 15 for heart-disease-v1)"
    )
    demo.add_argument(
        "--study",
        action="append",
        help="a study document (YAML/JSON) instead of heart-disease-v1 (docs/studies.md); given several "
        "times (documents or shipped study names), every hospital takes part in all of them at once",
    )
    demo.add_argument(
        "--heart-and-hypertension",
        action="store_true",
        help=f"run {' and '.join(TOGETHER)} together at the four hospitals (one agent and one inference "
        "service each, every study in its own federation; needs the shared FHIR bundles)",
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
    studies = list(TOGETHER) if args.heart_and_hypertension else list(args.study or [])
    if args.heart_and_hypertension and args.study:
        raise SystemExit("fibemrss: demo: give --study or --heart-and-hypertension, not both")
    if len(studies) > 1:
        if args.dp:
            raise SystemExit(
                "fibemrss: demo: --dp runs heart-disease-v1-dp alone; name it with --study instead"
            )
        with work_folder(args.workdir) as workdir:
            run_studies_demo(
                workdir,
                studies,
                args.rounds,
                Path(args.json) if args.json else None,
                quiet=args.quiet,
                database_url=args.database_url,
                serve_endpoints=Path(args.endpoints_json) if args.serve else None,
                shared_data=Path(args.shared_data),
            )
        return 0
    with work_folder(args.workdir) as workdir:
        run_demo(
            workdir,
            args.rounds,
            Path(args.json) if args.json else None,
            quiet=args.quiet,
            database_url=args.database_url,
            serve_endpoints=Path(args.endpoints_json) if args.serve else None,
            study_file=Path(studies[0]) if studies else None,
            shared_data=Path(args.shared_data),
            dp=args.dp,
            console_port=args.console_port,
        )
    return 0
