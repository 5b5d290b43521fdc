"""Text COPY (fibemrss/db/text_copy.py) on a real PostgreSQL: every value the gateway stores in
observations, conditions and encounters reads back exactly as it was written."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import psycopg2
import pytest

from fibemrss.db.text_copy import copy_rows, encode_rows

AWKWARD = ["tab\there", "two\nlines", "cr\rx", "back\\slash \\N", "", "ünïcødé 血压", "\\t literal"]


def test_text_copy_reads_back_every_value_exactly(fresh_database: Callable[[str], str]) -> None:
    url = fresh_database("hospital")
    when = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=-5)))
    rows: list[tuple[object, ...]] = [
        (i, text, None if i % 2 else text, 0.1 + i, when + timedelta(days=i))
        for i, text in enumerate(AWKWARD)
    ]
    rows.append((99, "extremes", None, -1.7976931348623157e308, None))
    rows.append((100, "nan", "x", math.nan, datetime(1900, 1, 1, tzinfo=UTC)))
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")
            cur.execute(
                "CREATE TEMP TABLE t (n int, a text NOT NULL, b text, v double precision, w timestamptz)"
            )
            assert copy_rows(cur, "t", ("n", "a", "b", "v", "w"), rows) == len(rows)
            cur.execute("SELECT n, a, b, v, w FROM t ORDER BY n")
            back = cur.fetchall()
    finally:
        conn.close()
    assert len(back) == len(rows)
    for got, sent in zip(back, rows, strict=True):
        assert got[:3] == sent[:3]
        if isinstance(sent[3], float) and math.isnan(sent[3]):
            assert math.isnan(got[3])
        else:
            assert got[3] == sent[3]
        assert got[4] == sent[4]  # the same instant, whatever the offset it was given in


def test_a_value_text_copy_cannot_carry_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="NUL"):
        encode_rows([("a\x00b",)])
    with pytest.raises(TypeError, match="bytes"):
        encode_rows([(b"raw",)])
