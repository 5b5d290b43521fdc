"""Small readers every input format shares (pure): numbers, UTC offsets, violation lists capped
while they are produced."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta, timezone
from typing import Generic, TypeVar

V = TypeVar("V")

MAX_VIOLATIONS = 100  # per payload: enough to fix it, bounded so a junk payload stays small
# Violations kept over one payload's records (a bundle's patients, an export's rows): past them a
# rejected record keeps its fate and one line counting its problems. The answer reports no more
# (`services/emr_gateway/core/ingestion.MAX_DETAILS_PER_BATCH`), so none is held for nothing.
MAX_DETAILS = 1000


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


class DetailBudget:
    """How many violations one payload may still keep, shared by the `Violations` of its records."""

    def __init__(self, left: int = MAX_DETAILS) -> None:
        self.left = left

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


class Violations(Generic[V]):
    """A violation list capped while it is produced: the first `limit` (and no more than `budget`
    allows) are made and kept, the rest only counted, so a payload of a million bad fields costs
    a counter, not a million objects. `listed` ends with one more saying how many were left out.

    `make(field, description)` builds one (a FieldViolation, a FieldProblem): it is called only
    for the violations kept."""

    def __init__(
        self, make: Callable[[str, str], V], limit: int = MAX_VIOLATIONS, budget: DetailBudget | None = None
    ) -> None:
        self._make = make
        self._limit = limit
        self._budget = budget
        self.kept: list[V] = []
        self.total = 0

    def add(self, field: str, description: str) -> None:
        self.total += 1
        if len(self.kept) < self._limit and (self._budget is None or self._budget.take()):
            self.kept.append(self._make(field, description))

    @property
    def omitted(self) -> int:
        return self.total - len(self.kept)

    def __bool__(self) -> bool:
        return self.total > 0

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[V]:
        return iter(self.kept)

    def listed(self, where: str) -> list[V]:
        """The kept violations, then one under `where` counting those left out (if any)."""
        if not self.omitted:
            return list(self.kept)
        return [*self.kept, self._make(where, f"{self.omitted} more violations not listed")]
