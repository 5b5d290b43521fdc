"""A small thread-safe connection pool with a transaction context manager."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors
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


@dataclass(frozen=True)
class Timeouts:
    """Bounds on every transaction, so one stuck statement or lock holder stalls nobody for long;
    PostgreSQL cancels past them and the caller gets UNAVAILABLE (retry)."""

    lock_ms: int = 10_000
    statement_ms: int = 120_000
    idle_in_transaction_ms: int = 300_000

    def options(self) -> str:
        return (
            f"-c lock_timeout={self.lock_ms} -c statement_timeout={self.statement_ms} "
            f"-c idle_in_transaction_session_timeout={self.idle_in_transaction_ms}"
        )


class Database:
    def __init__(
        self,
        url: str,
        max_connections: int = 8,
        timeouts: Timeouts | None = None,
        wait_seconds: float = 0.0,
    ) -> None:
        """`wait_seconds`: how long a caller queues for a free connection when all
        `max_connections` are in use before it gets UNAVAILABLE (0: at once). A service whose
        callers all arrive together (every hospital uploading at the round's start) queues them
        instead of refusing honest work because of its own pool."""
        self.url = url
        self.timeouts = timeouts or Timeouts()
        self.wait_seconds = wait_seconds
        # Admission to the pool: callers beyond max_connections wait here in arrival order.
        self._slots = threading.BoundedSemaphore(max_connections)
        try:
            self._pool = psycopg2.pool.ThreadedConnectionPool(
                1, max_connections, url, options=self.timeouts.options()
            )
        except psycopg2.OperationalError as exc:
            raise Unavailable(f"database unreachable: {exc.__class__.__name__}") from exc

    def _connection(self) -> psycopg2.extensions.connection:
        if self.wait_seconds > 0:
            admitted = self._slots.acquire(timeout=self.wait_seconds)
        else:
            admitted = self._slots.acquire(blocking=False)
        if not admitted:
            # Every connection is in use (past the wait): a transient overload, not a bug of the
            # caller's request.
            raise Unavailable("database connection pool exhausted; retry")
        try:
            return self._pool.getconn()
        except psycopg2.pool.PoolError:
            self._slots.release()
            raise Unavailable("database connection pool exhausted; retry") from None
        except psycopg2.OperationalError as exc:
            self._slots.release()
            raise Unavailable(f"database unreachable: {exc.__class__.__name__}") from exc

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor inside one transaction: committed on success, rolled back on any error. A
        connection that died (a PostgreSQL restart) is dropped, so the next call reconnects."""
        with self._session(autocommit=False) as cur:
            yield cur

    @contextmanager
    def one_request(self) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor whose every `execute` is a transaction of its own, committed (or rolled back)
        by the server before the answer comes back: no BEGIN and no COMMIT round trips. A request
        of several statements separated by semicolons is one implicit transaction, all or
        nothing (the PostgreSQL manual, "Multiple Statements in a Simple Query"), so a write of
        a few rows costs one round trip instead of three. Use one `execute` per unit of work:
        two are two transactions."""
        with self._session(autocommit=True) as cur:
            yield cur

    @contextmanager
    def _session(self, autocommit: bool) -> Iterator[psycopg2.extensions.cursor]:
        conn = self._connection()
        broken = False
        try:
            # A connection keeps the mode it was last used in (setting it takes the connection's
            # lock and lets other threads run), so the next caller of the same kind sets nothing.
            if conn.autocommit != autocommit:
                conn.autocommit = autocommit
            if autocommit:
                # Not `with conn`: it would open a transaction even on an autocommit connection.
                with conn.cursor() as cur:
                    yield cur
            else:
                with conn, conn.cursor() as cur:
                    yield cur
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            # Lock and statement timeouts are OperationalErrors on a connection that still works.
            broken = isinstance(exc, psycopg2.InterfaceError) or conn.closed != 0
            if isinstance(exc, psycopg2.errors.LockNotAvailable | psycopg2.errors.QueryCanceled):
                raise Unavailable(f"database busy: {exc.__class__.__name__}; retry") from exc
            broken = True
            raise Unavailable("database connection lost") from exc
        finally:
            try:
                self._pool.putconn(conn, close=broken or conn.closed != 0)
            finally:
                self._slots.release()

    def close(self) -> None:
        self._pool.closeall()
