"""Errors of the EMR gateway's normalizers: a parse failure names each bad field and why."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fibemrss.domain.errors import FieldProblem, InvalidArgument


@dataclass(frozen=True)
class FieldViolation(FieldProblem):
    """One bad field of an export, by its path in the source format.

    Paths follow the source: `entry[3].resource.valueQuantity.value` for FHIR,
    `OBX[2]-5` (the second OBX segment, field 5) or `MSH-9` for HL7 v2. A subclass of the shared
    `FieldProblem`, so a ParseError reaches the client as a `google.rpc.BadRequest` as it is.
    """


class ParseError(InvalidArgument):
    """The payload cannot be read as the format it claims to be. Never carries patient data:
    descriptions name fields and rules, not values from the payload."""

    def __init__(self, violations: Iterable[FieldViolation], message: str = "") -> None:
        self.field_violations: tuple[FieldViolation, ...] = tuple(violations)
        if not message:
            first = self.field_violations[0] if self.field_violations else None
            message = f"{first.field}: {first.description}" if first else "unreadable payload"
            if len(self.field_violations) > 1:
                message += f" (and {len(self.field_violations) - 1} more)"
        problems: list[FieldProblem] = list(self.field_violations)
        super().__init__(message, problems)
