"""HL7 v2.3-v2.8 messages -> PatientRecords: ADT demographics and visits, ORU/OUL lab results.

Parsed by hand (no HL7 library): delimiters come from MSH-1/MSH-2, segments may end in CR, LF
or CRLF, a UTF-8 byte-order mark and MLLP framing bytes are tolerated. A message is one unit: any
error raises ParseError naming every bad field (`OBX[3]-5`: the third OBX of the message, field
5), so no record of it is partly written. Message types the gateway does not map come back as
outcome "unsupported" with the reason, not as errors. Descriptions never quote field values.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timezone, tzinfo
from typing import Literal
from urllib.parse import quote

from fibemrss.domain.normalize import ucum
from fibemrss.domain.normalize.errors import FieldViolation, ParseError
from fibemrss.domain.normalize.parsing import Violations, utc_offset
from fibemrss.domain.records import (
    ICD10,
    ICD10_CM,
    LOINC,
    SNOMED,
    Code,
    Condition,
    Encounter,
    Observation,
    PatientRecord,
    Provenance,
)

# Message code -> trigger events the gateway maps.
MAPPED_EVENTS: dict[str, frozenset[str]] = {
    "ADT": frozenset({"A01", "A02", "A03", "A04", "A08"}),
    "ORU": frozenset({"R01"}),
    "OUL": frozenset({"R22", "R23", "R24"}),
}
SUPPORTED_VERSIONS = re.compile(r"2\.[3-8](?:\.[0-9]+)?")
# Local code systems (anything but the standard ones below) are namespaced by their HL7 name.
LOCAL_SYSTEM_PREFIX = "urn:fibemrss:hl7v2:"
ICD9_CM = "http://hl7.org/fhir/sid/icd-9-cm"
# HL7 table 0396 names of the code systems the schema knows.
CODE_SYSTEMS: dict[str, str] = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": SNOMED,
    "SNM": SNOMED,
    "SNOMED": SNOMED,
    "SNOMEDCT": SNOMED,
    "I10": ICD10,
    "ICD10": ICD10,
    "I10C": ICD10_CM,
    "ICD10CM": ICD10_CM,
    "I9": ICD9_CM,
    "I9C": ICD9_CM,
}
# PID-8 administrative sex (HL7 table 0001) -> FHIR administrative gender.
SEXES: dict[str, str] = {
    "M": "male",
    "F": "female",
    "O": "other",
    "A": "other",
    "U": "unknown",
    "N": "unknown",
}
# PV1-2 patient class (HL7 table 0004) -> FHIR v3 ActCode, as in the HL7 v2-to-FHIR mapping.
PATIENT_CLASSES: dict[str, str] = {"I": "IMP", "O": "AMB", "E": "EMER", "P": "PRENC", "R": "AMB", "B": "IMP"}
# OBX-11 result statuses whose value must not be used: deleted, wrong patient, not obtainable.
DISCARDED_STATUSES: dict[str, str] = {
    "D": "deleted",
    "W": "posted in error (wrong patient or test)",
    "X": "could not be obtained",
}

_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
_DTM = re.compile(
    r"([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,4}))?)?)?)?)?)?"
    r"([+-][0-9]{4})?"
)


@dataclass(frozen=True)
class Hl7Parse:
    """What one message maps to.

    `records` has one PatientRecord per PID segment of a mapped message (ORU^R01 may report on
    several patients), empty when the outcome is "unsupported". `notes` name data deliberately
    left out (a text OBX, a deleted result...): informative, not errors.
    """

    outcome: Literal["mapped", "unsupported"]
    message_type: str  # "ORU^R01"; the code alone when MSH-9 has no trigger event
    version: str  # MSH-12
    control_id: str  # MSH-10
    reason: str = ""  # why a message is unsupported
    records: tuple[PatientRecord, ...] = ()
    notes: tuple[FieldViolation, ...] = ()
    segment_counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Delimiters:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str


@dataclass(frozen=True)
class _Segment:
    name: str
    fields: list[str]  # fields[n] is SEG-n; for MSH, fields[1] is the field separator
    path: str  # "OBX[3]": the third OBX of the message

    def get(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""


class _Reader:
    """Field, component and repetition access with HL7 escapes decoded."""

    def __init__(self, delims: _Delimiters) -> None:
        self.d = delims

    def reps(self, raw: str) -> list[str]:
        return raw.split(self.d.repetition) if raw else []

    def comp(self, raw: str, n: int = 1, rep: int = 0, sub: int = 1) -> str:
        """Component n (1-based) of repetition rep, subcomponent sub, unescaped and stripped."""
        reps = self.reps(raw)
        if rep >= len(reps):
            return ""
        comps = reps[rep].split(self.d.component)
        if n > len(comps):
            return ""
        subs = comps[n - 1].split(self.d.subcomponent)
        return self.unescape(subs[sub - 1]).strip() if sub <= len(subs) else ""

    def unescape(self, text: str) -> str:
        esc = self.d.escape
        if esc not in text:
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            end = text.find(esc, i + 1) if text[i] == esc else -1
            if end == -1:
                out.append(text[i])
                i += 1
                continue
            out.append(self._escape_sequence(text[i + 1 : end], text[i : end + 1]))
            i = end + 1
        return "".join(out)

    def _escape_sequence(self, body: str, literal: str) -> str:
        d = self.d
        simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}
        if body in simple:
            return simple[body]
        if body.startswith("X") and len(body) % 2 == 1:
            try:
                return bytes.fromhex(body[1:]).decode("utf-8", "replace")
            except ValueError:
                return literal
        if body in ("H", "N") or body.startswith((".", "C", "M", "Z")):
            return ""  # highlighting, formatting and character-set switches carry no data here
        return literal


def parse_message(data: bytes | str, default_tz: tzinfo = UTC) -> Hl7Parse:
    """Parse one HL7 v2 message.

    Timestamps without an offset are read in `default_tz`: HL7 leaves them in the sender's local
    time, which only the feed's configuration knows. Raises ParseError for structural garbage
    and for bad fields of a mapped message; never raises anything else.
    """
    text = _decode(data)
    lines = _lines(text)
    segments, delims = _segments(lines)
    reader = _Reader(delims)
    msh = segments[0]
    message_code = reader.comp(msh.get(9), 1)
    trigger = reader.comp(msh.get(9), 2)
    control_id = reader.comp(msh.get(10), 1)
    version = reader.comp(msh.get(12), 1)
    errors: Violations[FieldViolation] = Violations(FieldViolation)
    if not message_code:
        errors.add("MSH-9", "message type missing")
    if not control_id:
        errors.add("MSH-10", "message control id missing")
    if not version:
        errors.add("MSH-12", "version id missing")
    elif not re.fullmatch(r"[0-9]+(?:\.[0-9]+)*", version):
        errors.add("MSH-12", "version id is not a version number")
    if errors:
        raise ParseError(errors.listed("message"))
    message_type = f"{message_code}^{trigger}" if trigger else message_code
    counts = dict(Counter(s.name for s in segments))

    reason = ""
    if not SUPPORTED_VERSIONS.fullmatch(version):
        reason = f"HL7 version {version} is not supported (2.3 to 2.8)"
    elif trigger not in MAPPED_EVENTS.get(message_code, frozenset()):
        mapped = "; ".join(f"{code} {', '.join(sorted(events))}" for code, events in MAPPED_EVENTS.items())
        reason = f"message type {message_type} is not mapped (mapped: {mapped})"
    if reason:
        return Hl7Parse(
            "unsupported", message_type, version, control_id, reason=reason, segment_counts=counts
        )

    mapper = _Mapper(reader, segments, control_id, default_tz)
    records = mapper.records(lines)
    if mapper.errors:
        raise ParseError(mapper.errors.listed("message"))
    return Hl7Parse(
        "mapped",
        message_type,
        version,
        control_id,
        records=tuple(records),
        notes=tuple(mapper.notes.listed("message")),
        segment_counts=counts,
    )


# --- structure --------------------------------------------------------------------------------


def _decode(data: bytes | str) -> str:
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data).strip(b"\x0b\x1c\r\n\t ").removeprefix(b"\xef\xbb\xbf")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Legacy feeds send ISO 8859-1 and say so in MSH-18; any other byte soup is refused.
            if re.search(rb"\|8859/1\b", raw.split(b"\r", 1)[0].split(b"\n", 1)[0]):
                return raw.decode("latin-1")
            raise ParseError(
                [FieldViolation("MSH-18", f"not UTF-8 text (bad byte at offset {exc.start}) and no 8859/1")]
            ) from None
    if isinstance(data, str):
        return data.strip("\x0b\x1c\r\n\t ").removeprefix("\ufeff")
    raise ParseError([FieldViolation("message", "payload must be bytes or text")])


def _lines(text: str) -> list[str]:
    """The message's segments as text: split at CR, LF or CRLF, blank lines left out. (The same
    split as `re.split(r"\r\n|\r|\n")`, a few times faster: CRLF, then LF, become CR first.)"""
    return [line for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if line.strip()]


def _segments(lines: list[str]) -> tuple[list[_Segment], _Delimiters]:
    if not lines or not lines[0].startswith("MSH"):
        raise ParseError([FieldViolation("MSH", "message does not start with an MSH segment")])
    delims = _delimiters(lines[0])
    segments: list[_Segment] = []
    seen: Counter[str] = Counter()
    # Capped while produced: a message of a million junk lines costs a counter past the first ones.
    errors: Violations[FieldViolation] = Violations(FieldViolation)
    for i, line in enumerate(lines):
        name = line[:3]
        if not _SEGMENT_NAME.fullmatch(name) or (len(line) > 3 and line[3] != delims.field):
            errors.add(f"segment[{i}]", "not an HL7 segment (name, then field separator)")
            continue
        seen[name] += 1
        fields = line.split(delims.field)
        if name == "MSH":
            # MSH-1 is the field separator itself, so MSH fields are shifted by one.
            fields = ["MSH", delims.field, *fields[1:]]
        segments.append(_Segment(name, fields, f"{name}[{seen[name]}]"))
    if seen["MSH"] > 1:
        errors.add("MSH", "more than one MSH: send one message per payload")
    if errors:
        raise ParseError(errors.listed("message"))
    return segments, delims


def _delimiters(msh: str) -> _Delimiters:
    if len(msh) < 4:
        raise ParseError([FieldViolation("MSH-1", "field separator missing")])
    sep = msh[3]
    if sep.isalnum() or sep.isspace():
        raise ParseError([FieldViolation("MSH-1", "field separator must be a punctuation character")])
    end = msh.find(sep, 4)
    enc = msh[4:] if end == -1 else msh[4:end]
    if (
        len(enc) not in (4, 5)
        or len(set(enc + sep)) != len(enc) + 1
        or any(c.isalnum() or c.isspace() for c in enc)
    ):
        raise ParseError(
            [FieldViolation("MSH-2", "encoding characters must be 4 or 5 distinct punctuation marks")]
        )
    return _Delimiters(field=sep, component=enc[0], repetition=enc[1], escape=enc[2], subcomponent=enc[3])


# --- mapping ----------------------------------------------------------------------------------


class _Mapper:
    """Maps the segments of one supported message; collects errors and notes as it goes."""

    def __init__(
        self, reader: _Reader, segments: list[_Segment], control_id: str, default_tz: tzinfo
    ) -> None:
        self.r = reader
        self.segments = segments
        self.control_id = control_id
        self.default_tz = default_tz
        # Both capped while produced (`parsing.Violations`): the first ones made, the rest counted.
        self.errors: Violations[FieldViolation] = Violations(FieldViolation)
        self.notes: Violations[FieldViolation] = Violations(FieldViolation)

    def records(self, lines: list[str]) -> list[PatientRecord]:
        msh = self.segments[0]
        source_system = self._source_system(msh)
        # The hash covers the message in canonical form (CR-separated, no BOM or framing), so
        # a re-send over another transport is recognised as the same payload.
        canonical = "\r".join(lines)
        digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()

        groups: list[list[_Segment]] = []
        orphans: list[_Segment] = []
        for seg in self.segments[1:]:
            if seg.name == "PID":
                groups.append([seg])
            elif groups:
                groups[-1].append(seg)
            elif seg.name in ("OBX", "PV1", "DG1"):
                orphans.append(seg)
        if not groups:
            self.errors.add("PID", "patient identification segment missing")
            return []
        for seg in orphans:
            self.errors.add(seg.path, "comes before any PID: no patient to attach it to")
        out: list[PatientRecord] = []
        for group in groups:
            record = self._record(group, source_system, digest)
            if record is not None:
                out.append(record)
        return out

    def _source_system(self, msh: _Segment) -> str:
        parts = [self.r.comp(msh.get(n), 1) or self.r.comp(msh.get(n), 2) for n in (3, 4)]
        named = [p for p in parts if p]
        return "@".join(named) if named else "hl7v2"

    def _record(self, group: list[_Segment], source_system: str, digest: str) -> PatientRecord | None:
        pid = group[0]
        patient_id = self._patient_id(pid)
        sex_code = self.r.comp(pid.get(8), 1).upper()
        sex = SEXES.get(sex_code)
        if sex_code and sex is None:
            self.notes.add(f"{pid.path}-8", "administrative sex code not in HL7 table 0001")
        observations: list[Observation] = []
        encounters: list[Encounter] = []
        conditions: list[Condition] = []
        obr_time: datetime | None = None
        for seg in group[1:]:
            if seg.name == "OBR":
                obr_time = self._time(seg, 7)
            elif seg.name == "OBX":
                observations.extend(self._observations(seg, obr_time))
            elif seg.name == "PV1" and not encounters:
                encounters.append(self._encounter(seg))
            elif seg.name == "DG1":
                condition = self._condition(seg)
                if condition is not None:
                    conditions.append(condition)
        birth_date = self._birth_date(pid)
        if patient_id is None:
            return None
        return PatientRecord(
            source_patient_id=patient_id,
            provenance=Provenance(source_system=source_system, source_id=patient_id, payload_sha256=digest),
            sex=sex,
            birth_date=birth_date,
            observations=tuple(observations),
            conditions=tuple(conditions),
            encounters=tuple(encounters),
        )

    def _patient_id(self, pid: _Segment) -> str | None:
        """PID-3: the medical record number (identifier type MR) if listed, else the first id."""
        raw = pid.get(3)
        first = None
        for rep in range(len(self.r.reps(raw))):
            value = self.r.comp(raw, 1, rep)
            if value and self.r.comp(raw, 5, rep).upper() == "MR":
                return value
            first = first or value or None
        if first:
            return first
        external = self.r.comp(pid.get(2), 1)  # PID-2, the external id of v2.3, withdrawn later
        if external:
            self.notes.add(f"{pid.path}-3", "empty: the patient is identified by PID-2")
            return external
        self.errors.add(f"{pid.path}-3", "patient identifier missing")
        return None

    def _birth_date(self, pid: _Segment) -> date | None:
        raw = self.r.comp(pid.get(7), 1)
        if not raw:
            return None
        match = _DTM.fullmatch(raw)
        path = f"{pid.path}-7"
        if match is None:
            self.errors.add(path, "is not an HL7 date/time (YYYY[MM[DD[HHMM[SS]]]][+/-ZZZZ])")
            return None
        year, month, day = match.group(1, 2, 3)
        try:
            # A birth date is a calendar date where the patient was born: no time-zone shift.
            value = date(int(year), int(month or 1), int(day or 1))
        except ValueError:
            self.errors.add(path, "is not a valid calendar date")
            return None
        if day is None:
            self.notes.add(path, "partial date: read as the first day of the period")
        return value

    def _encounter(self, pv1: _Segment) -> Encounter:
        visit = self.r.comp(pv1.get(19), 1)
        if not visit:
            self.notes.add(f"{pv1.path}-19", "visit number missing: the message identifies the visit")
            visit = f"{self.control_id}/{pv1.path}"
        patient_class = self.r.comp(pv1.get(2), 1).upper()
        start, end = self._time(pv1, 44), self._time(pv1, 45)
        if start and end and end < start:
            self.errors.add(f"{pv1.path}-45", "discharge is before admission (PV1-44)")
        return Encounter(
            source_id=visit,
            class_code=PATIENT_CLASSES.get(patient_class, patient_class),
            start=start,
            end=end,
        )

    def _condition(self, dg1: _Segment) -> Condition | None:
        code = self._code(dg1.get(3))
        if code is None:
            self.notes.add(f"{dg1.path}-3", "no coded diagnosis: not mapped")
            return None
        source_id = self.r.comp(dg1.get(20), 1) or f"{self.control_id}/{dg1.path}"
        # DG1-5 is when the diagnosis was made: the closest HL7 v2 has to an onset.
        return Condition(code=code, onset=self._time(dg1, 5), source_id=source_id)

    def _observations(self, obx: _Segment, obr_time: datetime | None) -> list[Observation]:
        value_type = self.r.comp(obx.get(2), 1).upper()
        status = self.r.comp(obx.get(11), 1).upper()
        if status in DISCARDED_STATUSES:
            self.notes.add(f"{obx.path}-11", f"result {DISCARDED_STATUSES[status]}: not mapped")
            return []
        if value_type not in ("NM", "SN", "CE", "CWE", "CNE"):
            self.notes.add(f"{obx.path}-2", f"value type {value_type or '(none)'} is not mapped")
            return []
        code = self._code(obx.get(3))
        if code is None:
            self.errors.add(f"{obx.path}-3", "observation identifier missing")
            return []
        effective = self._time(obx, 14) or obr_time
        raw = obx.get(5)
        reps = self.r.reps(raw) or [""]
        if len(reps) > 1:
            self.notes.add(f"{obx.path}-5", f"{len(reps)} repetitions: one observation each")
        out: list[Observation] = []
        for rep in range(len(reps)):
            source_id = f"{self.control_id}/{obx.path}" + (f"#{rep + 1}" if rep else "")
            path = f"{obx.path}-5" + (f"[{rep + 1}]" if len(reps) > 1 else "")
            if value_type in ("NM", "SN"):
                mapped, value = self._number(raw, rep, value_type, path)
                if not mapped:
                    continue
                unit = ucum.normalize_unit(self.r.comp(obx.get(6), 1) or self.r.comp(obx.get(6), 2))
                out.append(
                    Observation(code=code, value=value, unit=unit, effective=effective, source_id=source_id)
                )
            else:
                value_code = self._code(raw, rep)
                if value_code is None and self.r.comp(raw, 2, rep):
                    self.notes.add(path, "coded value has text only: not mapped")
                    continue
                out.append(
                    Observation(code=code, value_code=value_code, effective=effective, source_id=source_id)
                )
        return out

    def _number(self, raw: str, rep: int, value_type: str, path: str) -> tuple[bool, float | None]:
        """(mapped, value): the value is None when empty (observed, no value given)."""
        if value_type == "SN":
            # Structured numeric: comparator^num1^separator^num2. Only a plain number is a value;
            # "<^5" or "^1^:^128" are bounds and ratios.
            comparator, separator = self.r.comp(raw, 1, rep), self.r.comp(raw, 3, rep)
            text = self.r.comp(raw, 2, rep)
            if comparator not in ("", "=") or separator or self.r.comp(raw, 4, rep):
                self.notes.add(path, "structured numeric with a comparator or ratio: not mapped")
                return False, None
        else:
            text = self.r.comp(raw, 1, rep)
        if not text:
            return True, None
        if not _NUMBER.fullmatch(text):
            self.errors.add(path, f"is not a number (value type {value_type})")
            return False, None
        value = float(text)
        if not math.isfinite(value):
            self.errors.add(path, "number is out of range")
            return False, None
        return True, value

    def _code(self, raw: str, rep: int = 0) -> Code | None:
        """A CE/CWE as a Code, from its first triplet or, failing that, its alternate one."""
        for first in (1, 4):
            code = self.r.comp(raw, first, rep)
            if code:
                system = self.r.comp(raw, first + 2, rep)
                display = self.r.comp(raw, first + 1, rep)
                return Code(system=_system(system), code=code, display=display)
        return None

    def _time(self, seg: _Segment, n: int) -> datetime | None:
        raw = self.r.comp(seg.get(n), 1)
        if not raw:
            return None
        path = f"{seg.path}-{n}"
        match = _DTM.fullmatch(raw)
        if match is None:
            self.errors.add(path, "is not an HL7 date/time (YYYY[MM[DD[HHMM[SS]]]][+/-ZZZZ])")
            return None
        year, month, day, hour, minute, second, frac, offset = match.groups()
        try:
            tz = self.default_tz if offset is None else _offset(offset)
            value = datetime(
                int(year),
                int(month or 1),
                int(day or 1),
                int(hour or 0),
                int(minute or 0),
                int(second or 0),
                int((frac or "0").ljust(6, "0")),
                tzinfo=tz,
            )
            return value.astimezone(UTC)
        except (ValueError, OverflowError):
            self.errors.add(path, "is not a valid calendar date and time")
            return None


def _offset(text: str) -> timezone:
    return utc_offset(text[0], text[1:3], text[3:5])


def _system(name: str) -> str:
    known = CODE_SYSTEMS.get(name.upper().replace("-", "").replace(" ", ""))
    if known is not None:
        return known
    return LOCAL_SYSTEM_PREFIX + (quote(name, safe="") if name else "local")
