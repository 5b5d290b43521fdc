"""FHIR R4 answers of the gateway's REST edge: OperationOutcomes, batch/transaction-response
Bundles with one entry per request entry, and the CapabilityStatement (pure: plain dicts).

Each request entry gets the fate of the patient record it belongs to (the gateway stores a
Patient with its Observations, Conditions and Encounters as one record):

| fate | entry.response.status | issue |
| --- | --- | --- |
| accepted | 201 Created | information |
| duplicate (already stored) | 200 OK | information, code duplicate |
| quarantined (held for review) | 202 Accepted | warning, code business-rule, each reason |
| rejected (nothing of the patient stored) | 400 Bad Request | error, code invalid, `expression` naming each field |
| not mapped (a type or value the gateway does not map) | 200 OK | information, code not-supported |

`issue.expression` is FHIRPath from the Bundle (`Bundle.entry[3].resource.valueQuantity.value`),
or from the resource for a single-resource POST (`Observation.valueQuantity.value`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fibemrss.domain.errors import FieldProblem
from fibemrss.domain.normalize.fhir_r4 import MAPPED_TYPES, BundleParse
from services.emr_gateway.core.ingestion import Outcome

FHIR_VERSION = "4.0.1"
SOFTWARE_VERSION = "0.1.0"
_ENTRY = re.compile(r"^entry\[(\d+)\]")
_STATUS = {
    "accepted": "201 Created",
    "duplicate": "200 OK",
    "quarantined": "202 Accepted",
    "rejected": "400 Bad Request",
    "unsupported": "200 OK",
}


def issue(severity: str, code: str, diagnostics: str, expression: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


def operation_outcome(issues: Sequence[dict[str, Any]], id_: str = "") -> dict[str, Any]:
    doc: dict[str, Any] = {"resourceType": "OperationOutcome"}
    if id_:
        doc["id"] = id_
    doc["issue"] = list(issues) or [issue("information", "informational", "no issues")]
    return doc


def fhirpath(field: str, root: str = "Bundle") -> str:
    """Our field path as FHIRPath from `root`: "entry[3].resource.x" -> "Bundle.entry[3].resource.x";
    with root "Observation" the entry prefix goes: "entry[0].resource.x" -> "Observation.x"."""
    if field in ("", "$"):
        return root
    if root != "Bundle":
        field = re.sub(r"^entry\[\d+\]\.resource\.?", "", field)
        return f"{root}.{field}" if field else root
    return f"Bundle.{field}"


def problems_outcome(problems: Sequence[FieldProblem], root: str = "Bundle") -> dict[str, Any]:
    """The OperationOutcome of a request refused whole (nothing stored)."""
    return operation_outcome(
        [issue("error", "invalid", p.description, fhirpath(p.field, root)) for p in problems]
    )


def message_outcome(severity: str, code: str, text: str) -> dict[str, Any]:
    return operation_outcome([issue(severity, code, text)])


@dataclass(frozen=True)
class EntryOutcome:
    index: int
    fate: str  # accepted, duplicate, quarantined, rejected, or "not mapped"
    status: str
    outcome: dict[str, Any]
    location: str = ""


def _entry_of(field: str) -> int | None:
    m = _ENTRY.match(field)
    return int(m.group(1)) if m else None


def entry_outcomes(
    entries: Sequence[Any], parsed: BundleParse, outcomes: Sequence[Outcome], root: str = "Bundle"
) -> list[EntryOutcome]:
    """One outcome per request entry, in order (see the module's table)."""
    by_key = {o.source_id: o for o in outcomes if o.source_id}
    patient_entry = {key: i for i, key in parsed.entry_patients.items() if _is_patient(entries, i)}
    per_entry: dict[int, list[FieldProblem]] = defaultdict(list)
    spread: dict[str, list[FieldProblem]] = defaultdict(list)  # a patient's problems on no entry
    for each in outcomes:
        for v in each.violations:
            where = _entry_of(v.field)
            if where is not None:
                per_entry[where].append(v)
            else:
                spread[each.source_id].append(v)
    for i in range(len(entries)):
        # Each entry's own error that belongs to no patient (all of them, past those listed).
        if (error := parsed.entry_errors.of(i)) is not None:
            per_entry[i].append(error)
    notes: dict[int, list[FieldProblem]] = defaultdict(list)
    for n in parsed.notes:
        where = _entry_of(n.field)
        if where is not None:
            notes[where].append(n)

    out: list[EntryOutcome] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        info = [
            issue("information", "informational", n.description, fhirpath(n.field, root)) for n in notes[i]
        ]
        key = parsed.entry_patients.get(i)
        o = by_key.get(key) if key is not None else None
        if o is None:
            if per_entry[i]:
                errors = [
                    issue("error", "invalid", v.description, fhirpath(v.field, root)) for v in per_entry[i]
                ]
                out.append(EntryOutcome(i, "rejected", _STATUS["rejected"], operation_outcome(errors + info)))
            else:
                why = (
                    f"resource type {rtype} is not mapped by this gateway; nothing stored"
                    if rtype not in MAPPED_TYPES
                    else "not mapped (see the other issues); nothing stored"
                )
                out.append(
                    EntryOutcome(
                        i,
                        "not mapped",
                        "200 OK",
                        operation_outcome([issue("information", "not-supported", why)] + info),
                    )
                )
            continue
        issues: list[dict[str, Any]]
        if o.fate == "rejected":
            own = per_entry[i] + (spread[o.source_id] if patient_entry.get(o.source_id) == i else [])
            issues = [issue("error", "invalid", v.description, fhirpath(v.field, root)) for v in own]
            if not issues:
                others = sorted({fhirpath(v.field, root) for v in o.violations})[:5]
                issues = [
                    issue(
                        "error",
                        "invalid",
                        "rejected with its patient's record because of: " + ", ".join(others),
                    )
                ]
        elif o.fate == "quarantined":
            issues = [issue("warning", "business-rule", f"quarantined for review: {r}") for r in o.reasons]
        elif o.fate == "duplicate":
            issues = [issue("information", "duplicate", "already stored: nothing changed")]
        else:
            issues = [issue("information", "informational", "accepted")]
        named = rtype == "Patient" and isinstance(resource, dict) and bool(resource.get("id"))
        location = f"Patient/{o.source_id}" if o.fate != "rejected" and named else ""
        out.append(EntryOutcome(i, o.fate, _STATUS[o.fate], operation_outcome(issues + info), location))
    return out


def _is_patient(entries: Sequence[Any], i: int) -> bool:
    entry = entries[i] if i < len(entries) else None
    resource = entry.get("resource") if isinstance(entry, dict) else None
    return isinstance(resource, dict) and resource.get("resourceType") == "Patient"


def response_bundle(bundle_type: str, outcomes: Sequence[EntryOutcome]) -> dict[str, Any]:
    """The batch-response or transaction-response Bundle."""
    entries = []
    for e in outcomes:
        response: dict[str, Any] = {"status": e.status, "outcome": e.outcome}
        if e.location:
            response["location"] = e.location
        entries.append({"response": response})
    return {"resourceType": "Bundle", "type": f"{bundle_type}-response", "entry": entries}


def capability_statement(base_url: str, date: str) -> dict[str, Any]:
    """What the gateway's FHIR endpoint does, for `GET [base]/metadata`."""
    create = [{"code": "create"}]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "FIBEMRSS",
        "kind": "instance",
        "software": {"name": "FIBEMRSS emr_gateway", "version": SOFTWARE_VERSION},
        "implementation": {"description": "FIBEMRSS EMR gateway: FHIR R4 ingestion", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Ingestion only: each Patient is stored with the Observations, Conditions and "
                    "Encounters about it, validated, normalized (LOINC/SNOMED CT/ICD-10, UCUM), or held "
                    "in quarantine with its reasons. Bulk NDJSON import at [base]/$import."
                ),
                "security": {
                    "description": "Mutual TLS: a client certificate ingest@<hospital> (or operator@<hospital>) is required to ingest."
                },
                "resource": [{"type": t, "interaction": create} for t in (*MAPPED_TYPES, "Consent")],
                "interaction": [{"code": "batch"}, {"code": "transaction"}],
                "operation": [
                    {
                        "name": "import",
                        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/import",
                    }
                ],
            }
        ],
    }
