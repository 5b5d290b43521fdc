"""Conversions between the shared-schema dataclasses and their protobuf messages, in pairs."""

from __future__ import annotations

from datetime import date

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.feature_extraction import FeatureValue, extract
from fibemrss.domain.records import (
    MAX_AGE_YEARS,
    SEXES,
    Code,
    Condition,
    Encounter,
    Observation,
    PatientRecord,
    Provenance,
)
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.serde.values import timestamp_from_proto, timestamp_to_proto


def code_to_proto(code: Code) -> emr_pb2.Code:
    return emr_pb2.Code(system=code.system, code=code.code, display=code.display)


# Codes recur (a LOINC code in every patient's record): each distinct one is built once and
# shared (Code is immutable), which halves what converting a patient costs on the Diagnose path.
# Bounded, so that a stream of made-up codes cannot grow it without limit.
_MAX_SHARED_CODES = 4096
_codes: dict[tuple[str, str, str], Code] = {}


def _shared_code(system: str, code: str, display: str) -> Code:
    key = (system, code, display)
    found = _codes.get(key)
    if found is None:
        if len(_codes) >= _MAX_SHARED_CODES:
            _codes.clear()
        found = _codes[key] = Code(system, code, display)
    return found


def code_from_proto(msg: emr_pb2.Code) -> Code:
    return _shared_code(msg.system, msg.code, msg.display)


def observation_to_proto(obs: Observation) -> emr_pb2.Observation:
    msg = emr_pb2.Observation(code=code_to_proto(obs.code), unit=obs.unit or "", source_id=obs.source_id)
    if obs.value is not None:
        msg.value = obs.value
    if obs.value_code is not None:
        msg.value_code.CopyFrom(code_to_proto(obs.value_code))
    if (ts := timestamp_to_proto(obs.effective)) is not None:
        msg.effective.CopyFrom(ts)
    return msg


def observation_from_proto(msg: emr_pb2.Observation) -> Observation:
    # On the Diagnose hot path: positional arguments and inlined reads, measurably cheaper.
    code = msg.code
    value_code = msg.value_code if msg.HasField("value_code") else None
    return Observation(
        _shared_code(code.system, code.code, code.display),
        msg.value if msg.HasField("value") else None,
        msg.unit or None,
        _shared_code(value_code.system, value_code.code, value_code.display)
        if value_code is not None
        else None,
        timestamp_from_proto(msg.effective if msg.HasField("effective") else None),
        msg.source_id,
    )


def record_to_proto(record: PatientRecord, patient_key: str = "") -> emr_pb2.PatientRecord:
    msg = emr_pb2.PatientRecord(
        patient_key=patient_key,
        provenance=emr_pb2.Provenance(
            source_system=record.provenance.source_system,
            source_id=record.provenance.source_id,
            payload_sha256=record.provenance.payload_sha256,
        ),
        sex=record.sex or "",
        birth_date=record.birth_date.isoformat() if record.birth_date else "",
        observations=[observation_to_proto(o) for o in record.observations],
    )
    if not patient_key:
        msg.source_patient_id = record.source_patient_id
    if record.age_years is not None:
        msg.age_years = record.age_years
    for c in record.conditions:
        cm = msg.conditions.add(
            code=code_to_proto(c.code), clinical_status=c.clinical_status, source_id=c.source_id
        )
        if (ts := timestamp_to_proto(c.onset)) is not None:
            cm.onset.CopyFrom(ts)
    for e in record.encounters:
        em = msg.encounters.add(source_id=e.source_id, class_code=e.class_code)
        if (ts := timestamp_to_proto(e.start)) is not None:
            em.start.CopyFrom(ts)
        if (ts := timestamp_to_proto(e.end)) is not None:
            em.end.CopyFrom(ts)
    return msg


def _check_record(msg: emr_pb2.PatientRecord, field: str) -> date | None:
    """Raises InvalidArgument naming each bad field; returns the parsed birth date."""
    problems: list[FieldProblem] = []
    birth: date | None = None
    if msg.birth_date:
        try:
            birth = date.fromisoformat(msg.birth_date)
        except ValueError:
            problems.append(FieldProblem(f"{field}.birth_date", "must be an ISO 8601 date (YYYY-MM-DD)"))
    if msg.sex and msg.sex not in SEXES:
        problems.append(FieldProblem(f"{field}.sex", "must be one of male, female, other, unknown"))
    if msg.HasField("age_years") and not 0 <= msg.age_years <= MAX_AGE_YEARS:
        problems.append(FieldProblem(f"{field}.age_years", f"must be between 0 and {MAX_AGE_YEARS}"))
    for i, o in enumerate(msg.observations):
        if not o.code.code:
            problems.append(FieldProblem(f"{field}.observations[{i}].code.code", "is required"))
        if o.HasField("value") and o.value != o.value:
            problems.append(FieldProblem(f"{field}.observations[{i}].value", "must be a number, not NaN"))
    if problems:
        raise InvalidArgument("invalid patient record", problems)
    return birth


def feature_values_from_proto(
    task: TaskSpec, msg: emr_pb2.PatientRecord, field: str = "patient"
) -> list[FeatureValue]:
    """The task's feature values of a protobuf patient: converted (and validated, naming each bad
    field under `field`) by record_from_proto, then read by the domain's own `extract`, so what a
    feature is has one definition whatever the transport."""
    return extract(task, record_from_proto(msg, field))[0]


def record_from_proto(msg: emr_pb2.PatientRecord, field: str = "patient") -> PatientRecord:
    """Validates and converts; raises InvalidArgument naming each bad field."""
    birth = _check_record(msg, field)
    return PatientRecord(
        source_patient_id=msg.source_patient_id or msg.patient_key,
        provenance=Provenance(
            msg.provenance.source_system, msg.provenance.source_id, msg.provenance.payload_sha256
        ),
        sex=msg.sex or None,
        birth_date=birth,
        age_years=msg.age_years if msg.HasField("age_years") else None,
        observations=tuple(observation_from_proto(o) for o in msg.observations),
        conditions=tuple(
            Condition(
                code_from_proto(c.code),
                timestamp_from_proto(c.onset if c.HasField("onset") else None),
                c.clinical_status,
                c.source_id,
            )
            for c in msg.conditions
        ),
        encounters=tuple(
            Encounter(
                e.source_id,
                e.class_code,
                timestamp_from_proto(e.start if e.HasField("start") else None),
                timestamp_from_proto(e.end if e.HasField("end") else None),
            )
            for e in msg.encounters
        ),
    )
