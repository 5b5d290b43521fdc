"""A study's cohort bounds what the gateway exports for it, over a real PostgreSQL store."""

from __future__ import annotations

from collections.abc import Callable

from fibemrss.db.pool import Database
from fibemrss.domain.records import LOINC, Code, Observation, PatientRecord, Provenance
from fibemrss.domain.tasks import TASKS
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.ingestion import Candidate
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.use_cases import Gateway


def patient(pid: str, age: float, with_bp: bool) -> PatientRecord:
    obs = (Observation(Code(LOINC, "8480-6"), 130.0, "mm[Hg]", source_id=f"{pid}-bp"),) if with_bp else ()
    return PatientRecord(
        pid, Provenance("ehr", pid, f"sha-{pid}"), sex="female", age_years=age, observations=obs
    )


def test_patients_outside_the_cohort_are_never_exported_and_the_stream_is_audited(
    fresh_database: Callable[[str], str],
) -> None:
    db = Database(fresh_database("hospital"))
    try:
        gateway = Gateway(GatewayStore(db), Pseudonymizer(b"cohort-test-pseudonym-key"))
        records = [patient("adult", 40, True), patient("child", 12, True), patient("elder", 80, False)]
        result = gateway.ingest_candidates(
            [Candidate(i, r.provenance.source_id, r) for i, r in enumerate(records)]
        )
        assert [o.fate for o in result.outcomes] == ["accepted"] * 3
        keys = {r.source_patient_id: o.patient_key for r, o in zip(records, result.outcomes, strict=True)}

        noninvasive = TASKS["heart-disease-noninvasive-v1"]  # cohort: 18 and older
        exported = {e.patient_key for e in gateway.training_examples("agent@h", noninvasive.name, "t")}
        assert exported == {keys["adult"], keys["elder"]}
        everyone = {e.patient_key for e in gateway.training_examples("agent@h", "heart-disease-v1", "t")}
        assert everyone == set(keys.values())
        with db.transaction() as cur:
            cur.execute("SELECT actor, subject FROM audit_log WHERE action = 'stream_training_examples'")
            assert sorted(cur.fetchall()) == [
                ("agent@h", "heart-disease-noninvasive-v1"),
                ("agent@h", "heart-disease-v1"),
            ]
    finally:
        db.close()
