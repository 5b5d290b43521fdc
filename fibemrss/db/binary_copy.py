"""Writes rows with PostgreSQL's binary COPY: large bytea values go in as raw bytes.

psycopg2 sends a bytea parameter as an escaped literal (about three times its size, parsed back
by the server); binary COPY sends the bytes as they are, four times faster for ciphertexts.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Sequence
from typing import Literal

import psycopg2.extensions

ColumnType = Literal["text", "int4", "int8", "bytea"]
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_TRAILER = struct.pack("!h", -1)


def _field(value: object, kind: ColumnType) -> bytes:
    if kind in ("int4", "int8"):
        if not isinstance(value, int):
            raise TypeError(f"a {kind} column needs an int, not {type(value).__name__}")
        return struct.pack("!ii", 4, value) if kind == "int4" else struct.pack("!iq", 8, value)
    if kind == "text":
        data = str(value).encode()
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    else:
        raise TypeError(f"a bytea column needs bytes, not {type(value).__name__}")
    return struct.pack("!i", len(data)) + data


def encode_rows(rows: Iterable[Sequence[object]], types: Sequence[ColumnType]) -> bytes:
    """The binary COPY stream (header, tuples, trailer) for `rows`."""
    parts = [_SIGNATURE]
    for row in rows:
        parts.append(struct.pack("!h", len(types)))
        parts.extend(_field(value, kind) for value, kind in zip(row, types, strict=True))
    parts.append(_TRAILER)
    return b"".join(parts)


def copy_rows(
    cur: psycopg2.extensions.cursor,
    table: str,
    columns: Sequence[str],
    types: Sequence[ColumnType],
    rows: Iterable[Sequence[object]],
) -> None:
    """Inserts `rows` into `table` inside the cursor's transaction (table and columns are ours)."""
    stream = io.BytesIO(encode_rows(rows, types))
    cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)", stream)
