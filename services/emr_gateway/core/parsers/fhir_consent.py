"""FHIR R4 Consent about research use -> a decision for one patient (pure).

A Consent counts when its scope is `research` (consentscope) or its provision's purpose is
healthcare research (v3 ActReason HRESCH, or CLINTRCH/BIORCH); `provision.type` says deny or
permit. Only active Consents decide; any other status is refused with its field. The patient is
`patient.identifier.value` (the identifier the record was pseudonymized from) or a literal
`patient.reference` "Patient/<id>" of a patient the gateway already holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fibemrss.domain.errors import FieldProblem, InvalidArgument

CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RESEARCH_PURPOSES = frozenset({"HRESCH", "CLINTRCH", "BIORCH"})
DEFAULT_SOURCE_SYSTEM = "fhir"
_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})\Z")

Decision = Literal["permit", "deny"]


@dataclass(frozen=True)
class ConsentDecision:
    decision: Decision
    decided_at: datetime | None
    patient_identifier: str  # "" when only a reference names the patient
    patient_id: str  # the id of "Patient/<id>", "" when only an identifier does
    source_system: str
    source_id: str
    payload_sha256: str


def _codes(concepts: Any) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    items = concepts if isinstance(concepts, list) else [concepts]
    for concept in items:
        codings = concept.get("coding") if isinstance(concept, dict) else None
        for c in codings if isinstance(codings, list) else []:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                out.add((str(c.get("system", "")), c["code"]))
    return out


def parse_consent(resource: Any) -> ConsentDecision:
    """The decision, or InvalidArgument naming each bad field (`provision.type`)."""
    problems: list[FieldProblem] = []
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise InvalidArgument("not a Consent", [FieldProblem("resourceType", "must be 'Consent'")])
    if resource.get("status") != "active":
        problems.append(FieldProblem("status", "only an active Consent decides (status 'active')"))
    provision = resource.get("provision")
    provision = provision if isinstance(provision, dict) else {}
    kind = provision.get("type")
    if kind not in ("deny", "permit"):
        problems.append(FieldProblem("provision.type", "must be 'deny' or 'permit'"))
    scope = _codes(resource.get("scope"))
    # `provision.purpose` is a list of Codings (not CodeableConcepts) in R4.
    purposes: set[str] = set()
    for c in provision.get("purpose", []) if isinstance(provision.get("purpose"), list) else []:
        if isinstance(c, dict) and c.get("system") == ACT_REASON and isinstance(c.get("code"), str):
            purposes.add(c["code"])
    if (CONSENT_SCOPE, "research") not in scope and not purposes & RESEARCH_PURPOSES:
        problems.append(
            FieldProblem("scope", "only research Consents are handled (scope 'research' or purpose HRESCH)")
        )
    patient = resource.get("patient")
    patient = patient if isinstance(patient, dict) else {}
    identifier = patient.get("identifier")
    ident_value = identifier.get("value") if isinstance(identifier, dict) else None
    ref = patient.get("reference")
    match = _REF.search(ref) if isinstance(ref, str) else None
    if not (isinstance(ident_value, str) and ident_value.strip()) and match is None:
        problems.append(FieldProblem("patient", "needs identifier.value or a reference 'Patient/<id>'"))
    decided_at = None
    when = resource.get("dateTime")
    if when is not None:
        try:
            decided_at = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
            if decided_at.tzinfo is None:
                raise ValueError("no time zone")
        except ValueError:
            problems.append(FieldProblem("dateTime", "must be a FHIR dateTime with a time zone"))
    rid = resource.get("id")
    if not isinstance(rid, str) or not rid:
        problems.append(FieldProblem("id", "is required: it is the Consent's source id"))
    if problems:
        raise InvalidArgument("invalid Consent", problems)
    meta = resource.get("meta")
    source = meta.get("source") if isinstance(meta, dict) else None
    payload = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return ConsentDecision(
        decision=kind,  # type: ignore[arg-type]  # checked against the two values above
        decided_at=decided_at,
        patient_identifier=ident_value.strip() if isinstance(ident_value, str) else "",
        patient_id=match.group(1) if match else "",
        source_system=(source.split("#", 1)[0] if isinstance(source, str) and source.strip() else "")
        or DEFAULT_SOURCE_SYSTEM,
        source_id=str(rid),
        payload_sha256=hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest(),
    )
