"""A small thread-safe connection pool with a transaction context manager."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.pool

from fibemrss.domain.errors import Unavailable

Cursor = psycopg2.extensions.cursor


def one_row(cur: Cursor) -> tuple[Any, ...]:
    """The row of a query that always returns one (an aggregate, an INSERT ... RETURNING)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


class Database:
    def __init__(self, url: str, max_connections: int = 8) -> None:
        self.url = url
        try:
            self._pool = psycopg2.pool.ThreadedConnectionPool(1, max_connections, url)
        except psycopg2.OperationalError as exc:
            raise Unavailable(f"database unreachable: {exc.__class__.__name__}") from exc

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor inside one transaction: committed on success, rolled back on any error."""
        conn = self._pool.getconn()
        broken = False
        try:
            with conn, conn.cursor() as cur:
                yield cur
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            broken = True
            raise Unavailable("database connection lost") from exc
        finally:
            self._pool.putconn(conn, close=broken or conn.closed != 0)

    def close(self) -> None:
        self._pool.closeall()
