"""Creates databases on an external server named by DATABASE_URL (for `up` and tests)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg2


def ensure_database(server_url: str, name: str) -> str:
    """Creates `name` on the server of `server_url` if missing; returns the database's URL."""
    parts = urlsplit(server_url)
    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname=%s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
