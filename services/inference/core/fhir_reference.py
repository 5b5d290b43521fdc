"""The diagnosis reference in FHIR: a R4 RiskAssessment, and CDS Hooks 2.0 cards (pure).

CDS Hooks `patient-view`: the EHR sends the Patient and the Observations our prefetch templates
ask for; they are read by the very FHIR reader and unit rules the gateway ingests with
(`fibemrss.domain.normalize`), so a value means here what it means in training. Whatever the
task needs and the request lacks is said in a card, never as an error page.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.feature_extraction import FeatureValue, extract
from fibemrss.domain.normalize.fhir_r4 import parse_bundle_object
from fibemrss.domain.normalize.plausibility import canonical, check_observation
from fibemrss.domain.records import PatientRecord
from fibemrss.domain.task_spec import TaskSpec

RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
MODEL_SYSTEM = "urn:fibemrss:model"
MAX_SUMMARY = 140
# Our bands -> HL7 risk-probability codes and CDS Hooks card indicators.
_QUALITATIVE = {"low": "low", "intermediate": "moderate", "high": "high", "very high": "high"}
_INDICATOR = {"low": "info", "intermediate": "warning", "high": "critical", "very high": "critical"}


@dataclass(frozen=True)
class ReferenceView:
    """A diagnosis reference as FHIR needs it (from the service's Reference, or a DiagnoseResponse)."""

    task: str
    model_version: int
    federated_round: int
    probability: float
    risk_band: str
    contributions: Sequence[tuple[str, float]]
    imputed: Sequence[str]
    caveat: str
    outcome: str = "heart disease (any major vessel narrowing > 50%)"
    model_kind: str = "global"  # or "personalized" (fine-tuned at this hospital)
    base_model_version: int = 0  # a personalized model's global version; 0 for a global one

    @property
    def model_described(self) -> str:
        """ "global version 15" or "personalized version 16 (from global version 15)"."""
        if self.model_kind == "personalized":
            return (
                f"personalized version {self.model_version} (from global version {self.base_model_version})"
            )
        return f"{self.model_kind or 'global'} version {self.model_version}"


def risk_assessment(ref: ReferenceView, patient_id: str = "", now: datetime | None = None) -> dict[str, Any]:
    """A FHIR R4 RiskAssessment of the reference."""
    doc: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": f"Patient/{patient_id}"}
        if patient_id
        else {"display": "the assessed patient"},
        "occurrenceDateTime": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "method": {
            "coding": [
                {
                    "system": MODEL_SYSTEM,
                    "code": ref.task,
                    "display": f"{ref.task} {ref.model_described}",
                }
            ],
            "text": f"federated model {ref.task}, {ref.model_described}, round {ref.federated_round}",
        },
        "prediction": [
            {
                "outcome": {"text": ref.outcome},
                "probabilityDecimal": round(float(ref.probability), 6),
                "qualitativeRisk": {
                    "coding": [
                        {"system": RISK_PROBABILITY, "code": _QUALITATIVE.get(ref.risk_band, "moderate")}
                    ],
                    "text": ref.risk_band,
                },
            }
        ],
        "note": [{"text": ref.caveat}],
    }
    if ref.contributions or ref.imputed:
        parts = [f"{name} {value:+.3f}" for name, value in ref.contributions]
        text = "Largest contributions to the logit: " + ", ".join(parts) if parts else ""
        if ref.imputed:
            text += ("; " if text else "") + "imputed (missing from the record): " + ", ".join(ref.imputed)
        doc["note"].append({"text": text})
    return doc


# -- CDS Hooks ---------------------------------------------------------------------------------


def service_id(task: TaskSpec) -> str:
    return f"{task.name}-risk"


def prefetch_templates(task: TaskSpec) -> dict[str, str]:
    """The Patient and exactly the Observations the task's features are read from."""
    codes = sorted({f"{f.system}|{f.code}" for f in task.features if f.source in ("numeric", "coded")})
    return {
        "patient": "Patient/{{context.patientId}}",
        "observations": "Observation?subject={{context.patientId}}&code=" + ",".join(codes),
    }


def discovery(task: TaskSpec) -> dict[str, Any]:
    return {
        "services": [
            {
                "hook": "patient-view",
                "id": service_id(task),
                "title": f"{task.name} risk reference",
                "description": (
                    "A statistical reference from the hospitals' federated model, with the inputs that "
                    "drove it and the ones it had to impute; not a diagnosis."
                ),
                "prefetch": prefetch_templates(task),
                "usageRequirements": "Send the prefetch: this service does not query the FHIR server.",
            }
        ]
    }


@dataclass
class PrefetchRead:
    """What a patient-view request gave: the features, or why there are none."""

    values: list[FeatureValue] | None = None
    patient_id: str = ""
    missing: list[str] = field(default_factory=list)  # what the request lacks, for a card
    not_used: list[str] = field(default_factory=list)  # values left out, and why


def read_prefetch(task: TaskSpec, request: Mapping[str, Any]) -> PrefetchRead:
    """The task's feature values from the request's prefetch (Patient + Observation searchset)."""
    out = PrefetchRead()
    prefetch = request.get("prefetch")
    prefetch = prefetch if isinstance(prefetch, dict) else {}
    context = request.get("context")
    context = context if isinstance(context, dict) else {}
    patient = prefetch.get("patient")
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        out.missing.append("prefetch.patient: the Patient resource (template Patient/{{context.patientId}})")
        return out
    out.patient_id = str(patient.get("id") or context.get("patientId") or "")
    patient = {**patient, "id": out.patient_id or "cds-patient"}
    observations = prefetch.get("observations")
    entries: list[Any] = [{"resource": patient}]
    if isinstance(observations, dict) and observations.get("resourceType") == "Bundle":
        entries += [e for e in observations.get("entry") or [] if isinstance(e, dict)]
    elif observations is not None:
        out.missing.append("prefetch.observations: must be a Bundle (searchset) of Observations")
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    try:
        parsed = parse_bundle_object(bundle)
    except InvalidArgument as exc:
        out.missing.extend(f"{v.field}: {v.description}" for v in exc.violations[:10])
        return out
    if not parsed.records:
        problems = [v for r in parsed.rejected for v in r.violations] + list(parsed.unattributed)
        out.missing.extend(f"{v.field}: {v.description}" for v in problems[:10])
        return out
    record: PatientRecord = canonical(parsed.records[0])
    kept = []
    for obs in record.observations:
        reasons = check_observation(obs)
        if reasons:
            out.not_used.append(f"{obs.code.code}: {reasons[0]}")
        else:
            kept.append(obs)
    age = record.age_years
    if age is None and record.birth_date is not None:
        age = (datetime.now(UTC).date() - record.birth_date).days / 365.25  # age at this request
    record = replace(record, observations=tuple(kept), age_years=age)
    for v in parsed.unattributed:
        out.not_used.append(f"{v.field}: {v.description}")
    values, _ = extract(task, record)
    names = [f.name for f in task.features]
    needed = [n for n, v in zip(names, values, strict=True) if v is None]
    if all(v is None for f, v in zip(task.features, values, strict=True) if f.source in ("numeric", "coded")):
        out.missing.append(
            "observations: none of the coded results the model reads (" + ", ".join(needed) + ")"
        )
        return out
    out.values = values
    return out


def _summary(text: str) -> str:
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 1] + "…"


def missing_card(task: TaskSpec, missing: Sequence[str]) -> dict[str, Any]:
    return {
        "uuid": str(uuid.uuid4()),
        "summary": _summary(f"{task.name}: no risk reference, the request lacks data the model needs"),
        "indicator": "info",
        "detail": "Missing:\n\n" + "\n".join(f"- {m}" for m in missing),
        "source": {"label": f"FIBEMRSS {task.name}"},
    }


def risk_card(ref: ReferenceView, read: PrefetchRead) -> dict[str, Any]:
    lines = [
        f"**{ref.risk_band.capitalize()} risk** (probability {ref.probability:.2f}) from the federated model "
        f"{ref.task} {ref.model_described} (round {ref.federated_round}).",
        "",
        "Largest contributions (signed, on the logit):",
        *[f"- {name}: {value:+.3f}" for name, value in ref.contributions],
    ]
    if ref.imputed:
        lines += ["", "Imputed, not in the record: " + ", ".join(ref.imputed)]
    if read.not_used:
        lines += ["", "Not used: " + "; ".join(read.not_used[:10])]
    lines += ["", f"_{ref.caveat}_"]
    assessment = risk_assessment(ref, read.patient_id)
    return {
        "uuid": str(uuid.uuid4()),
        "summary": _summary(
            f"{ref.task} risk reference: {ref.risk_band} ({ref.probability:.0%}); "
            f"{len(ref.imputed)} input(s) imputed"
        ),
        "indicator": _INDICATOR.get(ref.risk_band, "info"),
        "detail": "\n".join(lines),
        "source": {"label": f"FIBEMRSS {ref.task} {ref.model_described}"},
        "selectionBehavior": "any",
        "suggestions": [
            {
                "label": "Record this risk assessment",
                "uuid": str(uuid.uuid4()),
                "actions": [
                    {"type": "create", "description": "Store the RiskAssessment", "resource": assessment}
                ],
            }
        ],
    }
