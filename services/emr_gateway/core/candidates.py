"""FHIR R4 bundles and HL7 v2 messages as ingestion Candidates: one per patient record (pure).

Whole-payload failures are not candidates: a payload that cannot be read as its format, a FHIR
`transaction` bundle with any bad entry (all or nothing, as FHIR defines a transaction) and an
HL7 message with a bad field (a message is one unit) raise ParseError, which the client receives
as INVALID_ARGUMENT with a google.rpc.BadRequest naming each field; nothing of them is written.
"""

from __future__ import annotations

from dataclasses import replace

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.normalize import fhir_r4
from services.emr_gateway.core.ingestion import Candidate
from services.emr_gateway.core.parsers import hl7v2


def fhir_candidates(content: bytes) -> list[Candidate]:
    """One candidate per Patient of the bundle: its record, or the violations that reject it.
    Errors in entries that belong to no patient are reported as one extra rejected candidate."""
    return bundle_candidates(fhir_r4.parse_bundle(content))


def bundle_candidates(parsed: fhir_r4.BundleParse) -> list[Candidate]:
    """The candidates of a parsed bundle, as `fhir_candidates` describes them."""
    out = [Candidate(i, r.provenance.source_id, r) for i, r in enumerate(parsed.records)]
    for rejected in parsed.rejected:
        out.append(Candidate(len(out), rejected.patient_id, None, rejected.violations))
    if parsed.unattributed:
        out.append(Candidate(len(out), "", None, parsed.unattributed))
    return out


def hl7_candidates(content: bytes) -> list[Candidate]:
    """One candidate per PID of a mapped message; one "unsupported" candidate otherwise.

    Each message is its own source record, `<MSH-10 control id>#<n>` for its n-th patient: HL7 v2
    messages are events (a later lab result adds to an earlier one, it does not replace it), and
    a re-sent message carries the same control id, so it is recognised as a duplicate. The
    source id thus names no patient identifier (PID-3 only feeds the pseudonymous key).
    """
    parsed = hl7v2.parse_message(content)
    if parsed.outcome == "unsupported":
        return [Candidate(0, parsed.control_id, None, unsupported_reason=parsed.reason)]
    out: list[Candidate] = []
    for i, record in enumerate(parsed.records):
        source_id = f"{parsed.control_id}#{i + 1}"
        record = replace(record, provenance=replace(record.provenance, source_id=source_id))
        out.append(Candidate(i, source_id, record))
    return out


def candidates_for(kind: str, content: bytes) -> list[Candidate]:
    """The candidates of a "fhir" or "hl7v2" payload."""
    if kind == "fhir":
        return fhir_candidates(content)
    if kind == "hl7v2":
        return hl7_candidates(content)
    raise InvalidArgument("unknown payload kind", [FieldProblem("payload", f"{kind!r} is not fhir or hl7v2")])
