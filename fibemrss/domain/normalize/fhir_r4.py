"""FHIR R4 Bundle (JSON) -> PatientRecords: Patient, Encounter, Observation and Condition.

Parsed by hand with `json`, no FHIR library: the gateway needs four resource types and a strict,
predictable error model more than a full object model. Every problem is a FieldViolation whose
path names the entry (`entry[3].resource.valueQuantity.value`); descriptions never quote values
from the payload, so they are safe to return to a client and to log.

Fates follow FHIR semantics. A `transaction` bundle is all or nothing: any error raises
ParseError. In `batch`, `collection` and `searchset` bundles entries are independent: a patient
with a bad resource is returned in `rejected` (never partly), the others in `records`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timezone
from typing import Any

import orjson

from fibemrss.domain.records import (
    ICD10,
    ICD10_CM,
    LOINC,
    SEXES,
    SNOMED,
    Code,
    Condition,
    Encounter,
    Observation,
    PatientRecord,
    Provenance,
)

from . import ucum
from .errors import FieldViolation, ParseError
from .parsing import MAX_DETAILS, MAX_VIOLATIONS, DetailBudget, Violations, utc_offset

BUNDLE_TYPES = frozenset({"collection", "transaction", "batch", "searchset"})
MAPPED_TYPES = ("Patient", "Encounter", "Observation", "Condition")
UCUM_SYSTEM = "http://unitsofmeasure.org"
DEFAULT_SOURCE_SYSTEM = "fhir"
_Notes = Violations[FieldViolation]


@dataclass(frozen=True)
class RejectedPatient:
    """A patient of a non-transaction bundle left out because one of its resources is bad."""

    patient_id: str
    violations: tuple[FieldViolation, ...]


@dataclass(frozen=True)
class BundleParse:
    """What one bundle maps to.

    `resource_counts` counts every resource in the bundle by type, mapped or not.
    `mapped_counts` counts, for the four mapped types, the resources that went into `records`:
    an Observation resource counts once even when its components become several Observations.
    `notes` name data deliberately left out (a valueString, a quantity with a comparator...):
    informative, not errors. `unattributed` are errors in entries that belong to no patient of
    the bundle (a reference to a missing patient, for example).
    """

    bundle_type: str
    records: tuple[PatientRecord, ...]
    resource_counts: Mapping[str, int]
    mapped_counts: Mapping[str, int]
    rejected: tuple[RejectedPatient, ...] = ()
    unattributed: tuple[FieldViolation, ...] = ()
    notes: tuple[FieldViolation, ...] = ()
    # entry index -> key of the patient the entry belongs to (its record's source id), for
    # per-entry answers (FHIR batch-response); entries of no patient are absent.
    entry_patients: Mapping[int, str] = field(default_factory=dict)
    # Every entry's own error that belongs to no patient, also past the ones `unattributed` lists.
    entry_errors: EntryErrors = field(default_factory=lambda: EntryErrors(b"", ()))


@dataclass(frozen=True)
class EntryErrors:
    """The error of each entry that belongs to no patient (an entry has at most one), held as one
    byte per entry naming one of the bundle's few distinct (path after `entry[i]`, description)
    pairs: a batch of a million junk entries answers each with its own error (FHIR batch-response)
    without a million violation objects held at once."""

    codes: bytes  # per entry: 0 none, k: kinds[k - 1]
    kinds: tuple[tuple[str, str], ...]

    def of(self, entry: int) -> FieldViolation | None:
        code = self.codes[entry] if entry < len(self.codes) else 0
        if not code:
            return None
        suffix, description = self.kinds[code - 1]
        return FieldViolation(f"entry[{entry}]{suffix}", description)


class _Unattributed:
    """Errors in entries of no patient: the first MAX_VIOLATIONS kept as violations (the answer's
    list), and every one as its entry's code (`EntryErrors`)."""

    def __init__(self, entries: int) -> None:
        self.listed: Violations[FieldViolation] = Violations(FieldViolation)
        self.codes = bytearray(entries)
        self.kinds: dict[tuple[str, str], int] = {}

    def add(self, path: str, description: str) -> None:
        self.listed.add(path, description)
        match = _ENTRY_PATH.match(path)
        entry = int(match.group(1)) if match else -1
        if 0 <= entry < len(self.codes):
            kind = (path[path.index("]") + 1 :], description)
            code = self.kinds.get(kind)
            if code is None and len(self.kinds) < 255:
                code = self.kinds[kind] = len(self.kinds) + 1
            # Past 255 distinct kinds (descriptions are fixed texts: not seen) the first one stands.
            self.codes[entry] = code or 1

    def errors(self) -> EntryErrors:
        return EntryErrors(bytes(self.codes), tuple(self.kinds))


class _Invalid(Exception):
    """Internal: one field is bad; caught per entry and turned into a FieldViolation."""

    def __init__(self, path: str, description: str) -> None:
        super().__init__(description)
        self.path = path
        self.description = description


@dataclass
class _Patient:
    key: str
    index: int
    resource: dict[str, Any]
    # Capped while produced; the bundle's patients share one budget of violations kept.
    errors: Violations[FieldViolation]
    resources: list[dict[str, Any]] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    encounters: list[Encounter] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def parse_bundle(data: bytes | str) -> BundleParse:
    """Parse a FHIR R4 Bundle of type collection, transaction, batch or searchset.

    Raises ParseError when the payload is not a readable Bundle, and for any error in a
    transaction bundle. Never raises anything else.
    """
    return parse_bundle_object(_load_json(data))


def parse_bundle_object(bundle: Any) -> BundleParse:
    """`parse_bundle` of a bundle already read from JSON (the NDJSON import builds its own)."""
    if not isinstance(bundle, dict):
        raise ParseError([FieldViolation("$", "a FHIR Bundle must be a JSON object")])
    if bundle.get("resourceType") != "Bundle":
        raise ParseError([FieldViolation("resourceType", "must be 'Bundle'")])
    bundle_type = bundle.get("type")
    if not isinstance(bundle_type, str) or bundle_type not in BUNDLE_TYPES:
        allowed = ", ".join(sorted(BUNDLE_TYPES))
        raise ParseError([FieldViolation("type", f"must be one of {allowed}")])
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise ParseError([FieldViolation("entry", "must be an array")])
    bundle_source = _meta_source(bundle)

    resource_counts: Counter[str] = Counter()
    # Violations are capped while they are produced (a junk bundle costs counters, not objects):
    # every rejected patient still says why, and every bad entry keeps its own error.
    unattributed = _Unattributed(len(entries))
    notes: _Notes = Violations(FieldViolation, limit=MAX_DETAILS)
    resources: list[tuple[int, dict[str, Any], str]] = []  # (index, resource, fullUrl)
    for i, entry in enumerate(entries):
        path = f"entry[{i}]"
        if not isinstance(entry, dict):
            unattributed.add(path, "must be an object")
            continue
        full_url = entry.get("fullUrl", "")
        if not isinstance(full_url, str):
            unattributed.add(f"{path}.fullUrl", "must be a string")
            continue
        resource = entry.get("resource")
        if resource is None:
            notes.add(path, "entry has no resource: nothing to map")
            continue
        if not isinstance(resource, dict):
            unattributed.add(f"{path}.resource", "must be an object")
            continue
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            unattributed.add(f"{path}.resource.resourceType", "missing")
            continue
        resource_counts[rtype] += 1
        resources.append((i, resource, full_url))

    patients, index = _index_patients(resources, unattributed, DetailBudget())
    entry_patients = {p.index: key for key, p in patients.items()}
    types_by_url = {url: resource["resourceType"] for _, resource, url in resources if url}
    for i, resource, _ in resources:
        rtype = resource["resourceType"]
        if rtype == "Patient" or rtype not in MAPPED_TYPES:
            continue
        path = f"entry[{i}].resource"
        try:
            key = _resolve_subject(resource, path, index, types_by_url)
        except _Invalid as exc:
            unattributed.add(exc.path, exc.description)
            continue
        if key is None:
            notes.add(f"{path}.subject", f"{rtype} about something other than a patient")
            continue
        owner = patients[key]
        entry_patients[i] = key
        try:
            _map_resource(rtype, resource, path, owner, notes)
        except _Invalid as exc:
            owner.errors.add(exc.path, exc.description)

    records: list[PatientRecord] = []
    rejected: list[RejectedPatient] = []
    mapped: Counter[str] = Counter()
    for patient in patients.values():
        path = f"entry[{patient.index}].resource"
        record: PatientRecord | None = None
        try:
            record = _patient_record(patient, path, bundle_source, notes)
        except _Invalid as exc:
            patient.errors.add(exc.path, exc.description)
        if record is None or patient.errors:
            violations = (
                tuple(patient.errors.listed(path)) if patient.errors.kept else _omitted(patient.errors)
            )
            rejected.append(RejectedPatient(patient.key, violations))
            continue
        records.append(record)
        mapped.update(patient.counts)

    if bundle_type == "transaction" and (rejected or unattributed.listed):
        # A transaction is atomic in FHIR: one bad entry fails the whole bundle.
        total = unattributed.listed.total + sum(p.errors.total for p in patients.values())
        kept = [*unattributed.listed, *(v for p in patients.values() for v in p.errors)]
        kept.sort(key=_entry_order)
        kept = kept[:MAX_VIOLATIONS]
        if total > len(kept):
            kept.append(FieldViolation("entry", f"{total - len(kept)} more violations not listed"))
        raise ParseError(kept)
    return BundleParse(
        bundle_type=bundle_type,
        records=tuple(records),
        resource_counts=dict(resource_counts),
        mapped_counts={t: mapped.get(t, 0) for t in MAPPED_TYPES},
        rejected=tuple(rejected),
        unattributed=tuple(unattributed.listed.listed("entry")),
        notes=tuple(notes.listed("entry")),
        entry_patients=entry_patients,
        entry_errors=unattributed.errors(),
    )


# --- bundle level -----------------------------------------------------------------------------


def read_json(data: bytes | str) -> Any:
    """JSON as every FHIR input is read: UTF-8 (a BOM allowed), no NaN or Infinity; ParseError
    naming `$` otherwise."""
    return _load_json(data)


# An integer of 20 or more digits may lie outside 64 bits, where orjson reads a float (silently)
# and the standard library an exact int: a payload with a run of 20 digits anywhere is read by the
# standard library. Every digit made "0", then one search: a few ms for megabytes, where a regular
# expression takes longer than the decode it guards.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 20


def _long_digit_run(data: bytes | bytearray | memoryview | str) -> bool:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    return raw.translate(_DIGITS_AS_ZERO).find(_LONG_RUN) >= 0


def _load_json(data: bytes | str) -> Any:
    """orjson first: it decodes several times faster, and where it reads a payload it reads exactly
    what the standard library reads (the same dicts, lists, strings, correctly rounded floats, the
    last of duplicate keys; integers exactly, as long ones are left to the standard library).
    What it refuses (a BOM, a lone surrogate escape, NaN, overflowing numbers, nesting beyond
    1024 levels) the standard library reads or refuses below as it always has, so fates and
    error messages do not depend on the fast path."""
    if isinstance(data, bytes | bytearray | memoryview | str) and not _long_digit_run(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ParseError(
                [FieldViolation("$", f"not UTF-8 text (bad byte at offset {exc.start})")]
            ) from None
    elif isinstance(data, str):
        text = data.removeprefix("\ufeff")
    else:
        raise ParseError([FieldViolation("$", "payload must be bytes or text")])
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ParseError(
            [FieldViolation("$", f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]
        ) from None
    except (ValueError, RecursionError) as exc:
        # ValueError: NaN/Infinity or an integer too long to convert; RecursionError: nesting.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ParseError([FieldViolation("$", f"not acceptable JSON: {reason}")]) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _index_patients(
    resources: list[tuple[int, dict[str, Any], str]], unattributed: _Unattributed, budget: DetailBudget
) -> tuple[dict[str, _Patient], dict[str, str]]:
    """Patients by key (their id), and every reference form that names each of them."""
    patients: dict[str, _Patient] = {}
    index: dict[str, str] = {}
    for i, resource, full_url in resources:
        if resource["resourceType"] != "Patient":
            continue
        path = f"entry[{i}].resource"
        rid = resource.get("id")
        if rid is not None and (not isinstance(rid, str) or not rid):
            unattributed.add(f"{path}.id", "must be a non-empty string")
            continue
        key = rid or full_url
        if not key:
            unattributed.add(f"{path}.id", "Patient has neither an id nor a fullUrl")
            continue
        if key in patients:
            patients[key].errors.add(f"{path}.id", "the same Patient appears twice")
            continue
        errors = Violations(FieldViolation, budget=budget)
        patients[key] = _Patient(key=key, index=i, resource=resource, errors=errors)
        patients[key].resources.append(resource)
        names = [full_url] if full_url else []
        if rid:
            names.append(f"Patient/{rid}")
        for name in names:
            index.setdefault(name, key)
    return patients, index


_OTHER_REF = re.compile(
    r"(?:^|/)[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z"
)
_LITERAL_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z")


def _resolve_subject(
    resource: dict[str, Any], path: str, index: dict[str, str], types_by_url: dict[str, str]
) -> str | None:
    """The key of the patient the resource is about; None when its subject is not a patient
    (a Group, a Device, a Location); _Invalid when it names no one or a missing patient."""
    subject = resource.get("subject")
    if subject is None:
        raise _Invalid(f"{path}.subject", "missing: the resource names no patient")
    if not isinstance(subject, dict):
        raise _Invalid(f"{path}.subject", "must be a Reference object")
    ref = subject.get("reference")
    if not isinstance(ref, str) or not ref:
        raise _Invalid(f"{path}.subject.reference", "missing: only literal references are resolved")
    if ref in index:  # urn:uuid:..., a full URL, or Patient/id as written
        return index[ref]
    if ref in types_by_url:  # an entry of the bundle that is not a Patient
        return None
    match = _LITERAL_REF.search(ref)
    if match is None:
        if _OTHER_REF.search(ref):
            return None
        raise _Invalid(f"{path}.subject.reference", "is not a reference to a Patient of the bundle")
    key = index.get(f"Patient/{match.group(1)}")
    if key is None:
        raise _Invalid(f"{path}.subject.reference", "refers to a Patient that is not in the bundle")
    return key


def _meta_source(resource: dict[str, Any]) -> str | None:
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return None
    source = meta.get("source")
    if not isinstance(source, str) or not source.strip():
        return None
    # Meta.source may end in "#<request id>": drop it so re-sends keep one source system.
    return source.strip().split("#", 1)[0] or None


@functools.lru_cache(maxsize=64)
def _omitted_counted(total: int) -> tuple[FieldViolation, ...]:
    return (
        FieldViolation("entry", f"{total} violations not listed: the bundle already lists {MAX_DETAILS}"),
    )


def _omitted(errors: Violations[FieldViolation]) -> tuple[FieldViolation, ...]:
    """A patient's violations once the bundle's budget is spent: one line counting them, shared
    by every patient with as many (the answer reports no details past the budget either)."""
    return _omitted_counted(errors.total)


_ENTRY_PATH = re.compile(r"entry\[(\d+)\]")


def _entry_order(violation: FieldViolation) -> int:
    match = _ENTRY_PATH.match(violation.field)
    return int(match.group(1)) if match else -1


# --- resources --------------------------------------------------------------------------------


def _map_resource(rtype: str, resource: dict[str, Any], path: str, owner: _Patient, notes: _Notes) -> None:
    if rtype == "Observation":
        observations = _observations(resource, path, notes)
        if not observations:
            notes.add(path, "Observation has no value the gateway maps")
            return
        owner.observations.extend(observations)
    elif rtype == "Encounter":
        owner.encounters.append(_encounter(resource, path))
    elif rtype == "Condition":
        condition = _condition(resource, path, notes)
        if condition is None:
            return
        owner.conditions.append(condition)
    owner.resources.append(resource)
    owner.counts[rtype] += 1


def _patient_record(patient: _Patient, path: str, bundle_source: str | None, notes: _Notes) -> PatientRecord:
    res = patient.resource
    gender = _opt_str(res, "gender", path)
    if gender is not None and gender not in SEXES:
        raise _Invalid(f"{path}.gender", "must be male, female, other or unknown")
    birth = _opt_str(res, "birthDate", path)
    birth_date = _date(birth, f"{path}.birthDate", notes) if birth is not None else None
    try:
        payload = json.dumps(patient.resources, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise _Invalid(path, "nested too deeply") from None
    patient.counts["Patient"] += 1
    return PatientRecord(
        source_patient_id=_patient_identifier(res, path) or patient.key,
        provenance=Provenance(
            source_system=_meta_source(res) or bundle_source or DEFAULT_SOURCE_SYSTEM,
            source_id=patient.key,
            payload_sha256=hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest(),
        ),
        sex=gender,
        birth_date=birth_date,
        observations=tuple(patient.observations),
        conditions=tuple(patient.conditions),
        encounters=tuple(patient.encounters),
    )


def _patient_identifier(res: dict[str, Any], path: str) -> str | None:
    """The medical record number (identifier of type MR) if there is one, else the first
    identifier with a value."""
    identifiers = res.get("identifier", [])
    if not isinstance(identifiers, list):
        raise _Invalid(f"{path}.identifier", "must be an array")
    first: str | None = None
    for j, ident in enumerate(identifiers):
        if not isinstance(ident, dict):
            raise _Invalid(f"{path}.identifier[{j}]", "must be an object")
        value = _opt_str(ident, "value", f"{path}.identifier[{j}]")
        if not value:
            continue
        codes = [c.code for c in _codings(ident.get("type"), f"{path}.identifier[{j}].type")]
        if "MR" in codes:
            return value
        first = first or value
    return first


def _observations(res: dict[str, Any], path: str, notes: _Notes) -> list[Observation]:
    code = _required_code(res.get("code"), f"{path}.code", notes)
    if code is None:
        return []
    effective = _effective(res, path)
    obs_id = _opt_str(res, "id", path) or ""
    components = res.get("component", [])
    if not isinstance(components, list):
        raise _Invalid(f"{path}.component", "must be an array")
    out: list[Observation] = []
    has_value = any(key.startswith("value") for key in res)
    if has_value or not components:
        # A panel (blood pressure 85354-9) has no value of its own, only its components.
        value = _value(res, path, notes)
        if value is not None:
            out.append(Observation(code=code, effective=effective, source_id=obs_id, **value))
    for j, comp in enumerate(components):
        cpath = f"{path}.component[{j}]"
        if not isinstance(comp, dict):
            raise _Invalid(cpath, "must be an object")
        ccode = _required_code(comp.get("code"), f"{cpath}.code", notes)
        value = _value(comp, cpath, notes)
        if ccode is not None and value is not None:
            source_id = f"{obs_id}#component[{j}]" if obs_id else ""
            out.append(Observation(code=ccode, effective=effective, source_id=source_id, **value))
    return out


def _value(obj: dict[str, Any], path: str, notes: _Notes) -> dict[str, Any] | None:
    """Observation keyword arguments for the element's value[x]; {} when it has none (the
    observation was made, no value given); None when its kind of value is not mapped."""
    keys = [k for k in obj if k.startswith("value")]
    if not keys:
        return {}
    if len(keys) > 1:
        raise _Invalid(f"{path}.value[x]", "more than one value[x]")
    key = keys[0]
    vpath = f"{path}.{key}"
    raw = obj[key]
    if key == "valueQuantity":
        return _quantity(raw, vpath, notes)
    if key == "valueCodeableConcept":
        value_code = _code(raw, vpath, prefer=(SNOMED, LOINC))
        if value_code is None:
            notes.add(vpath, "has text only, no code: not mapped")
            return None
        return {"value_code": value_code}
    if key == "valueInteger":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _Invalid(vpath, "must be an integer")
        return {"value": float(raw)}
    notes.add(vpath, f"{key} is not mapped")
    return None


def _quantity(raw: Any, path: str, notes: _Notes) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        raise _Invalid(path, "must be a Quantity object")
    value = raw.get("value")
    if value is None:
        raise _Invalid(f"{path}.value", "missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"{path}.value", "must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        raise _Invalid(f"{path}.value", "is out of range") from None
    if not math.isfinite(number):
        raise _Invalid(f"{path}.value", "must be a finite number")
    if raw.get("comparator") is not None:
        notes.add(f"{path}.comparator", "a bound such as '<5' is not a measured value")
        return None
    system = _opt_str(raw, "system", path)
    code = _opt_str(raw, "code", path)
    unit = _opt_str(raw, "unit", path)
    # The UCUM code is the machine-readable unit; `unit` is display text, used only without it.
    written = code if code and (system in (None, UCUM_SYSTEM)) else unit or code
    return {"value": number, "unit": ucum.normalize_unit(written)}


def _encounter(res: dict[str, Any], path: str) -> Encounter:
    rid = _opt_str(res, "id", path)
    if not rid:
        raise _Invalid(f"{path}.id", "missing: an Encounter needs an id")
    class_code = ""
    klass = res.get("class")
    if klass is not None:
        # R4 Encounter.class is a Coding; some senders write a CodeableConcept (as in R5).
        if isinstance(klass, dict) and "coding" not in klass:
            class_code = _opt_str(klass, "code", f"{path}.class") or ""
        else:
            codings = _codings(klass[0] if isinstance(klass, list) and klass else klass, f"{path}.class")
            class_code = codings[0].code if codings else ""
    start = end = None
    period = res.get("period")
    if period is not None:
        if not isinstance(period, dict):
            raise _Invalid(f"{path}.period", "must be a Period object")
        start = _opt_datetime(period, "start", f"{path}.period")
        end = _opt_datetime(period, "end", f"{path}.period")
        if start and end and end < start:
            raise _Invalid(f"{path}.period.end", "is before period.start")
    return Encounter(source_id=rid, class_code=class_code, start=start, end=end)


def _condition(res: dict[str, Any], path: str, notes: _Notes) -> Condition | None:
    code = _code(res.get("code"), f"{path}.code", prefer=(SNOMED, ICD10, ICD10_CM))
    if code is None:  # Condition.code is optional in FHIR; without one there is nothing to map
        notes.add(f"{path}.code", "no coded condition: not mapped")
        return None
    onset = None
    if "onsetDateTime" in res:
        onset = _opt_datetime(res, "onsetDateTime", path)
    elif "onsetPeriod" in res:
        period = res["onsetPeriod"]
        if not isinstance(period, dict):
            raise _Invalid(f"{path}.onsetPeriod", "must be a Period object")
        onset = _opt_datetime(period, "start", f"{path}.onsetPeriod")
    else:
        other = [k for k in res if k.startswith("onset")]
        if other:
            notes.add(f"{path}.{other[0]}", "only onsetDateTime and onsetPeriod are mapped")
    status_codes = _codings(res.get("clinicalStatus"), f"{path}.clinicalStatus")
    return Condition(
        code=code,
        onset=onset,
        clinical_status=status_codes[0].code if status_codes else "",
        source_id=_opt_str(res, "id", path) or "",
    )


# --- data types -------------------------------------------------------------------------------


def _opt_str(obj: dict[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{path}.{key}", "must be a string")
    return value


def _codings(concept: Any, path: str) -> list[Code]:
    """The codings of a CodeableConcept (or of a bare Coding) that have a code."""
    if concept is None:
        return []
    if not isinstance(concept, dict):
        raise _Invalid(path, "must be an object")
    if "coding" not in concept:
        concept = {"coding": [concept]} if "code" in concept else {"coding": []}
    codings = concept["coding"]
    if not isinstance(codings, list):
        raise _Invalid(f"{path}.coding", "must be an array")
    out: list[Code] = []
    for j, coding in enumerate(codings):
        cpath = f"{path}.coding[{j}]"
        if not isinstance(coding, dict):
            raise _Invalid(cpath, "must be an object")
        code = _opt_str(coding, "code", cpath)
        if code:
            system = _opt_str(coding, "system", cpath) or ""
            out.append(Code(system=system, code=code, display=_opt_str(coding, "display", cpath) or ""))
    return out


def _code(concept: Any, path: str, prefer: tuple[str, ...]) -> Code | None:
    """The preferred coding of a CodeableConcept; None when it is absent or has text only."""
    codings = _codings(concept, path)
    for system in prefer:
        for coding in codings:
            if coding.system == system:
                return coding
    return codings[0] if codings else None


def _required_code(concept: Any, path: str, notes: _Notes) -> Code | None:
    """Observation.code (and component.code): required by FHIR, so a missing one is an error;
    a text-only one is valid FHIR that the schema cannot hold, so it is noted and skipped."""
    if concept is None:
        raise _Invalid(path, "missing")
    code = _code(concept, path, prefer=(LOINC,))
    if code is None:
        notes.add(path, "has text only, no code: not mapped")
    return code


def _effective(res: dict[str, Any], path: str) -> datetime | None:
    if "effectiveDateTime" in res:
        return _opt_datetime(res, "effectiveDateTime", path)
    if "effectiveInstant" in res:
        return _opt_datetime(res, "effectiveInstant", path)
    if "effectivePeriod" in res:
        period = res["effectivePeriod"]
        if not isinstance(period, dict):
            raise _Invalid(f"{path}.effectivePeriod", "must be a Period object")
        return _opt_datetime(period, "start", f"{path}.effectivePeriod")
    return None


_DATETIME = re.compile(
    r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})"
    r"(?:T([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
)


def _opt_datetime(obj: dict[str, Any], key: str, path: str) -> datetime | None:
    text = _opt_str(obj, key, path)
    return None if text is None else _parse_datetime(text, f"{path}.{key}")


def _parse_datetime(text: str, path: str) -> datetime:
    """A FHIR date, dateTime or instant as an aware UTC datetime; a partial date stands for the
    start of its period (UTC midnight)."""
    match = _DATETIME.fullmatch(text)
    if match is None:
        raise _Invalid(
            path, "is not a FHIR date/dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz)"
        )
    year, month, day, hour, minute, second, frac, zone = match.groups()
    if hour is not None and zone is None:
        raise _Invalid(path, "a dateTime with a time must have a time zone offset")
    try:
        tz = UTC if zone in (None, "Z") else _offset(zone)
        value = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((frac or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
        return value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _Invalid(path, "is not a valid calendar date and time") from None


def _offset(zone: str) -> timezone:
    return utc_offset(zone[0], zone[1:3], zone[4:6])


_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")


def _date(text: str, path: str, notes: _Notes) -> date:
    match = _DATE.fullmatch(text)
    if match is None:
        raise _Invalid(path, "is not a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)")
    year, month, day = match.groups()
    try:
        value = date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        raise _Invalid(path, "is not a valid calendar date") from None
    if day is None:
        notes.add(path, "partial date: read as the first day of the period")
    return value
