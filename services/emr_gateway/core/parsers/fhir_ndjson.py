"""FHIR Bulk Data NDJSON (one resource per line) as per-patient bundles for the FHIR use case (pure).

Bulk exports write one file per resource type, so a patient's Observations may come long after
its Patient line: lines are grouped by the patient they name (the Patient's `id`, or
`subject.reference` "Patient/<id>") into one `batch` bundle per patient, which the same parser as
every other FHIR input then reads. Grouping looks at those two fields only; every check is the
parser's. A line that is no JSON object, or names no patient of the import, is its own bundle,
and gets its own outcome.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.normalize.fhir_r4 import read_json

_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z")


@dataclass
class LineGroup:
    """One bundle to parse and the NDJSON line number (1-based) of each of its entries."""

    lines: list[int] = field(default_factory=list)
    resources: list[Any] = field(default_factory=list)

    def bundle(self) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": r} for r in self.resources]}


@dataclass(frozen=True)
class LineProblem:
    line: int
    problem: FieldProblem


def _patient_key(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    subject = resource.get("subject")
    ref = subject.get("reference") if isinstance(subject, dict) else None
    m = _PATIENT_REF.search(ref) if isinstance(ref, str) else None
    return m.group(1) if m else None


def group_lines(lines: Iterable[bytes]) -> tuple[list[LineGroup], list[LineProblem], int]:
    """(per-patient groups and single-line groups, lines that are no resource, lines read).
    Blank lines are skipped but counted, so line numbers match the file."""
    groups: dict[str, LineGroup] = {}
    singles: list[LineGroup] = []
    problems: list[LineProblem] = []
    n = 0
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            resource = read_json(raw)
        except InvalidArgument as exc:
            problems.extend(LineProblem(n, p) for p in exc.violations)
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            problems.append(
                LineProblem(n, FieldProblem("resourceType", "each line must be one FHIR resource"))
            )
            continue
        key = _patient_key(resource)
        group = groups.setdefault(key, LineGroup()) if key is not None else LineGroup()
        if key is None:
            singles.append(group)
        group.lines.append(n)
        group.resources.append(resource)
    # A resource that names a patient absent from the import is parsed alone: the parser says why.
    return [*groups.values(), *singles], problems, n
