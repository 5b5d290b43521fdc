"""Versioned SQL migrations: files NNNN_name.sql under migrations/<schema>/, applied once each, in order."""

from __future__ import annotations

import logging
from importlib import resources

import psycopg2
import psycopg2.errors

from fibemrss.domain.errors import ConfigError

log = logging.getLogger(__name__)

# Any constant works; it serializes concurrent migrators (three hospital services share one
# database and may start at the same moment).
_LOCK_KEY = 0x46494245


def migration_files(schema: str) -> list[tuple[str, str]]:
    folder = resources.files("fibemrss.db") / "migrations" / schema
    files = sorted((f.name, f.read_text()) for f in folder.iterdir() if f.name.endswith(".sql"))
    if not files:
        raise ValueError(f"no migrations for schema {schema!r}")
    return files


def pending(database_url: str, schema: str) -> list[str]:
    """The migrations of `schema` not applied yet to the database (every one on an empty
    database). Needs only SELECT on schema_migrations, which every service role holds."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            row = cur.fetchone()
            done: set[str] = set()
            if row is not None and row[0]:
                cur.execute("SELECT name FROM schema_migrations")
                done = {r[0] for r in cur.fetchall()}
    finally:
        conn.close()
    return [name for name, _ in migration_files(schema) if name not in done]


def migrate(database_url: str, schema: str) -> list[str]:
    """Applies the pending migrations of `schema`; returns the names applied.

    With nothing pending it changes nothing, so a service connected as its own role (which may
    not change the schema: docs/security.md, "Database roles") passes; with migrations pending
    such a role gets a ConfigError naming them, and the owner must run them (`fibemrss db
    setup`, or FIBEMRSS_MIGRATE=1 on a service given the owner's URL)."""
    try:
        todo = pending(database_url, schema)
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"DATABASE_URL's role may not read the {schema} database's schema_migrations "
            f"({exc.diag.message_primary}): the migrations that grant it have not run; run them as "
            'the database\'s owner (docs/runbook.md, "Database roles")'
        ) from None
    if not todo:
        return []
    try:
        return _apply(database_url, schema)
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"the {schema} database has migrations pending ({', '.join(todo)}) and DATABASE_URL's "
            f"role may not apply them ({exc.diag.message_primary}); run them as the database's "
            'owner (docs/runbook.md, "Database roles")'
        ) from None


def _apply(database_url: str, schema: str) -> list[str]:
    applied: list[str] = []
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT name FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for name, sql in migration_files(schema):
                if name in done:
                    continue
                cur.execute(sql)
                cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
    finally:
        conn.close()
    if applied:
        log.info("migrations applied", extra={"schema": schema, "applied": applied})
    return applied
