"""What the gateway does, whatever transport asked: ingest a payload, review quarantine, read a
patient, stream training examples. gRPC (`edges/grpc_servicer.py`), MLLP and FHIR REST call the
same functions, so parsing, rules and audit exist once. No gRPC and no database here: the store
is a port, implemented by `adapters.store.GatewayStore`. Field names in errors are the request's
fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, Protocol

from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument
from fibemrss.domain.feature_extraction import TrainingExample, in_cohort, training_example
from fibemrss.domain.normalize.fhir_r4 import BundleParse, parse_bundle_object
from fibemrss.domain.normalize.parsing import DetailBudget
from fibemrss.domain.records import MAX_CSV_ROWS_PER_REQUEST, PatientRecord
from fibemrss.domain.tasks import get_task
from fibemrss.domain.text import text_problems
from services.emr_gateway.core.candidates import bundle_candidates, candidates_for
from services.emr_gateway.core.ingestion import (
    Candidate,
    Outcome,
    RecordStore,
    StoreOutcome,
    bound_details,
    collector_paused,
    ingest,
    resource_counts,
)
from services.emr_gateway.core.parsers.csv_mapping import load_profile, parse_with_profile
from services.emr_gateway.core.parsers.csv_profiles import PROFILES
from services.emr_gateway.core.parsers.fhir_consent import ConsentDecision, parse_consent
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.quarantine_review import Correction, corrected_record
from services.emr_gateway.core.study_decisions import StudyReview

QuarantineStatus = Literal["open", "accepted", "rejected"]
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined record. `record.source_patient_id` holds the patient key, never the raw id."""

    id: int
    patient_key: str
    record: PatientRecord
    reasons: tuple[str, ...]
    status: QuarantineStatus
    created_at: datetime
    resolved_at: datetime | None = None
    resolved_by: str = ""
    resolution_reason: str = ""


class GatewayStorePort(RecordStore, Protocol):
    def list_quarantine(
        self, status: QuarantineStatus = "open", after_id: int = 0, limit: int = 100
    ) -> list[QuarantineEntry]: ...

    def get_quarantined(self, entry_id: int) -> QuarantineEntry: ...

    def resolve_quarantine(
        self, entry_id: int, accepted: PatientRecord | None, actor: str, reason: str, expected_sha256: str
    ) -> tuple[QuarantineEntry, StoreOutcome | None]: ...

    def audit(self, actor: str, action: str, purpose: str, subject: str = "") -> None: ...

    def stats(self) -> dict[str, int]: ...

    def get_patient(self, patient_key: str) -> PatientRecord: ...

    def current_patients(self) -> Iterator[tuple[str, PatientRecord]]: ...

    def patient_key_for_source(self, source_system: str, source_id: str) -> str | None: ...

    def record_consent(self, patient_key: str, c: ConsentDecision, actor: str) -> StoreOutcome: ...

    def research_denied(self) -> set[str]: ...


@dataclass(frozen=True)
class IngestResult:
    outcomes: list[Outcome]
    resources: dict[str, int]


@dataclass(frozen=True)
class BundleIngest:
    """One FHIR bundle's parse and the fates of its candidates (one per patient record)."""

    parsed: BundleParse
    outcomes: list[Outcome]


@dataclass(frozen=True)
class CsvPayload:
    content: bytes
    profile: str = ""
    profile_file: bytes = b""  # a user profile (YAML or JSON) instead of a named one
    source_name: str = ""
    first_row: int = 0  # this batch's first data row within the whole export


@dataclass(frozen=True)
class QuarantinePage:
    entries: list[QuarantineEntry]
    next_after: int | None  # the id to continue after, None on the last page


def text_of(content: bytes, field: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            "content is not UTF-8", [FieldProblem(field, f"not valid UTF-8 at byte {exc.start}")]
        ) from None


def csv_candidates(payload: CsvPayload) -> list[Candidate]:
    """The export's rows as candidates; at most MAX_CSV_ROWS_PER_REQUEST of them, counted as they
    are parsed, so a request of many short rows is refused before it is held whole (the gateway
    holds a few KB per row until its batch is written)."""
    source = payload.source_name or "csv"
    # The violations the export's rows may keep between them (the answer lists no more): past
    # it a bad row still says it is rejected, with one line counting its problems.
    budget = DetailBudget()
    if payload.first_row < 0:
        raise InvalidArgument(
            "bad first row", [FieldProblem("csv.first_row", f"{payload.first_row} is negative")]
        )
    if payload.profile_file:
        if payload.profile:
            raise InvalidArgument(
                "two profiles", [FieldProblem("csv.profile", "set either profile or profile_file, not both")]
            )
        profile = load_profile(payload.profile_file)
        content = text_of(payload.content, "csv.content")
        rows = parse_with_profile(profile, content, source, payload.first_row, budget)
    else:
        parse = PROFILES.get(payload.profile)
        if parse is None:
            known = ", ".join(sorted(PROFILES))
            raise InvalidArgument(
                "unknown CSV profile",
                [FieldProblem("csv.profile", f"{payload.profile[:40]!r} is not one of {known}")],
            )
        rows = parse(text_of(payload.content, "csv.content"), source, payload.first_row, budget)
    candidates: list[Candidate] = []
    for r in rows:
        if len(candidates) == MAX_CSV_ROWS_PER_REQUEST:
            raise InvalidArgument(
                "too many rows",
                [
                    FieldProblem(
                        "csv.content",
                        f"more than {MAX_CSV_ROWS_PER_REQUEST} data rows; send the export in batches "
                        "of at most that many, each with the header and its csv.first_row",
                    )
                ],
            )
        candidates.append(Candidate(r.index, r.source_id, r.record, r.violations))
    return candidates


def listing_problems(purpose: str, size: int) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    if size < 0:
        problems.append(FieldProblem("page_size", "must not be negative"))
    if not purpose.strip():
        problems.append(FieldProblem("purpose", "say why quarantined records are read"))
    return problems + text_problems({"purpose": purpose})


def reader(actor: str, on_behalf_of: str) -> str:
    """Who a read is audited as. The inference service reads for its caller and must name it:
    an identity of the same hospital ("ehr@h"), recorded as "ehr@h via inference@h"."""
    if not actor.startswith("inference@"):
        return actor
    site = actor.partition("@")[2]
    role, at, caller_site = on_behalf_of.partition("@")
    if not (role and at and caller_site == site) or text_problems({"on_behalf_of": on_behalf_of}):
        raise InvalidArgument(
            "name the caller",
            [FieldProblem("on_behalf_of", f"name the identity this read is for, <role>@{site}")],
        )
    return f"{on_behalf_of} via {actor}"


class Gateway:
    def __init__(
        self,
        store: GatewayStorePort,
        pseudonyms: Pseudonymizer,
        on_outcomes: Callable[[Sequence[Outcome]], None] | None = None,
        studies: StudyReview | None = None,
    ) -> None:
        """`studies`: the hospital's study decisions; with them, training examples are exported
        only for a study document approved here (the service always wires them)."""
        self._store = store
        self._pseudonyms = pseudonyms
        self._studies = studies
        # Told every batch's fates, whatever transport brought it (metrics count them).
        self._on_outcomes = on_outcomes

    # -- ingestion -------------------------------------------------------------------------------
    def _ingest(self, candidates: Sequence[Candidate]) -> list[Outcome]:
        """The one write path of every edge (gRPC, MLLP, FHIR REST and NDJSON): the records'
        fates, each also told to `on_outcomes` (the metrics), whatever brought them."""
        outcomes = list(ingest(candidates, self._store, self._pseudonyms))
        if self._on_outcomes is not None:
            self._on_outcomes(outcomes)
        return outcomes

    def ingest_candidates(self, candidates: Sequence[Candidate]) -> IngestResult:
        outcomes = self._ingest(candidates)
        counts = resource_counts(candidates, outcomes)
        bound_details(outcomes)
        return IngestResult(outcomes, counts)

    @collector_paused()  # decode, map, check and write without the collector's rescans
    def ingest_payload(self, kind: str | None, content: bytes | CsvPayload) -> IngestResult:
        """`kind` is "fhir", "hl7v2" (content: bytes) or "csv" (content: a CsvPayload)."""
        if kind is None:
            raise InvalidArgument("empty request", [FieldProblem("payload", "set one of fhir, hl7v2, csv")])
        if isinstance(content, CsvPayload):
            return self.ingest_candidates(csv_candidates(content))
        return self.ingest_candidates(candidates_for(kind, content))

    @collector_paused()  # decode, map, check and write without the collector's rescans
    def ingest_messages(self, kind: str, payloads: Sequence[bytes]) -> list[IngestResult | InvalidArgument]:
        """Several "fhir" or "hl7v2" payloads (an MLLP listener's pending messages), each its own
        unit as in `ingest_payload`, written in as few database batches as their fates allow
        (`ingest_parsed`)."""
        results: list[IngestResult | InvalidArgument | None] = []
        parsed: list[list[Candidate]] = []
        for payload in payloads:
            try:
                parsed.append(self.parse_payload(kind, payload))
                results.append(None)
            except InvalidArgument as exc:
                results.append(exc)
        written = iter(self.ingest_parsed(parsed))
        return [next(written) if r is None else r for r in results]

    @collector_paused()
    def parse_payload(self, kind: str, payload: bytes) -> list[Candidate]:
        """A "fhir" or "hl7v2" payload's candidates, nothing written (InvalidArgument when the
        payload is refused whole): the MLLP listener parses each message as it arrives, while
        earlier ones are being written, then writes them together with `ingest_parsed`."""
        return candidates_for(kind, payload)

    @collector_paused()
    def ingest_parsed(self, parsed: Sequence[Sequence[Candidate]]) -> list[IngestResult]:
        """Each payload's candidates (`parse_payload`) written in as few database batches as their
        fates allow: a payload naming a source record that an earlier one of the batch names
        waits for the next batch, so the result is exactly that of ingesting them one after
        another, in order. One result per payload."""
        results: list[IngestResult | None] = [None] * len(parsed)
        pending = list(range(len(parsed)))
        while pending:
            batch: list[int] = []
            later: list[int] = []
            names: set[tuple[str, str]] = set()
            for i in pending:
                keys = {(c.record.provenance.source_system, c.source_id) for c in parsed[i] if c.record}
                if keys & names:
                    later.append(i)
                    continue
                names |= keys
                batch.append(i)
            outcomes = iter(self._ingest([c for i in batch for c in parsed[i]]))
            for i in batch:
                mine = [next(outcomes) for _ in parsed[i]]
                counts = resource_counts(parsed[i], mine)
                bound_details(mine)  # per message, as one message alone would be
                results[i] = IngestResult(mine, counts)
            pending = later
        return [r for r in results if r is not None]

    @collector_paused()  # decode, map, check and write without the collector's rescans
    def ingest_fhir_bundles(self, bundles: Sequence[Any]) -> list[BundleIngest | InvalidArgument]:
        """FHIR bundles already read from JSON (REST batch, transaction, NDJSON import groups),
        written as one batch. A bundle refused whole (unreadable, or a transaction with a bad entry)
        gets its error in its place and writes nothing."""
        parsed: list[BundleParse | InvalidArgument] = []
        candidates: list[Candidate] = []
        for bundle in bundles:
            try:
                one = parse_bundle_object(bundle)
            except InvalidArgument as exc:
                parsed.append(exc)
                continue
            parsed.append(one)
            candidates.extend(bundle_candidates(one))
        outcomes = iter(self._ingest(candidates))
        out: list[BundleIngest | InvalidArgument] = []
        for p in parsed:
            if isinstance(p, InvalidArgument):
                out.append(p)
            else:
                n = len(p.records) + len(p.rejected) + (1 if p.unattributed else 0)
                mine = [next(outcomes) for _ in range(n)]
                bound_details(mine)  # per bundle, as one bundle alone would be
                out.append(BundleIngest(p, mine))
        return out

    # -- quarantine review -------------------------------------------------------------------------
    def list_quarantine(
        self, actor: str, purpose: str, status: QuarantineStatus, after: int, size: int
    ) -> QuarantinePage:
        """One page of held records, audited with the caller's purpose."""
        problems = listing_problems(purpose, size)
        if problems:
            raise InvalidArgument("invalid listing request", problems)
        size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        entries = self._store.list_quarantine(status, after, size + 1)
        more = len(entries) > size
        entries = entries[:size]
        self._store.audit(actor, "list_quarantine", purpose, f"status={status} n={len(entries)}")
        return QuarantinePage(entries, entries[-1].id if more and entries else None)

    def read_quarantined(self, actor: str, entry_id: int, purpose: str) -> QuarantineEntry:
        """One held record as the gateway keeps it (pseudonymous), audited as a read of its patient."""
        entry = self._store.get_quarantined(entry_id)
        self._store.audit(actor, "read_quarantined", purpose, entry.patient_key)
        return entry

    def resolve_quarantine(
        self,
        actor: str,
        entry_id: int,
        accept: bool | None,
        corrections: Sequence[Correction],
        reason: str,
    ) -> tuple[QuarantineEntry, StoreOutcome | None]:
        """Accept (with corrections) or reject one held record; `accept` None: not said. The
        resolution, the stored record and the audit row commit together."""
        problems: list[FieldProblem] = []
        if entry_id <= 0:
            problems.append(FieldProblem("id", "is required"))
        if accept is None:
            problems.append(FieldProblem("resolution", "must be RESOLUTION_ACCEPT or RESOLUTION_REJECT"))
        if accept is False and corrections:
            problems.append(FieldProblem("corrections", "only an accepted record can be corrected"))
        if not reason.strip():
            problems.append(FieldProblem("reason", "say why; it is written to the audit log"))
        problems += text_problems({"reason": reason})
        if problems:
            raise InvalidArgument("invalid resolution", problems)
        entry = self._store.get_quarantined(entry_id)
        accepted = corrected_record(entry.record, list(corrections)) if accept else None
        return self._store.resolve_quarantine(
            entry.id, accepted, actor, reason, entry.record.provenance.payload_sha256
        )

    # -- reads -------------------------------------------------------------------------------------
    def read_patient(
        self, actor: str, patient_key: str, purpose: str, on_behalf_of: str = ""
    ) -> PatientRecord:
        """One patient by key, audited as the real caller: a service reading for someone names them."""
        actor = reader(actor, on_behalf_of)
        if not patient_key:
            raise InvalidArgument("patient_key is required", [FieldProblem("patient_key", "is required")])
        if not purpose:
            raise InvalidArgument(
                "purpose is required", [FieldProblem("purpose", "say why the record is read")]
            )
        if problems := text_problems({"patient_key": patient_key, "purpose": purpose}):
            raise InvalidArgument("text that cannot be stored", problems)
        record = self._store.get_patient(patient_key)
        self._store.audit(actor, "read_patient", purpose, patient_key)
        return record

    def training_examples(self, actor: str, task_name: str, purpose: str) -> Iterator[TrainingExample]:
        """Every current patient of the study's cohort, with the study's features; audited once
        per stream. Patients outside the cohort are never read into an example, nor any whose
        latest research Consent denies (that exclusion is audited too)."""
        task = get_task(task_name)
        if problems := text_problems({"purpose": purpose}):
            raise InvalidArgument("text that cannot be stored", problems)
        if self._studies is not None and (refusal := self._studies.export_problem(task)):
            self._store.audit(actor, "training_export_refused", purpose or "training", task_name)
            raise FailedPrecondition(refusal)
        denied = self._store.research_denied()
        self._store.audit(actor, "stream_training_examples", purpose or "training", task_name)
        excluded = 0
        for key, record in self._store.current_patients():
            if key in denied:
                excluded += 1
                continue
            if in_cohort(task, record):
                yield training_example(task, key, record)
        if excluded:
            self._store.audit(actor, "consent_excluded", purpose or "training", f"{task_name} n={excluded}")

    # -- consent -----------------------------------------------------------------------------------
    def record_consent(self, actor: str, resource: Any) -> tuple[str, StoreOutcome]:
        """A FHIR Consent about research use: (the patient key, accepted or duplicate). The
        decision is kept with its provenance and audited with the caller's identity."""
        c = parse_consent(resource)
        if c.patient_identifier:
            key = self._pseudonyms.patient_key(c.source_system, c.patient_identifier)
        else:
            # The Patient's record is stored under the keyed hash of its resource id.
            found = self._store.patient_key_for_source(
                c.source_system, self._pseudonyms.source_id(c.source_system, c.patient_id)
            )
            if found is None:
                raise InvalidArgument(
                    "unknown patient",
                    [
                        FieldProblem(
                            "patient.reference",
                            f"no patient with this id from source system {c.source_system[:60]} is stored; "
                            "send it after the Patient, or name patient.identifier",
                        )
                    ],
                )
            key = found
        # Kept with its provenance, the Consent's own id as a keyed hash (idempotency holds).
        kept = replace(
            c,
            patient_identifier="",
            patient_id="",
            source_id=self._pseudonyms.source_id(c.source_system, c.source_id),
        )
        return key, self._store.record_consent(key, kept, actor)

    def stats(self) -> dict[str, int]:
        return self._store.stats()
