"""Each service's own PostgreSQL login (docs/security.md, "Database roles").

The migrations make one NOLOGIN group role per service (`fibemrss_gateway`, `fibemrss_agent`,
`fibemrss_inference` in a hospital database, `fibemrss_aggregator` in the central one) and grant
it what that service's adapters execute. A service connects as a LOGIN role that is a member of
its group and may connect to its own database only; `ensure_service_login` makes (or re-passwords)
one, run as the database's owner after the migrations. `fibemrss up`, the demo and the chart's
migration step call it; a hospital DBA may instead run the same three statements by hand
(docs/runbook.md, "Database roles").
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

import psycopg2
from psycopg2 import sql

# service -> its group role, per schema.
HOSPITAL_ROLES = {
    "gateway": "fibemrss_gateway",
    "agent": "fibemrss_agent",
    "inference": "fibemrss_inference",
}
AGGREGATOR_ROLES = {"aggregator": "fibemrss_aggregator"}
SERVICE_ROLES = {**HOSPITAL_ROLES, **AGGREGATOR_ROLES}

_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1: a longer name would be cut silently


def login_name(database: str, service: str) -> str:
    """The login of `service` in `database` ("hospital_cleveland_gateway"): one per database, so
    on a server that holds several hospitals' databases no login reaches another's."""
    name = database if database == service else f"{database}_{service}"
    if len(name) > _MAX_IDENTIFIER:
        raise ValueError(f"login role name {name!r} is longer than {_MAX_IDENTIFIER} characters")
    return name


def url_as(url: str, user: str, password: str) -> str:
    """`url` (a database's URL) with its user and password replaced."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def ensure_service_login(owner_url: str, service: str, login: str, password: str) -> str:
    """Makes `login` a LOGIN role with `password`, a member of `service`'s group role, allowed
    to connect to `owner_url`'s database (and, once this ran for each of them, the only logins
    allowed there); returns that database's URL as `login`. Idempotent: a second call only sets
    the password. Run as the database's owner, after the migrations (they make the group roles);
    needs CREATEROLE for a login that does not exist yet."""
    if service not in SERVICE_ROLES:
        raise ValueError(f"unknown service {service!r}: one of {', '.join(SERVICE_ROLES)}")
    group = SERVICE_ROLES[service]
    if login in SERVICE_ROLES.values():
        # Made LOGIN, a group role would hand its password's holder every service's rights.
        raise ValueError(f"{login!r} is a group role; a service's login needs a name of its own")
    conn = psycopg2.connect(owner_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT current_database(), EXISTS (SELECT 1 FROM pg_roles WHERE rolname=%s)", (login,)
            )
            row = cur.fetchone()
            assert row is not None
            database, exists = row
            verb = "ALTER" if exists else "CREATE"
            # The password travels as a literal (utility statements take no bind parameters); the
            # server stores only its SCRAM verifier.
            cur.execute(
                sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                    sql.Identifier(login), sql.Literal(password)
                )
            )
            cur.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(login)))
            cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
            cur.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(database), sql.Identifier(login)
                )
            )
    finally:
        conn.close()
    return url_as(owner_url, login, password)
