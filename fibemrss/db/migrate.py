"""Versioned SQL migrations: files NNNN_name.sql under migrations/<schema>/, applied once each, in order."""

from __future__ import annotations

import logging
from importlib import resources

import psycopg2

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


def migrate(database_url: str, schema: str) -> list[str]:
    """Applies the pending migrations of `schema`; returns the names applied."""
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
