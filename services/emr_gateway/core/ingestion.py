"""Decides each parsed record's fate (accepted, duplicate, quarantined, rejected) and stores it.

Pure of transport: the servicer converts protobuf in and out; the store is passed in. The order
of the checks is the contract: unsupported, rejected (violations, missing required fields,
impossible dates), duplicate or contradictory within the batch, quarantined (implausible values
or dates, or values that contradict each other), then written (units converted to one canonical unit per code).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Literal, Protocol

from fibemrss.domain.errors import FieldProblem
from fibemrss.domain.normalize.cross_field import cross_field_reasons
from fibemrss.domain.normalize.plausibility import canonical, check_observation
from fibemrss.domain.records import MAX_AGE_YEARS, PatientRecord
from fibemrss.domain.text import text_problem
from services.emr_gateway.core.pseudonym import Pseudonymizer

Fate = Literal["accepted", "duplicate", "quarantined", "rejected", "unsupported"]
StoreOutcome = Literal["accepted", "duplicate"]
# Clocks of senders drift and time zones shift a date by a day: only later than this is "future".
CLOCK_SKEW = timedelta(days=1)
# A record with hundreds of bad dates gets a readable list, not hundreds of lines.
MAX_REASONS = 20
# The collector stays off at most this long while batches keep overlapping (see `collector_paused`).
MAX_COLLECTOR_PAUSE_SECONDS = 2.0
# What one response reports: every record's fate, but reasons and violations only up to this many
# over the batch, so a batch of junk entries cannot make a response many times its own size.
MAX_DETAILS_PER_BATCH = 1000


@dataclass(frozen=True)
class Write:
    """One record for the store: saved as a new version, or held in quarantine with reasons.
    `record` is already in its form at rest (`at_rest`): its identifiers are keyed hashes."""

    record: PatientRecord
    patient_key: str
    reasons: tuple[str, ...] = ()

    @property
    def quarantined(self) -> bool:
        return bool(self.reasons)


class RecordStore(Protocol):
    def write_batch(self, writes: Sequence[Write]) -> list[StoreOutcome]: ...


@dataclass(frozen=True)
class Candidate:
    """A record as a parser produced it: either a record or the violations that reject it."""

    index: int
    source_id: str
    record: PatientRecord | None
    violations: tuple[FieldProblem, ...] = ()
    unsupported_reason: str = ""


@dataclass
class Outcome:
    index: int
    source_id: str
    fate: Fate
    reasons: list[str] = field(default_factory=list)
    violations: tuple[FieldProblem, ...] = ()
    patient_key: str = ""


class _CollectorPause:
    """Shared by every thread that ingests: the collector is off while any batch is in flight."""

    lock = threading.Lock()
    holders = 0
    was_enabled = False
    since = 0.0


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector kept out of one payload's decode, mapping and checks.

    Decoding a bundle makes hundreds of thousands of small dicts and lists that all stay alive
    until the batch is written; every 700 allocations the collector scans the young ones, and
    as they survive and are promoted it rescans them, then the whole heap: about half of a
    bundle's decode time went there, for nothing, since a JSON tree has no reference cycles and
    reference counting frees it when the batch is done. The collector is process-wide and the
    edges ingest on several threads at once, so the pause is counted: the first batch in turns
    it off, the last one out turns it back on (only if it was on). Should batches overlap without
    a break for over MAX_COLLECTOR_PAUSE_SECONDS, a finishing batch runs one collection, so
    cyclic garbage made meanwhile (exception tracebacks, mostly) stays bounded.
    """
    pause = _CollectorPause
    with pause.lock:
        if pause.holders == 0:
            pause.was_enabled = gc.isenabled()
            pause.since = time.monotonic()
            gc.disable()
        pause.holders += 1
    try:
        yield
    finally:
        collect = False
        with pause.lock:
            pause.holders -= 1
            if pause.holders == 0:
                if pause.was_enabled:
                    gc.enable()
            elif time.monotonic() - pause.since > MAX_COLLECTOR_PAUSE_SECONDS:
                pause.since = time.monotonic()
                collect = pause.was_enabled
        if collect:
            gc.collect()


def plausibility_reasons(record: PatientRecord, now: datetime | None = None) -> list[str]:
    """Why this record is suspicious (implausible values, units or dates, or values that
    contradict each other: `cross_field.CROSS_FIELD_RULES`); empty when it is not."""
    reasons: list[str] = []
    for obs in record.observations:
        reasons.extend(check_observation(obs))
    if record.age_years is not None and not 0 <= record.age_years <= 120:
        reasons.append(f"age {record.age_years:g} years is outside the plausible range 0-120")
    reasons.extend(date_reasons(record, now or datetime.now(UTC)))
    reasons.extend(cross_field_reasons(record))
    reasons = list(dict.fromkeys(reasons))  # one line per distinct problem
    if len(reasons) > MAX_REASONS:
        reasons = [*reasons[:MAX_REASONS], f"{len(reasons) - MAX_REASONS} more reasons not listed"]
    return reasons


def date_reasons(record: PatientRecord, now: datetime) -> list[str]:
    """Dates in the future, and a birth date meaning an age over MAX_AGE_YEARS today (a birth in
    the future is rejected earlier: see `required_field_problems`; dates before the birth are a
    cross-field rule)."""
    reasons: list[str] = []
    latest = now + CLOCK_SKEW
    birth = record.birth_date
    if birth is not None and birth < (now - timedelta(days=365.25 * MAX_AGE_YEARS)).date():
        reasons.append(f"birth date means an age over {MAX_AGE_YEARS} years")
    dated: list[tuple[str, datetime | None]] = [
        (f"observation {o.code.code}", o.effective) for o in record.observations
    ]
    dated += [(f"condition {c.code.code}", c.onset) for c in record.conditions]
    # An encounter is named by its place in the record: its id is a source identifier.
    dated += [(f"encounters[{i}]", e.start) for i, e in enumerate(record.encounters)]
    for what, when in dated:
        if when is not None and when > latest:
            reasons.append(f"{what} is dated in the future ({when.date().isoformat()})")
    return reasons


def required_field_problems(record: PatientRecord, today: date) -> list[FieldProblem]:
    """What makes a record impossible to store: no identity, no provenance, or an impossible date."""
    problems: list[FieldProblem] = []
    if not record.source_patient_id.strip():
        problems.append(FieldProblem("source_patient_id", "is required"))
    p = record.provenance
    for name, value in (
        ("source_system", p.source_system),
        ("source_id", p.source_id),
        ("payload_sha256", p.payload_sha256),
    ):
        if not value.strip():
            problems.append(FieldProblem(f"provenance.{name}", "is required"))
    if record.birth_date is not None and record.birth_date > today + CLOCK_SKEW:
        problems.append(FieldProblem("birth_date", "is in the future"))
    return problems + _text_problems(record)


def _text_problems(record: PatientRecord) -> list[FieldProblem]:
    """Text PostgreSQL cannot store: a NUL character, or a lone surrogate (JSON allows both)."""
    texts: list[tuple[str, str | None]] = [("source_patient_id", record.source_patient_id)]
    texts += [(f"provenance.{k}", v) for k, v in vars(record.provenance).items()]
    texts.append(("sex", record.sex))
    for i, o in enumerate(record.observations):
        path = f"observations[{i}]"
        texts += [(f"{path}.code", v) for v in (o.code.system, o.code.code, o.code.display)]
        texts += [(f"{path}.unit", o.unit), (f"{path}.source_id", o.source_id)]
        if o.value_code is not None:
            # display too: a quarantined record is kept as sent, display and all
            texts += [
                (f"{path}.value_code", v)
                for v in (o.value_code.system, o.value_code.code, o.value_code.display)
            ]
    for i, c in enumerate(record.conditions):
        texts += [(f"conditions[{i}].code", v) for v in (c.code.system, c.code.code, c.code.display)]
        texts += [(f"conditions[{i}].clinical_status", c.clinical_status)]
        texts += [(f"conditions[{i}].source_id", c.source_id)]
    for i, e in enumerate(record.encounters):
        texts += [(f"encounters[{i}].source_id", e.source_id), (f"encounters[{i}].class_code", e.class_code)]
    return [FieldProblem(path, why) for path, text in texts if text and (why := text_problem(text))]


def at_rest(record: PatientRecord, patient_key: str, pseudonyms: Pseudonymizer) -> PatientRecord:
    """The record as the store keeps it: the patient key where the source patient id was, and the
    keyed hash of every source identifier (the record's, and each observation's, condition's and
    encounter's), so that no identifier a source system sent is held at rest."""
    system = record.provenance.source_system

    def hashed(source_id: str) -> str:
        return pseudonyms.source_id(system, source_id)

    return replace(
        record,
        source_patient_id=patient_key,
        provenance=replace(record.provenance, source_id=hashed(record.provenance.source_id)),
        observations=tuple(replace(o, source_id=hashed(o.source_id)) for o in record.observations),
        conditions=tuple(replace(c, source_id=hashed(c.source_id)) for c in record.conditions),
        encounters=tuple(replace(e, source_id=hashed(e.source_id)) for e in record.encounters),
    )


def ingest(
    candidates: Iterable[Candidate],
    store: RecordStore,
    pseudonyms: Pseudonymizer,
    now: datetime | None = None,
) -> list[Outcome]:
    """Every candidate's fate, in input order; the writes go to the store as one batch."""
    now = now or datetime.now(UTC)
    outcomes: list[Outcome] = []
    writes: list[Write] = []
    written: list[int] = []  # index into outcomes of each write
    # (source system, source id) -> (payload hash, index of the first record) within this batch
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for c in candidates:
        if c.unsupported_reason:
            outcomes.append(Outcome(c.index, c.source_id, "unsupported", [c.unsupported_reason]))
            continue
        problems = list(c.violations)
        if c.record is not None:
            problems += required_field_problems(c.record, now.date())
        if c.record is None or problems:
            outcomes.append(
                Outcome(c.index, c.source_id, "rejected", [p.description for p in problems], tuple(problems))
            )
            continue
        record = c.record
        p = record.provenance
        key = pseudonyms.patient_key(p.source_system, record.source_patient_id)
        first = seen.get((p.source_system, p.source_id))
        if first is not None and first[0] == p.payload_sha256:
            outcomes.append(Outcome(c.index, c.source_id, "duplicate", patient_key=key))
            continue
        reasons = plausibility_reasons(record, now)
        if first is not None:
            # Two different contents for one source record in one batch: which one is right is a
            # question for a person, so the later one waits in quarantine.
            reasons.insert(
                0,
                f"contradicts record {first[1]} of this batch (same source system and source id, "
                "different content)",
            )
        else:
            seen[(p.source_system, p.source_id)] = (p.payload_sha256, c.index)
        written.append(len(outcomes))
        kept = at_rest(record, key, pseudonyms)
        if reasons:
            # Suspicious, not wrong beyond doubt: kept as sent (identifiers hashed), with its
            # reasons, for a person.
            writes.append(Write(kept, key, tuple(reasons)))
            outcomes.append(Outcome(c.index, c.source_id, "quarantined", reasons, patient_key=key))
        else:
            writes.append(Write(canonical(kept), key))
            outcomes.append(Outcome(c.index, c.source_id, "accepted", patient_key=key))
    if writes:
        for i, stored in zip(written, store.write_batch(writes), strict=True):
            if stored == "duplicate":
                outcomes[i].fate = "duplicate"
    return outcomes


def bound_details(outcomes: Sequence[Outcome]) -> None:
    """In place: each record's reasons and violations capped at MAX_REASONS, and once the batch
    has reported MAX_DETAILS_PER_BATCH of them, later records keep their fate only (the first of
    them says so). Nothing about what was stored changes: quarantined records keep every reason."""
    left = MAX_DETAILS_PER_BATCH
    said = False
    for o in outcomes:
        if not (o.reasons or o.violations):
            continue
        if left <= 0:
            o.reasons = (
                [] if said else [f"details omitted: this batch already reported {MAX_DETAILS_PER_BATCH}"]
            )
            o.violations = ()
            said = True
            continue
        if len(o.reasons) > MAX_REASONS:
            o.reasons = [*o.reasons[: MAX_REASONS - 1], f"{len(o.reasons) - MAX_REASONS + 1} more not listed"]
        if len(o.violations) > MAX_REASONS:
            extra = len(o.violations) - MAX_REASONS + 1
            o.violations = (
                *o.violations[: MAX_REASONS - 1],
                FieldProblem("record", f"{extra} more not listed"),
            )
        left -= max(len(o.reasons), len(o.violations))


def resource_counts(candidates: Iterable[Candidate], outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Normalized items of the records read, by kind; rejected and unsupported ones do not count."""
    counts: Counter[str] = Counter()
    fates = {(o.index, o.source_id): o.fate for o in outcomes}
    for c in candidates:
        if c.record is None or fates.get((c.index, c.source_id)) in ("rejected", "unsupported"):
            continue
        counts["Patient"] += 1
        counts["Observation"] += len(c.record.observations)
        counts["Condition"] += len(c.record.conditions)
        counts["Encounter"] += len(c.record.encounters)
    return dict(counts)
