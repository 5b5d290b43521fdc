"""Writes rows with PostgreSQL's text COPY: one stream per table instead of INSERT statements.

`execute_values` quotes every value into SQL text (`mogrify`) and the server parses and plans the
statements; COPY sends one tab-separated line per row that the server reads straight into the
table, inside the caller's transaction (a failure rolls it back with everything else).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from datetime import date, datetime

import psycopg2.extensions
from psycopg2 import sql

# Text format: backslash escapes, \N is NULL (the PostgreSQL manual, "COPY", "Text Format").
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(value: str) -> str:
    # Most values need no escape; looking costs less than translating every one.
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value or "\x00" in value:
        if "\x00" in value:
            raise ValueError("text COPY cannot carry a NUL character")
        return value.translate(_ESCAPES)
    return value


def _field(value: object) -> str:
    if type(value) is str:
        return _text(value)
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form; nan and inf read back as NaN, Infinity
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"no text COPY form for {type(value).__name__}")


def encode_rows(rows: Iterable[Sequence[object]]) -> str:
    """The COPY text stream of `rows`: a line per row, fields separated by tabs."""
    return "".join("\t".join(map(_field, row)) + "\n" for row in rows)


def copy_rows(
    cur: psycopg2.extensions.cursor, table: str, columns: Sequence[str], rows: Sequence[Sequence[object]]
) -> int:
    """COPY `rows` into `table` (`columns` in order); returns the number of rows written."""
    if not rows:
        return 0
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    cur.copy_expert(statement.as_string(cur), io.StringIO(encode_rows(rows)))
    return len(rows)
