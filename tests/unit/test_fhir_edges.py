"""The pure parts of the FHIR edges: FHIRPath of field paths, NDJSON grouping, research Consents,
and the RiskAssessment and CDS card of a reference."""

from __future__ import annotations

import io
import json

import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.tasks import HEART_DISEASE_V1
from services.emr_gateway.core.answers.fhir_outcomes import fhirpath
from services.emr_gateway.core.parsers.fhir_consent import parse_consent
from services.emr_gateway.core.parsers.fhir_ndjson import LineProblem, batches, index_lines, read_group
from services.inference.core import fhir_reference as fr


def test_fhirpath_of_field_paths() -> None:
    assert fhirpath("entry[3].resource.valueQuantity.value") == "Bundle.entry[3].resource.valueQuantity.value"
    assert fhirpath("$") == "Bundle"
    assert fhirpath("entry[0].resource.subject.reference", "Observation") == "Observation.subject.reference"
    assert fhirpath("entry[0].resource", "Patient") == "Patient"


def line(resource: dict) -> bytes:
    return json.dumps(resource).encode()


def test_ndjson_lines_are_grouped_by_the_patient_they_name() -> None:
    lines = [
        line({"resourceType": "Patient", "id": "a"}),
        line({"resourceType": "Patient", "id": "b"}),
        b"",
        line({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/b"}}),
        b"{not json",
        line({"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/a"}}),
        line({"resourceType": "Claim", "id": "c"}),
        line(["no resource"]),  # type: ignore[arg-type]
    ]
    body = b"".join(raw + b"\n" for raw in lines)
    problems: list[LineProblem] = []
    index = index_lines(io.BytesIO(body), problems.append)
    assert (index.lines, index.patients) == (8, 2)
    assert [(p.line, p.problem.field) for p in problems] == [(5, "$"), (8, "resourceType")]

    def read(offset: int, length: int) -> bytes:
        return body[offset : offset + length]

    groups = [read_group(index, g, read) for b in batches(index, 200, 1 << 20) for g in b]
    assert [g.lines for g in groups] == [[1, 6], [2, 4], [7]]
    assert groups[0].bundle()["entry"][1]["resource"]["id"] == "o2"
    # Batches close at the group count or at the bytes of their lines, whichever comes first.
    assert [[len(g) for g in b] for b in batches(index, 2, 1 << 20)] == [[2, 2], [1]]
    assert [[len(g) for g in b] for b in batches(index, 200, 1)] == [[2], [2], [1]]


def consent(**overrides: object) -> dict:
    doc = {
        "resourceType": "Consent",
        "id": "c1",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "patient": {"reference": "Patient/p1"},
        "dateTime": "2026-01-01T10:00:00+01:00",
        "provision": {"type": "deny"},
    }
    doc.update(overrides)
    return doc


def test_research_consents() -> None:
    c = parse_consent(consent())
    assert (c.decision, c.patient_id, c.patient_identifier, c.source_system) == ("deny", "p1", "", "fhir")
    assert c.decided_at is not None and c.decided_at.utcoffset() is not None
    by_purpose = consent(
        scope={"coding": [{"code": "patient-privacy"}]},
        provision={
            "type": "permit",
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}],
        },
        patient={"identifier": {"system": "urn:mrn", "value": " 123 "}},
    )
    c = parse_consent(by_purpose)
    assert (c.decision, c.patient_identifier, c.patient_id) == ("permit", "123", "")
    assert parse_consent(consent()).payload_sha256 != parse_consent(consent(id="c2")).payload_sha256


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"scope": {"coding": [{"code": "treatment"}]}}, "scope"),
        ({"status": "inactive"}, "status"),
        ({"provision": {}}, "provision.type"),
        ({"patient": {"display": "someone"}}, "patient"),
        ({"dateTime": "2026-01-01T10:00:00"}, "dateTime"),
        ({"id": None}, "id"),
    ],
)
def test_a_consent_that_decides_nothing_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_consent(consent(**change))
    assert field in [v.field for v in err.value.violations]


def reference(band: str = "intermediate", p: float = 0.42) -> fr.ReferenceView:
    return fr.ReferenceView(
        task="heart-disease-v1",
        model_version=3,
        federated_round=15,
        probability=p,
        risk_band=band,
        contributions=[("cholesterol", 0.31), ("age", -0.12)],
        imputed=["max_heart_rate"],
        caveat="not a diagnosis",
    )


def test_risk_assessment_is_valid_r4() -> None:
    doc = fr.risk_assessment(reference(), "p9")
    assessment = RiskAssessment.model_validate(doc)
    assert assessment.subject.reference == "Patient/p9"
    assert float(assessment.prediction[0].probabilityDecimal) == 0.42
    assert assessment.prediction[0].qualitativeRisk.coding[0].code == "moderate"
    assert RiskAssessment.model_validate(fr.risk_assessment(reference()))  # no patient id: a display


@pytest.mark.parametrize(
    ("band", "indicator"),
    [("low", "info"), ("intermediate", "warning"), ("high", "critical"), ("very high", "critical")],
)
def test_card_indicator_follows_the_risk_band(band: str, indicator: str) -> None:
    card = fr.risk_card(reference(band), fr.PrefetchRead(values=[], patient_id="p9"))
    assert card["indicator"] == indicator and len(card["summary"]) <= 140
    assert "max_heart_rate" in card["detail"] and "cholesterol: +0.310" in card["detail"]


def test_prefetch_templates_name_every_observation_the_task_reads() -> None:
    templates = fr.prefetch_templates(HEART_DISEASE_V1)
    coded = [f for f in HEART_DISEASE_V1.features if f.source in ("numeric", "coded")]
    assert all(f"{f.system}|{f.code}" in templates["observations"] for f in coded)
