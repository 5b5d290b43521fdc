"""`fibemrss db setup`: a database's migrations, run as its owner, and a service's own login.

The chart runs it in each pod's init container `migrate` (the only container given the owner's
URL); a DBA may run it by hand instead (docs/runbook.md, "Database roles"). The URLs come from
the environment, never the command line, since they hold passwords.
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import unquote, urlsplit

from fibemrss.db.migrate import migrate
from fibemrss.db.roles import AGGREGATOR_ROLES, HOSPITAL_ROLES, ensure_service_login
from fibemrss.domain.errors import ConfigError

OWNER_VARIABLE = "FIBEMRSS_MIGRATE_DATABASE_URL"


def add_parser(subparsers: Any) -> None:
    db = subparsers.add_parser("db", help="database setup: migrations as the owner, each service's login")
    sub = db.add_subparsers(dest="db_command", required=True)
    setup = sub.add_parser(
        "setup",
        help=f"apply the migrations as the owner ({OWNER_VARIABLE}); with --login-for, also make "
        "that service's login from the user and password of DATABASE_URL",
    )
    setup.add_argument("--schema", choices=("hospital", "aggregator"), required=True)
    setup.add_argument(
        "--login-for",
        choices=(*HOSPITAL_ROLES, *AGGREGATOR_ROLES),
        help="make (or re-password) DATABASE_URL's user as this service's login",
    )
    setup.set_defaults(func=cmd_setup)


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"environment variable {name} is required")
    return value


def cmd_setup(args: argparse.Namespace) -> int:
    owner = _env(OWNER_VARIABLE)
    applied = migrate(owner, args.schema)
    print(f"migrations applied: {', '.join(applied) or 'none pending'}", flush=True)
    if args.login_for:
        services = HOSPITAL_ROLES if args.schema == "hospital" else AGGREGATOR_ROLES
        if args.login_for not in services:
            raise ConfigError(f"--login-for {args.login_for} is not a service of the {args.schema} database")
        login = urlsplit(_env("DATABASE_URL"))
        if login.path != urlsplit(owner).path:
            raise ConfigError(f"DATABASE_URL and {OWNER_VARIABLE} must name the same database")
        if not login.username or not login.password:
            raise ConfigError("DATABASE_URL must hold the service's login user and password")
        ensure_service_login(owner, args.login_for, unquote(login.username), unquote(login.password))
        print(f"login {unquote(login.username)} ready for {args.login_for}", flush=True)
    return 0
