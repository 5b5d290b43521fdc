"""HL7 v2 acknowledgements (original mode) for one ingested message (pure: no sockets, no database).

MSA-1 says the message's fate: AA accepted (or a duplicate of one already stored), AE an
application error (a field rejected, or the record held in quarantine: MSA-3 and ERR-5 say
which), AR rejected whole (a message type or version we do not map, or bytes that are no HL7
message). MSA-2 echoes the message's control id (MSH-10). Every problem is one ERR segment:
ERR-2 locates the field (`OBX^3^5` for our path `OBX[3]-5`), ERR-3 is an HL7 table 0357 code,
ERR-4 the severity (E, or W for a quarantined record), ERR-8 the reason. Reasons never hold
values from the message (the parsers' rule), so an ACK carries no patient data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from fibemrss.domain.errors import FieldProblem
from services.emr_gateway.core.ingestion import Outcome

AckCode = Literal["AA", "AE", "AR"]
SENDING_APPLICATION = "FIBEMRSS"
ACK_VERSION = "2.5.1"  # used when the message names no version we can echo
# Common clients read an ACK with one 4 KiB recv (python-hl7's MLLPClient does): stay under it.
MAX_ACK_BYTES = 3900

# HL7 table 0357 (message error condition codes).
_REQUIRED_FIELD_MISSING = ("101", "Required field missing")
_DATA_TYPE_ERROR = ("102", "Data type error")
_TABLE_VALUE_NOT_FOUND = ("103", "Table value not found")
_UNSUPPORTED_MESSAGE_TYPE = ("200", "Unsupported message type")
_UNSUPPORTED_VERSION = ("203", "Unsupported version id")
_INTERNAL_ERROR = ("207", "Application internal error")
_ACCEPTED = ("0", "Message accepted")


@dataclass(frozen=True)
class MessageHeader:
    """What an ACK echoes from the message's MSH, read leniently: the message may be unreadable."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    trigger_event: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = ""


_FRAMING = b"\x0b\x1c\r\n\t "  # MLLP framing bytes and blank space around a message
_ONLY_FRAMING = re.compile(rb"[\x0b\x1c\r\n\t ]*")


def read_header(message: bytes) -> MessageHeader:
    """The MSH fields of a message as far as they can be read; empty ones where they cannot."""
    # Only the first segment is read (and decoded): the MLLP listener reads the header of every
    # message on its event loop, and a message may be megabytes long.
    text = message.lstrip(_FRAMING).removeprefix(b"\xef\xbb\xbf")
    line = re.split(rb"\r|\n", text, maxsplit=1)[0]
    if _ONLY_FRAMING.fullmatch(text, len(line)):  # the last segment: framing after it goes
        line = line.rstrip(_FRAMING)
    first = line.decode("latin-1")
    if not first.startswith("MSH") or len(first) < 8:
        return MessageHeader()
    sep = first[3]
    component = first[4]
    fields = first.split(sep)  # fields[0] = "MSH", fields[1] = encoding characters, fields[n] = MSH-(n+1)

    def msh(n: int, comp: int = 1) -> str:
        raw = fields[n - 1] if n - 1 < len(fields) else ""
        parts = raw.split(component)
        return _clean(parts[comp - 1] if comp - 1 < len(parts) else "")

    return MessageHeader(
        sending_application=msh(3),
        sending_facility=msh(4),
        receiving_application=msh(5),
        receiving_facility=msh(6),
        trigger_event=msh(9, 2),
        control_id=msh(10),
        processing_id=msh(11) or "P",
        version=msh(12),
    )


def _clean(text: str) -> str:
    """A header value safe to echo in our own delimiters (they may differ from the sender's)."""
    return re.sub(r"[|^~\\&\r\n\x00-\x1f]", "", text)[:199]


def escape(text: str) -> str:
    """HL7 escape sequences for the ACK's own delimiters |^~\\&."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("~", "\\R\\").replace("&", "\\T\\")
    return re.sub(r"[\r\n\x00-\x1f]", " ", out)


@dataclass(frozen=True)
class ErrEntry:
    location: str  # ERL, already in HL7 form ("OBX^3^5"), or ""
    code: tuple[str, str]  # HL7 table 0357
    severity: Literal["E", "W"]
    fate: str  # "rejected", "quarantined", "unsupported", "unreadable", "internal"
    message: str


def location(field: str) -> str:
    """Our field path as an HL7 ERL: "OBX[3]-5[2]" -> "OBX^3^5^2", "MSH-10" -> "MSH^1^10"."""
    m = re.fullmatch(r"([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+)(?:\[(\d+)\])?)?", field)
    if m is None:
        return ""
    segment, seq, fld, rep = m.groups()
    parts = [segment, seq or "1"]
    if fld:
        parts.append(fld)
        if rep:
            parts.append(rep)
    return "^".join(parts)


def _problem_code(problem: FieldProblem) -> tuple[str, str]:
    text = problem.description
    if "missing" in text or "is required" in text:
        return _REQUIRED_FIELD_MISSING
    if "table" in text:
        return _TABLE_VALUE_NOT_FOUND
    return _DATA_TYPE_ERROR


def _structural(problems: Sequence[FieldProblem]) -> bool:
    """Problems that make the bytes no readable message (rather than a message with a bad field)."""
    return any(
        p.field in ("message", "MSH", "MSH-1", "MSH-2", "MSH-9", "MSH-10", "MSH-12", "MSH-18")
        or p.field.startswith("segment[")
        for p in problems
    )


@dataclass(frozen=True)
class Ack:
    code: AckCode
    text: str  # MSA-3
    errors: tuple[ErrEntry, ...] = ()


def ack_for_outcomes(outcomes: Sequence[Outcome]) -> Ack:
    """The acknowledgement of a message whose records (one per PID) got these fates."""
    errors: list[ErrEntry] = []
    fates = [o.fate for o in outcomes]
    for o in outcomes:
        if o.fate == "unsupported":
            reason = o.reasons[0] if o.reasons else "not mapped"
            code = _UNSUPPORTED_VERSION if reason.startswith("HL7 version") else _UNSUPPORTED_MESSAGE_TYPE
            errors.append(
                ErrEntry(
                    "MSH^1^12" if code is _UNSUPPORTED_VERSION else "MSH^1^9",
                    code,
                    "E",
                    "unsupported",
                    reason,
                )
            )
        elif o.fate == "rejected":
            for v in o.violations or tuple(FieldProblem("", r) for r in o.reasons):
                errors.append(
                    ErrEntry(
                        location(v.field),
                        _problem_code(v),
                        "E",
                        "rejected",
                        f"{v.field}: {v.description}" if v.field else v.description,
                    )
                )
        elif o.fate == "quarantined":
            for r in o.reasons:
                errors.append(ErrEntry("", _ACCEPTED, "W", "quarantined", r))
    if "unsupported" in fates:
        return Ack("AR", "unsupported: " + errors[0].message, tuple(errors))
    if "rejected" in fates:
        n = fates.count("rejected")
        return Ack("AE", f"rejected: {n} of {len(fates)} patient records not stored", tuple(errors))
    if "quarantined" in fates:
        n = fates.count("quarantined")
        return Ack("AE", f"quarantined: {n} of {len(fates)} patient records held for review", tuple(errors))
    if fates and all(f == "duplicate" for f in fates):
        return Ack("AA", "duplicate: already stored")
    return Ack("AA", "accepted")


def ack_for_problems(problems: Sequence[FieldProblem]) -> Ack:
    """The acknowledgement of a message refused whole with these field problems (nothing stored)."""
    errors = tuple(
        ErrEntry(location(p.field), _problem_code(p), "E", "rejected", f"{p.field}: {p.description}")
        for p in problems
    )
    if _structural(problems):
        return Ack("AR", "unreadable: " + (errors[0].message if errors else "not an HL7 v2 message"), errors)
    return Ack("AE", f"rejected: {len(errors)} field problems; nothing stored", errors)


def ack_for_failure(text: str) -> Ack:
    """The acknowledgement when the gateway could not decide (database down, refused caller):
    nothing was stored, and the sender should send the message again later."""
    return Ack("AE", text, (ErrEntry("", _INTERNAL_ERROR, "E", "internal", text),))


def ack_refused(text: str) -> Ack:
    """The acknowledgement for a caller who may not ingest here (nothing stored)."""
    return Ack("AR", text, (ErrEntry("", _INTERNAL_ERROR, "E", "refused", text),))


def encode_ack(
    header: MessageHeader, ack: Ack, ack_control_id: str, facility: str, now: datetime | None = None
) -> bytes:
    """The ACK message, segments separated by CR (no MLLP framing)."""
    when = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S+0000")
    trigger = f"ACK^{header.trigger_event}^ACK" if header.trigger_event else "ACK"
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            SENDING_APPLICATION,
            _clean(facility),
            header.sending_application,
            header.sending_facility,
            when,
            "",
            trigger,
            _clean(ack_control_id),
            header.processing_id,
            header.version or ACK_VERSION,
        ]
    )
    segments = [msh, "|".join(["MSA", ack.code, header.control_id, escape(ack.text[:200])])]
    size = sum(len(s) + 1 for s in segments)
    for i, e in enumerate(ack.errors):
        err = "|".join(
            [
                "ERR",
                "",
                e.location,
                f"{e.code[0]}^{escape(e.code[1])}^HL70357",
                e.severity,
                f"{e.fate.upper()}^{e.fate}^FIBEMRSS",
                "",
                "",
                escape(e.message[:300]),
            ]
        )
        if size + len(err) + 80 > MAX_ACK_BYTES:
            rest = len(ack.errors) - i
            segments.append(
                f"ERR|||{e.code[0]}^{escape(e.code[1])}^HL70357|I||||{rest} more problems not listed"
            )
            break
        segments.append(err)
        size += len(err.encode()) + 1
    return ("\r".join(segments) + "\r").encode("utf-8")
