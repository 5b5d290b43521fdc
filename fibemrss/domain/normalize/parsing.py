"""Small readers every input format shares (pure): numbers, UTC offsets, capped violation lists."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from datetime import timedelta, timezone
from typing import TypeVar

V = TypeVar("V")

MAX_VIOLATIONS = 100  # per payload: enough to fix it, bounded so a junk payload stays small


CSV_CELL_LIMIT = csv.field_size_limit()  # the csv module's limit on one cell, in characters
CSV_CELL_PROBLEM = f"holds a cell longer than {CSV_CELL_LIMIT} characters or an unreadable quoted cell"


def csv_cells(line: str, delimiter: str = ",") -> list[str] | None:
    """The cells of one CSV line, or None when the csv module cannot read it (a cell beyond its
    size limit): the caller rejects that row, not the whole batch."""
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return None


class NotANumber(ValueError):
    """`str(exc)` is the reason, phrased to follow a field name ("is not a number")."""


def finite_number(text: str) -> float:
    """The finite number `text` spells (surrounding blanks ignored); NotANumber otherwise."""
    try:
        value = float(text.strip())
    except (ValueError, OverflowError):
        raise NotANumber("is not a number") from None
    if not math.isfinite(value):
        raise NotANumber("must be a finite number")
    return value


def utc_offset(sign: str, hours: str, minutes: str) -> timezone:
    """The zone of an offset such as +05:30 or -0800 (ISO 8601, FHIR, HL7 v2); ValueError if out
    of range (beyond 14 hours or 59 minutes)."""
    h, m = int(hours), int(minutes)
    if h > 14 or m > 59:
        raise ValueError("offset out of range")
    delta = timedelta(hours=h, minutes=m)
    return timezone(-delta if sign == "-" else delta)


def capped(violations: Sequence[V], summary: Callable[[int], V], limit: int = MAX_VIOLATIONS) -> list[V]:
    """At most `limit` violations, the last one saying how many more were left out."""
    if len(violations) <= limit:
        return list(violations)
    return [*violations[:limit], summary(len(violations) - limit)]
