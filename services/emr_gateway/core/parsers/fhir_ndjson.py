"""FHIR Bulk Data NDJSON (one resource per line) as per-patient bundles for the FHIR use case (pure),
read in two passes so that an import of any size is held a batch at a time, never whole.

Bulk exports write one file per resource type, so a patient's Observations may come long after
its Patient line: lines are grouped by the patient they name (the Patient's `id`, or
`subject.reference` "Patient/<id>") into one `batch` bundle per patient, which the same parser as
every other FHIR input then reads. Grouping looks at those two fields only; every check is the
parser's. A line that is no JSON object, or names no patient of the import, is its own bundle,
and gets its own outcome.

Pass 1 (`index_lines`) reads each line once, keeps where it starts, its length and its group in
compact arrays (24 bytes a line and one key a patient) and drops the parsed line. Pass 2
(`batches`) hands out the groups, patients in the order they first appear and then the single
lines, in batches of at most `max_groups` groups and about `max_bytes` of lines, which the caller
reads back (by offset) and parses again. Memory is thus bounded by a multiple of the largest batch
(or of the largest patient group, a record being one unit), whatever the import's size.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.normalize.fhir_r4 import read_json

_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z")
SINGLE = -1  # the group of a line that names no patient: parsed alone


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


@dataclass
class LineIndex:
    """Pass 1's result: per resource line (blank and unreadable lines have none) its offset, its
    length, its line number and its group (a patient's number in order of appearance, or SINGLE)."""

    offsets: array[int] = field(default_factory=lambda: array("q"))
    lengths: array[int] = field(default_factory=lambda: array("q"))
    numbers: array[int] = field(default_factory=lambda: array("q"))
    groups: array[int] = field(default_factory=lambda: array("q"))
    lines: int = 0  # lines read, blank ones included, so numbers match the file
    patients: int = 0


def _patient_key(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    subject = resource.get("subject")
    ref = subject.get("reference") if isinstance(subject, dict) else None
    m = _PATIENT_REF.search(ref) if isinstance(ref, str) else None
    return m.group(1) if m else None


def read_resource(raw: bytes) -> dict[str, Any]:
    """One line as a FHIR resource; InvalidArgument naming `$` or `resourceType` otherwise."""
    resource = read_json(raw)
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise InvalidArgument(
            "not a resource", [FieldProblem("resourceType", "each line must be one FHIR resource")]
        )
    return resource


def index_lines(lines: Iterable[bytes], on_problem: Callable[[LineProblem], None]) -> LineIndex:
    """Pass 1 over the lines in file order (each with its line end, as a binary file yields them):
    every resource line indexed, every line that is no resource told to `on_problem` at once."""
    index = LineIndex()
    keys: dict[str, int] = {}
    offset = 0
    for n, raw in enumerate(lines, start=1):
        index.lines = n
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        try:
            resource = read_resource(raw)
        except InvalidArgument as exc:
            for p in exc.violations:
                on_problem(LineProblem(n, p))
            continue
        key = _patient_key(resource)
        group = SINGLE if key is None else keys.setdefault(key, len(keys))
        index.offsets.append(start)
        index.lengths.append(len(raw))
        index.numbers.append(n)
        index.groups.append(group)
    index.patients = len(keys)
    return index


def batches(index: LineIndex, max_groups: int, max_bytes: int) -> Iterator[list[list[int]]]:
    """Pass 2's order: batches of groups, each group the positions (into the index's arrays) of its
    lines in file order; patients first, in order of appearance, then each single line alone.
    A batch closes at `max_groups` groups or once its lines reach `max_bytes`."""
    groups = np.frombuffer(index.groups, dtype=np.int64) if index.groups else np.empty(0, np.int64)
    order = np.argsort(np.where(groups == SINGLE, np.iinfo(np.int64).max, groups), kind="stable")
    lengths = np.frombuffer(index.lengths, dtype=np.int64) if index.lengths else np.empty(0, np.int64)
    batch: list[list[int]] = []
    size = 0
    at = 0
    while at < len(order):
        group = groups[order[at]]
        end = at + 1
        if group != SINGLE:
            while end < len(order) and groups[order[end]] == group:
                end += 1
        positions = order[at:end].tolist()
        batch.append(positions)
        size += int(lengths[order[at:end]].sum())
        at = end
        if len(batch) >= max_groups or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def read_group(index: LineIndex, positions: list[int], read: Callable[[int, int], bytes]) -> LineGroup:
    """A group's lines read back (`read(offset, length)`) and parsed again."""
    group = LineGroup()
    for p in positions:
        group.lines.append(index.numbers[p])
        group.resources.append(read_resource(read(index.offsets[p], index.lengths[p])))
    return group
