"""`Database.one_request`: each execute is its own transaction, committed by the server before the
answer returns (the gateway's group commits rely on it: an ACK follows the answer)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg2
import pytest

from fibemrss.db.pool import Database


def rows(url: str, actor: str) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_log WHERE actor = %s", (actor,))
        return int(cur.fetchone()[0])


def test_a_request_of_several_statements_is_all_or_nothing(fresh_database: Callable[[str], str]) -> None:
    url = fresh_database("hospital")
    db = Database(url, max_connections=1)
    try:
        with pytest.raises(psycopg2.errors.NotNullViolation), db.one_request() as cur:
            cur.execute(
                "INSERT INTO audit_log (actor, action) VALUES ('first', 'x'); "
                "INSERT INTO audit_log (actor, action) VALUES (NULL, 'y')"
            )
        assert rows(url, "first") == 0  # the first statement went with the second
        with db.one_request() as cur:
            cur.execute(
                "INSERT INTO audit_log (actor, action) VALUES ('both', 'x'); "
                "INSERT INTO audit_log (actor, action) VALUES ('both', 'y') RETURNING action"
            )
            assert cur.fetchall() == [("y",)]  # the last statement's rows
            assert rows(url, "both") == 2  # committed when the answer came, before the block ends
    finally:
        db.close()


def test_the_pooled_connection_is_transactional_again_afterwards(
    fresh_database: Callable[[str], str],
) -> None:
    """One connection in the pool: after `one_request` handed it back, `transaction()` on it still
    rolls back what its block wrote when the block fails."""
    url = fresh_database("hospital")
    db = Database(url, max_connections=1)
    try:
        with db.one_request() as cur:
            cur.execute("SELECT 1")
        with pytest.raises(RuntimeError), db.transaction() as cur:
            cur.execute("INSERT INTO audit_log (actor, action) VALUES ('later', 'x')")
            raise RuntimeError("the block fails after its insert")
        assert rows(url, "later") == 0
    finally:
        db.close()
