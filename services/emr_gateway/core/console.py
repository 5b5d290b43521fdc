"""What the hospital console asks of the gateway beyond the use cases every transport shares
(quarantine review and ingestion in `use_cases.Gateway`, study review and decisions in
`study_decisions.StudyReview`, which the console calls as they are): the audit search, the privacy
ledger and its budget, the models and their retirement, consent, and the federation as the
hospital's own database records it. No HTTP and no database here: the store is a port
(`adapters.console_reads.ConsoleReads`). Every read of the audit is itself audited, and every
decision is recorded with the person's identity as the edge gives it.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.privacy import Budget, PrivacySpend, total
from fibemrss.domain.site_policy import StudyDecision
from fibemrss.domain.study import study_hash, study_to_json
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.text import text_problems

MAX_AUDIT_ROWS = 500  # a page of the audit search
MAX_AUDIT_EXPORT = 50_000  # rows of one CSV export


@dataclass(frozen=True)
class AuditQuery:
    patient_key: str = ""
    caller: str = ""
    action: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (
                ("patient_key", self.patient_key),
                ("caller", self.caller),
                ("action", self.action),
                ("since", self.since.isoformat() if self.since else ""),
                ("until", self.until.isoformat() if self.until else ""),
            )
            if v
        ]
        return " ".join(parts) or "everything"


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    purpose: str
    subject: str


@dataclass(frozen=True)
class ModelRow:
    task: str
    version: int
    federated_round: int
    kind: str
    base_version: int | None
    standby: bool
    metrics: dict[str, Any]
    published_at: datetime
    published_by: str
    retired_at: datetime | None
    retired_by: str
    retire_reason: str


@dataclass(frozen=True)
class ConsentRow:
    patient_key: str
    decision: str
    decided_at: datetime | None
    recorded_by: str
    recorded_at: datetime


@dataclass(frozen=True)
class ConsentSummary:
    patients_denying: int
    patients_permitting: int
    decisions: int
    latest: list[ConsentRow]


@dataclass(frozen=True)
class DatasetPrivacy:
    dataset: str
    budget: Budget | None
    spent_epsilon: float
    spent_delta: float
    spends: list[PrivacySpend]

    @property
    def over_budget(self) -> bool:
        return self.budget is not None and (
            self.spent_epsilon > self.budget.epsilon or self.spent_delta > self.budget.delta
        )


@dataclass(frozen=True)
class StudyActivity:
    """One study as this hospital's records see its federation: what was exported, refused,
    spent and published."""

    study: str
    exports: int
    refused_exports: list[AuditRow]
    rounds_spent: int
    models: int
    last_round: int | None
    last_activity: datetime | None


@dataclass(frozen=True)
class StudyDiff:
    approved_hash: str
    lines: list[str]  # a unified diff of the canonical documents, approved version first


class ConsoleStorePort(Protocol):
    def search_audit(self, q: AuditQuery, limit: int) -> list[AuditRow]: ...

    def audit(self, actor: str, action: str, purpose: str, subject: str = "") -> None: ...

    def consent_summary(self, latest: int) -> ConsentSummary: ...

    def model_versions(self) -> list[ModelRow]: ...

    def retire_model(self, task: str, version: int, actor: str, reason: str) -> None: ...

    def privacy_datasets(self) -> list[str]: ...

    def privacy_budget(self, dataset: str) -> Budget | None: ...

    def privacy_spends(self, dataset: str) -> list[PrivacySpend]: ...

    def set_budget(self, dataset: str, epsilon: float, delta: float, actor: str) -> None: ...

    def study_decisions(self) -> list[StudyDecision]: ...

    def approved_document(self, study: str) -> tuple[str, str] | None: ...

    def study_activity(self) -> list[StudyActivity]: ...


def parse_time(text: str, field: str) -> datetime | None:
    """An ISO 8601 date or date-time from a form ("" is None); naive times are UTC."""
    text = text.strip()
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            "bad time", [FieldProblem(field, "is not an ISO 8601 date or date-time (2026-12-07T10:00)")]
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def audit_query(patient_key: str, caller: str, action: str, since: str, until: str) -> AuditQuery:
    fields = {"patient_key": patient_key, "caller": caller, "action": action}
    problems = text_problems(fields)
    problems += [FieldProblem(k, "at most 200 characters") for k, v in fields.items() if len(v) > 200]
    try:
        start = parse_time(since, "since")
    except InvalidArgument as exc:
        problems += exc.violations
        start = None
    try:
        end = parse_time(until, "until")
    except InvalidArgument as exc:
        problems += exc.violations
        end = None
    if start and end and end <= start:
        problems.append(FieldProblem("until", "must be after since"))
    if problems:
        raise InvalidArgument("invalid audit search", problems)
    return AuditQuery(patient_key.strip(), caller.strip(), action.strip(), start, end)


class HospitalConsole:
    def __init__(self, store: ConsoleStorePort) -> None:
        self._store = store

    # -- audit -------------------------------------------------------------------------------------
    def search_audit(self, actor: str, q: AuditQuery, export: bool = False) -> list[AuditRow]:
        """The rows matching `q`, newest first; the search is audited (a search by patient key
        is a read about that patient, so the key is the audit row's subject)."""
        limit = MAX_AUDIT_EXPORT if export else MAX_AUDIT_ROWS
        rows = self._store.search_audit(q, limit)
        self._store.audit(
            actor, "export_audit" if export else "search_audit", q.describe()[:1000], q.patient_key
        )
        return rows

    # -- privacy -----------------------------------------------------------------------------------
    def privacy(self) -> list[DatasetPrivacy]:
        out = []
        for dataset in self._store.privacy_datasets():
            spends = self._store.privacy_spends(dataset)
            epsilon, delta = total(spends)
            out.append(DatasetPrivacy(dataset, self._store.privacy_budget(dataset), epsilon, delta, spends))
        return out

    def set_budget(self, actor: str, dataset: str, epsilon: str, delta: str) -> Budget:
        """A dataset's budget from a form's text; the agent refuses rounds beyond it."""
        problems = text_problems({"dataset": dataset})
        if not dataset.strip() or len(dataset) > 100:
            problems.append(FieldProblem("dataset", "name the dataset (the agent's FIBEMRSS_DATASET)"))
        eps = _number(epsilon, "epsilon", problems)
        dlt = _number(delta, "delta", problems)
        if eps is not None and eps < 0:
            problems.append(FieldProblem("epsilon", "must be zero or more"))
        if dlt is not None and not 0 <= dlt < 1:
            problems.append(FieldProblem("delta", "must be at least 0 and below 1"))
        if problems or eps is None or dlt is None:
            raise InvalidArgument("invalid budget", problems)
        self._store.set_budget(dataset.strip(), eps, dlt, actor)
        return Budget(eps, dlt)

    # -- models ------------------------------------------------------------------------------------
    def models(self) -> dict[str, list[ModelRow]]:
        by_task: dict[str, list[ModelRow]] = {}
        for m in self._store.model_versions():
            by_task.setdefault(m.task, []).append(m)
        return by_task

    def retire_model(self, actor: str, task: str, version: str, reason: str) -> int:
        problems = text_problems({"task": task, "reason": reason})
        if not reason.strip():
            problems.append(FieldProblem("reason", "say why; it is written to the audit log"))
        if len(reason) > 500:
            problems.append(FieldProblem("reason", "at most 500 characters"))
        try:
            number = int(version)
        except ValueError:
            problems.append(FieldProblem("version", "must be a whole number"))
            number = 0
        if problems:
            raise InvalidArgument("invalid retirement", problems)
        self._store.retire_model(task, number, actor, reason)
        return number

    # -- consent, studies, federation --------------------------------------------------------------
    def consent(self, actor: str) -> ConsentSummary:
        summary = self._store.consent_summary(latest=25)
        self._store.audit(actor, "read_consent_summary", "console", f"n={len(summary.latest)}")
        return summary

    def study_decisions(self) -> list[StudyDecision]:
        return list(reversed(self._store.study_decisions()))

    def approved_before(self, task: TaskSpec) -> StudyDiff | None:
        """How this document differs from the version of the study approved here last (None when
        none was approved, or when it is that version)."""
        found = self._store.approved_document(task.name)
        if found is None:
            return None
        digest, document = found
        if digest == study_hash(task):
            return None
        before = json.dumps(json.loads(document), indent=2, sort_keys=True).splitlines()
        now = json.dumps(study_to_json(task), indent=2, sort_keys=True).splitlines()
        lines = [
            line
            for line in difflib.unified_diff(before, now, "approved", "proposed", lineterm="", n=1)
            if not line.startswith(("---", "+++"))
        ]
        return StudyDiff(digest, lines)

    def note_sign_in(self, actor: str, roles: str) -> None:
        self._store.audit(actor, "console_sign_in", f"roles={roles}", "")

    def federation(self) -> list[StudyActivity]:
        return self._store.study_activity()


def _number(text: str, field: str, problems: list[FieldProblem]) -> float | None:
    try:
        value = float(text)
    except ValueError:
        problems.append(FieldProblem(field, "must be a number"))
        return None
    if not math.isfinite(value):
        problems.append(FieldProblem(field, "must be a finite number"))
        return None
    return value
