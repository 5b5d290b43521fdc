"""The diagnosis reference in FHIR: a R4 RiskAssessment, and CDS Hooks 2.0 cards (pure).

CDS Hooks `patient-view`: the EHR sends the Patient and the Observations our prefetch templates
ask for; they are read by the very FHIR reader and unit rules the gateway ingests with
(`fibemrss.domain.normalize`), so a value means here what it means in training. Whatever the
task needs and the request lacks is said in a card, never as an error page.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.feature_extraction import FeatureValue, extract
from fibemrss.domain.normalize.fhir_r4 import parse_bundle_object
from fibemrss.domain.normalize.plausibility import canonical, check_observation
from fibemrss.domain.records import Observation, PatientRecord
from fibemrss.domain.task_spec import TaskSpec
from services.inference.core.input_limits import PatientInputs

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
    """The Patient and exactly the Observations (and Conditions) the task's features are read from."""
    templates = {"patient": "Patient/{{context.patientId}}"}
    codes = sorted({f"{f.system}|{f.code}" for f in task.features if f.source in ("numeric", "coded")})
    if codes:
        templates["observations"] = "Observation?subject={{context.patientId}}&code=" + ",".join(codes)
    conditions = sorted({f"{f.system}|{f.code}" for f in task.features if f.source == "condition"})
    if conditions:
        templates["conditions"] = "Condition?patient={{context.patientId}}&code=" + ",".join(conditions)
    return templates


def service_for(tasks: Sequence[TaskSpec], service: str) -> TaskSpec | None:
    """The study whose CDS service has this id (None: no such service here)."""
    return next((t for t in tasks if service_id(t) == service), None)


def outcome_of(task: TaskSpec) -> str:
    """What the study predicts, as a RiskAssessment's outcome: its description, except for the
    UCI heart-disease studies, whose label is the angiographic finding."""
    if task.label.system == "urn:fibemrss:uci-heart":
        return ReferenceView.outcome
    return f"{task.name}: {task.description}" if task.description else task.name


def discovery(tasks: Sequence[TaskSpec]) -> dict[str, Any]:
    """One patient-view service per study served, each with the prefetch its features need."""
    return {
        "services": [
            {
                "hook": "patient-view",
                "id": service_id(task),
                "title": f"{task.name} risk reference",
                "description": (
                    (f"{task.description} " if task.description else "")
                    + "A statistical reference from the hospitals' federated model, with the inputs that "
                    "drove it and the ones it had to impute; not a diagnosis."
                ),
                "prefetch": prefetch_templates(task),
                "usageRequirements": "Send the prefetch: this service does not query the FHIR server.",
            }
            for task in tasks
        ]
    }


@dataclass
class PrefetchRead:
    """What a patient-view request gave: the features, or why there are none."""

    values: list[FeatureValue] | None = None
    patient_id: str = ""
    missing: list[str] = field(default_factory=list)  # what the request lacks, for a card
    not_used: list[str] = field(default_factory=list)  # values left out, and why
    # Values the model reads that no record could hold (a NaN, an implausible value, a unit that
    # does not convert), each as "<request field>: <reason>": no risk is given beside them.
    refused: list[str] = field(default_factory=list)


_ENTRY = re.compile(r"^entry\[(\d+)\](?:\.resource)?")  # the bundle read: entry[0] is the Patient
_COMPONENT = re.compile(r"#component\[(\d+)\]$")


def _request_field(path: str, where: Sequence[str]) -> str:
    """A field of the bundle read (entry[k]...) as the request spells it (prefetch...)."""
    match = _ENTRY.match(path)
    if match is None or int(match.group(1)) >= len(where):
        return f"prefetch ({path})"
    return where[int(match.group(1))] + path[match.end() :]


def _observation_field(obs: Observation, part: str, where: Sequence[str]) -> str:
    """The request field of one read observation's value or unit (its entry, by the id given it)."""
    base, _, _ = obs.source_id.partition("#")
    index = (
        int(base[len(_ENTRY_ID) :]) if base.startswith(_ENTRY_ID) and base[len(_ENTRY_ID) :].isdigit() else -1
    )
    entry = where[index] if 0 < index < len(where) else "prefetch.observations.entry[]"
    component = _COMPONENT.search(obs.source_id)
    inner = f".component[{component.group(1)}]" if component else ""
    return f"{entry}{inner}.valueQuantity" + (".value" if part == "value" else "")


_ENTRY_ID = "cds-entry-"


def read_prefetch(
    task: TaskSpec, request: Mapping[str, Any], inputs: PatientInputs | None = None
) -> PrefetchRead:
    """The task's feature values from the request's prefetch (Patient + Observation searchset).

    A value the model reads is checked by the inference core's `PatientInputs`, as Diagnose's
    are: one it refuses gives `refused` (naming the request field) and no values.
    """
    inputs = inputs or PatientInputs(task)
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
    where = ["prefetch.patient"]  # the request field of each entry read
    if isinstance(observations, dict) and observations.get("resourceType") == "Bundle":
        listed = observations.get("entry")
        for j, e in enumerate(listed if isinstance(listed, list) else []):
            if not isinstance(e, dict):
                continue
            resource = e.get("resource")
            if isinstance(resource, dict) and resource.get("resourceType") == "Observation":
                # Each Observation is read under an id naming its entry, so a refusal names the field.
                e = {**e, "resource": {**resource, "id": f"{_ENTRY_ID}{len(entries)}"}}
            entries.append(e)
            where.append(f"prefetch.observations.entry[{j}].resource")
    elif observations is not None:
        out.missing.append("prefetch.observations: must be a Bundle (searchset) of Observations")
    conditions = prefetch.get("conditions")
    if isinstance(conditions, dict) and conditions.get("resourceType") == "Bundle":
        listed = conditions.get("entry")
        for j, e in enumerate(listed if isinstance(listed, list) else []):
            resource = e.get("resource") if isinstance(e, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Condition":
                entries.append(e)
                where.append(f"prefetch.conditions.entry[{j}].resource")
    elif conditions is not None:
        out.missing.append("prefetch.conditions: must be a Bundle (searchset) of Conditions")
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    try:
        parsed = parse_bundle_object(bundle)
    except InvalidArgument as exc:
        out.refused.extend(f"{_request_field(v.field, where)}: {v.description}" for v in exc.violations[:10])
        return out
    if not parsed.records:
        problems = [v for r in parsed.rejected for v in r.violations] + list(parsed.unattributed)
        out.refused.extend(f"{_request_field(v.field, where)}: {v.description}" for v in problems[:10])
        return out
    record: PatientRecord = canonical(parsed.records[0])
    read_codes = {(f.system, f.code) for f in task.features if f.source == "numeric"}
    kept = []
    for obs in record.observations:
        checked, problem = inputs.check_observation(obs)
        if problem is not None:
            out.refused.append(f"{_observation_field(obs, problem.part, where)}: {problem.description}")
        elif (obs.code.system, obs.code.code) in read_codes:
            kept.append(checked)
        elif reasons := check_observation(obs):
            out.not_used.append(f"{obs.code.code}: {reasons[0]}")
        else:
            kept.append(obs)
    age = record.age_years
    if age is None and record.birth_date is not None:
        age = (datetime.now(UTC).date() - record.birth_date).days / 365.25  # age at this request
        if reason := inputs.age_problem(age):
            out.refused.append(f"prefetch.patient.birthDate: {reason}")
    if out.refused:
        del out.refused[10:]
        return out
    record = replace(record, observations=tuple(kept), age_years=age)
    for v in parsed.unattributed:
        out.not_used.append(f"{_request_field(v.field, where)}: {v.description}")
    values, _ = extract(task, record)
    names = [f.name for f in task.features]
    needed = [n for n, v in zip(names, values, strict=True) if v is None]
    read_from_results = [
        v for f, v in zip(task.features, values, strict=True) if f.source in ("numeric", "coded")
    ]
    if read_from_results and all(v is None for v in read_from_results):
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


def refused_card(task: TaskSpec, refused: Sequence[str]) -> dict[str, Any]:
    """No risk, and which inputs were refused: a value no record could hold gets no confident
    answer, and the clinician sees which one to correct (an HTTP error would reach no one)."""
    return {
        "uuid": str(uuid.uuid4()),
        "summary": _summary(f"{task.name}: no risk reference, the request holds values the model cannot use"),
        "indicator": "warning",
        "detail": "Refused:\n\n" + "\n".join(f"- {r}" for r in refused),
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
