"""Study review and approval at a hospital's gateway, over a real PostgreSQL store: eligible
patients counted by the gateway, the site policy enforced with the rule named, decisions pinned
by hash and audited, and no export for a study that is not approved here."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from fibemrss.db.pool import Database
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.errors import FailedPrecondition, InvalidArgument
from fibemrss.domain.records import LOINC, Code, Observation, PatientRecord, Provenance
from fibemrss.domain.site_policy import SitePolicy
from fibemrss.domain.study import study_hash, study_to_json
from fibemrss.domain.tasks import TASKS
from fibemrss.tools.study_review import document_of
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.ingestion import Candidate
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.study_decisions import StudyReview
from services.emr_gateway.core.use_cases import Gateway

STUDY = TASKS["heart-disease-noninvasive-v1"]  # cohort: 18 and older


def patient(pid: str, age: float) -> PatientRecord:
    obs = (Observation(Code(LOINC, "8480-6"), 130.0, "mm[Hg]", source_id=f"{pid}-bp"),)
    return PatientRecord(
        pid, Provenance("ehr", pid, f"sha-{pid}"), sex="male", age_years=age, observations=obs
    )


@pytest.fixture
def hospital(fresh_database: Callable[[str], str]) -> Iterator[tuple[Gateway, StudyReview, Database]]:
    db = Database(fresh_database("hospital"))
    store = GatewayStore(db)
    review = StudyReview("h", store, StudyStore(db))
    gateway = Gateway(store, Pseudonymizer(b"approval-test-pseudonym-key"), studies=review)
    records = [patient(f"a{i}", 30 + i % 40) for i in range(55)] + [patient(f"c{i}", 10) for i in range(5)]
    result = gateway.ingest_candidates(
        [Candidate(i, r.provenance.source_id, r) for i, r in enumerate(records)]
    )
    assert {o.fate for o in result.outcomes} == {"accepted"}
    try:
        yield gateway, review, db
    finally:
        db.close()


def audit(db: Database, action: str) -> list[tuple[str, str]]:
    with db.transaction() as cur:
        cur.execute("SELECT actor, subject FROM audit_log WHERE action=%s ORDER BY id", (action,))
        return [(a, s) for a, s in cur.fetchall()]


def test_review_counts_eligible_patients_and_an_approval_is_pinned_by_hash(
    hospital: tuple[Gateway, StudyReview, Database],
) -> None:
    gateway, review, db = hospital
    doc = document_of(STUDY)
    with pytest.raises(FailedPrecondition, match="not approved at hospital h"):
        list(gateway.training_examples("agent@h", STUDY.name, "t"))
    r = review.review("operator@h", doc)
    assert (r.patients, r.eligible, r.consent_excluded, r.problems, r.decision) == (60, 55, 0, [], None)
    d = review.decide("operator@h", doc, True, "")
    assert (d.decision, d.study_hash, d.eligible, d.decided_by) == (
        "approved",
        study_hash(STUDY),
        55,
        "operator@h",
    )
    assert len(list(gateway.training_examples("agent@h", STUDY.name, "t"))) == 55
    assert audit(db, "study_approved") == [("operator@h", f"{STUDY.name} {study_hash(STUDY)}")]
    assert [a for a, _ in audit(db, "review_study")] == ["operator@h"]
    # Another document of the same name (one more round) has its own hash and no decision.
    other = replace(STUDY, rounds=STUDY.rounds + 1)
    assert review.review("operator@h", json.dumps(study_to_json(other)).encode()).decision is None
    assert review.export_problem(other).startswith(f"study {STUDY.name} {study_hash(other)} is not approved")


def test_a_study_breaking_the_site_policy_cannot_be_approved_and_the_rule_is_named(
    hospital: tuple[Gateway, StudyReview, Database],
) -> None:
    _, review, db = hospital
    factory = json.dumps({**study_to_json(STUDY), "model": "somelab.models:build"}).encode()
    assert [p.field for p in review.review("operator@h", factory).problems] == ["model_factories"]
    with pytest.raises(
        FailedPrecondition, match="model_factories: model somelab.models:build is not allowed"
    ):
        review.decide("operator@h", factory, True, "")
    StudyStore(db).set_site_policy(SitePolicy(min_eligible=56), "operator@h")
    with pytest.raises(
        FailedPrecondition, match="min_eligible: 55 eligible patients here, the policy needs at least 56"
    ):
        review.decide("operator@h", document_of(STUDY), True, "")
    with db.transaction() as cur:
        cur.execute("SELECT count(*) FROM study_decisions")
        assert cur.fetchone() == (0,)
    assert len(audit(db, "study_approval_refused_by_policy")) == 2


def test_a_refused_study_is_never_exported_and_the_refusal_needs_a_reason(
    hospital: tuple[Gateway, StudyReview, Database],
) -> None:
    gateway, review, db = hospital
    doc = document_of(STUDY)
    with pytest.raises(InvalidArgument) as unexplained:
        review.decide("operator@h", doc, False, " ")
    assert [v.field for v in unexplained.value.violations] == ["reason"]
    review.decide("operator@h", doc, True, "")
    review.decide("operator@h", doc, False, "the ethics board withdrew its consent")  # the latest counts
    with pytest.raises(FailedPrecondition, match="refused at hospital h by operator@h: the ethics board"):
        list(gateway.training_examples("agent@h", STUDY.name, "t"))
    assert audit(db, "stream_training_examples") == []
    assert audit(db, "training_export_refused") == [("agent@h", STUDY.name)]
    with pytest.raises(InvalidArgument) as garbled:
        review.review("operator@h", b"study: [unclosed")
    assert [v.field for v in garbled.value.violations] == ["document"]
