"""Study review and approval at a hospital (domain core: no gRPC, no database).

The hospital's operator reviews a proposed study document: what it reads, how many of the
hospital's patients it may read (counted here, by the hospital's own gateway, with the export's
own rules: cohort and research Consent), what model code it would run and what privacy it
spends, against the hospital's site policy. A decision is recorded with the document's hash; a
study breaking the policy cannot be approved. The export of training examples asks
`approval_problem` first, so a study not approved here never leaves with a value. A model is
judged by its name only: nothing here imports a factory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument
from fibemrss.domain.feature_extraction import in_cohort
from fibemrss.domain.records import PatientRecord
from fibemrss.domain.site_policy import (
    SitePolicy,
    StudyDecision,
    approval_problem,
    policy_problems,
    study_code_systems,
    study_epsilon,
)
from fibemrss.domain.study import parse_study_field, study_hash
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.text import text_problems


class StudyStorePort(Protocol):
    def site_policy(self) -> tuple[SitePolicy, bool]: ...

    def record_decision(
        self, task: TaskSpec, decision: str, reason: str, eligible: int | None, actor: str
    ) -> StudyDecision: ...

    def latest_decision(self, study: str, digest: str) -> StudyDecision | None: ...


class PatientsPort(Protocol):
    def current_patients(self) -> Iterator[tuple[str, PatientRecord]]: ...

    def research_denied(self) -> set[str]: ...

    def audit(self, actor: str, action: str, purpose: str, subject: str = "") -> None: ...


@dataclass(frozen=True)
class Review:
    task: TaskSpec
    study_hash: str
    patients: int
    eligible: int
    consent_excluded: int
    policy: SitePolicy
    policy_set: bool
    problems: list[FieldProblem]
    decision: StudyDecision | None
    code_systems: list[str]
    epsilon: float | None


def parse_document(document: bytes) -> TaskSpec:
    """The study of a request's `document`; InvalidArgument naming `document.<field>`."""
    return parse_study_field(document)


class StudyReview:
    def __init__(self, hospital: str, patients: PatientsPort, studies: StudyStorePort) -> None:
        self._hospital = hospital
        self._patients = patients
        self._studies = studies

    def _count(self, task: TaskSpec) -> tuple[int, int, int]:
        """(current patients, eligible for the study, left out by research Consent)."""
        denied = self._patients.research_denied()
        total = eligible = excluded = 0
        for key, record in self._patients.current_patients():
            total += 1
            if not in_cohort(task, record):
                continue
            if key in denied:
                excluded += 1
            else:
                eligible += 1
        return total, eligible, excluded

    def review(self, actor: str, document: bytes) -> Review:
        task = parse_document(document)
        digest = study_hash(task)
        total, eligible, excluded = self._count(task)
        policy, policy_set = self._studies.site_policy()
        self._patients.audit(actor, "review_study", f"eligible={eligible}", f"{task.name} {digest}")
        return Review(
            task,
            digest,
            total,
            eligible,
            excluded,
            policy,
            policy_set,
            policy_problems(policy, task, eligible),
            self._studies.latest_decision(task.name, digest),
            study_code_systems(task),
            study_epsilon(task),
        )

    def decide(self, actor: str, document: bytes, approve: bool, reason: str) -> StudyDecision:
        """Records the decision on the document's hash. Approving re-counts the eligible patients
        and checks the site policy: FailedPrecondition naming every rule the study breaks."""
        problems = text_problems({"reason": reason})
        if not approve and not reason.strip():
            problems.append(FieldProblem("reason", "say why the study is refused; it is audited"))
        if len(reason) > 500:
            problems.append(FieldProblem("reason", "at most 500 characters"))
        if problems:
            raise InvalidArgument("invalid decision", problems)
        task = parse_document(document)
        if not approve:
            return self._studies.record_decision(task, "refused", reason, None, actor)
        _, eligible, _ = self._count(task)
        policy, _ = self._studies.site_policy()
        broken = policy_problems(policy, task, eligible)
        if broken:
            self._patients.audit(
                actor, "study_approval_refused_by_policy", "; ".join(p.field for p in broken), task.name
            )
            raise FailedPrecondition(
                f"study {task.name} breaks the site policy of hospital {self._hospital}: "
                + "; ".join(f"{p.field}: {p.description}" for p in broken)
            )
        return self._studies.record_decision(task, "approved", reason, eligible, actor)

    def export_problem(self, task: TaskSpec) -> str:
        """Why the gateway may not export for this study ("" when its hash is approved here and
        the site policy, as it is now, still allows its model, privacy and code systems)."""
        digest = study_hash(task)
        problem = approval_problem(
            self._hospital, task.name, digest, self._studies.latest_decision(task.name, digest)
        )
        if problem:
            return problem
        policy, _ = self._studies.site_policy()
        broken = policy_problems(policy, task)
        if broken:
            return f"study {task.name} no longer meets the site policy: " + "; ".join(
                f"{p.field}: {p.description}" for p in broken
            )
        return ""
