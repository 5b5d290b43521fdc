"""CDS Hooks 2.0 `patient-view` over HTTPS with client certificates: requests shaped like the
specification's examples, responses validated against a JSON Schema of its discovery and card
responses, and the suggested RiskAssessment against FHIR R4 (fhir.resources)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import jsonschema
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from fibemrss.domain.records import LOINC, UCI_HEART
from tests.e2e.conftest import InferenceHttps

pytestmark = pytest.mark.e2e

SERVICE = "heart-disease-v1-risk"

# From the CDS Hooks 2.0 specification (Discovery; CDS Service Response: Card, Source,
# Suggestion, Action). Required fields, types and enumerations as the text states them.
SOURCE = {
    "type": "object",
    "required": ["label"],
    "properties": {"label": {"type": "string"}, "url": {"type": "string"}, "icon": {"type": "string"}},
}
ACTION = {
    "type": "object",
    "required": ["type", "description"],
    "properties": {
        "type": {"enum": ["create", "update", "delete"]},
        "description": {"type": "string"},
        "resource": {"type": "object", "required": ["resourceType"]},
        "resourceId": {"type": "string"},
    },
}
SUGGESTION = {
    "type": "object",
    "required": ["label"],
    "properties": {
        "label": {"type": "string"},
        "uuid": {"type": "string"},
        "isRecommended": {"type": "boolean"},
        "actions": {"type": "array", "items": ACTION},
    },
}
CARD = {
    "type": "object",
    "required": ["summary", "indicator", "source"],
    "properties": {
        "uuid": {"type": "string"},
        "summary": {"type": "string", "maxLength": 140},
        "detail": {"type": "string"},
        "indicator": {"enum": ["info", "warning", "critical"]},
        "source": SOURCE,
        "suggestions": {"type": "array", "items": SUGGESTION},
        "selectionBehavior": {"enum": ["at-most-one", "any"]},
        "links": {"type": "array"},
    },
    "dependentRequired": {"suggestions": ["selectionBehavior"]},
}
RESPONSE = {
    "type": "object",
    "required": ["cards"],
    "properties": {"cards": {"type": "array", "items": CARD}},
}
DISCOVERY = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "services": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["hook", "description", "id"],
                "properties": {
                    "hook": {"type": "string"},
                    "title": {"type": "string"},
                    "description": {"type": "string"},
                    "id": {"type": "string"},
                    "prefetch": {"type": "object", "additionalProperties": {"type": "string"}},
                    "usageRequirements": {"type": "string"},
                },
            },
        }
    },
}


def observation(oid: str, system: str, code: str, **value: Any) -> dict[str, Any]:
    return {
        "fullUrl": f"Observation/{oid}",
        "resource": {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "code": {"coding": [{"system": system, "code": code}]},
            "subject": {"reference": "Patient/1288992"},
            **value,
        },
    }


def quantity(value: float, code: str) -> dict[str, Any]:
    return {
        "valueQuantity": {"value": value, "unit": code, "system": "http://unitsofmeasure.org", "code": code}
    }


# Shaped like the specification's patient-view example (hookInstance, fhirServer, context).
REQUEST: dict[str, Any] = {
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "fhirServer": "http://hooks.smarthealthit.org:9080",
    "hook": "patient-view",
    "context": {"userId": "Practitioner/example", "patientId": "1288992"},
    "prefetch": {
        "patient": {"resourceType": "Patient", "id": "1288992", "gender": "male", "birthDate": "1960-02-01"},
        "observations": {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                observation("bp", LOINC, "8480-6", **quantity(145, "mm[Hg]")),
                observation("chol", LOINC, "2093-3", **quantity(6.2, "mmol/L")),  # converted to mg/dL
                observation(
                    "cp",
                    UCI_HEART,
                    "cp",
                    valueCodeableConcept={"coding": [{"system": UCI_HEART, "code": "asymptomatic"}]},
                ),
                # A code the model does not read, implausible: left out, and said so.
                observation("hr", LOINC, "8867-4", **quantity(900, "/min")),
            ],
        },
    },
}


def test_discovery_names_the_prefetch_the_task_needs(inference_https: InferenceHttps) -> None:
    with inference_https.client() as client:
        doc = client.get("/cds-services").json()
    jsonschema.validate(doc, DISCOVERY)
    (service,) = doc["services"]
    assert service["id"] == SERVICE and service["hook"] == "patient-view"
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert "http://loinc.org|2093-3" in service["prefetch"]["observations"]


def test_patient_view_card_with_the_risk_assessment(inference_https: InferenceHttps) -> None:
    with inference_https.client() as client:
        r = client.post(f"/cds-services/{SERVICE}", json=REQUEST)
    assert r.status_code == 200, r.text
    doc = r.json()
    jsonschema.validate(doc, RESPONSE)
    (card,) = doc["cards"]
    assert card["source"]["label"] == "FIBEMRSS heart-disease-v1 global version 2"
    assert "imputed" in card["summary"]
    assert "Imputed, not in the record:" in card["detail"] and "max_heart_rate" in card["detail"]
    assert "Not used: 8867-4" in card["detail"]  # the implausible heart rate, with its reason
    assert "not a diagnosis" in card["detail"]
    action = card["suggestions"][0]["actions"][0]
    assessment = RiskAssessment.model_validate(action["resource"])
    assert assessment.subject.reference == "Patient/1288992"
    p = float(assessment.prediction[0].probabilityDecimal)
    assert 0.0 <= p <= 1.0 and f"{p:.0%}" in card["summary"]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda r: r.pop("prefetch"), "prefetch.patient"),
        (
            lambda r: r["prefetch"].__setitem__("observations", None),
            "observations: none of the coded results",
        ),
        (
            lambda r: r["prefetch"].__setitem__("observations", {"resourceType": "Patient"}),
            "must be a Bundle",
        ),
    ],
)
def test_missing_data_gets_a_card_saying_what_is_missing(
    inference_https: InferenceHttps, change: Any, said: str
) -> None:
    request = copy.deepcopy(REQUEST)
    request["hookInstance"] = str(uuid.uuid4())
    change(request)
    with inference_https.client() as client:
        r = client.post(f"/cds-services/{SERVICE}", json=request)
    assert r.status_code == 200
    doc = r.json()
    jsonschema.validate(doc, RESPONSE)
    assert said in doc["cards"][0]["detail"]
    assert "suggestions" not in doc["cards"][0]


def test_not_a_cds_request_or_service(inference_https: InferenceHttps) -> None:
    with inference_https.client() as client:
        assert client.post("/cds-services/nope", json=REQUEST).status_code == 404
        r = client.post(f"/cds-services/{SERVICE}", json={**REQUEST, "hook": "order-sign"})
        assert r.status_code == 400 and "hook" in r.json()["error"]
    with inference_https.client("ehr@other") as client:
        assert client.get("/cds-services").status_code == 403
