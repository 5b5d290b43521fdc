"""A PatientRecord as JSON and back (pure), for the quarantine table's `record_json` column."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from fibemrss.domain.records import Code, Condition, Encounter, Observation, PatientRecord, Provenance


def _code(code: Code | None) -> dict[str, str] | None:
    return None if code is None else {"system": code.system, "code": code.code, "display": code.display}


def _code_of(data: dict[str, Any]) -> Code:
    return Code(data["system"], data["code"], data.get("display", ""))


def _code_from(data: dict[str, Any] | None) -> Code | None:
    return None if data is None else _code_of(data)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _ts_from(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def record_to_json(record: PatientRecord) -> dict[str, Any]:
    p = record.provenance
    return {
        "source_patient_id": record.source_patient_id,
        "provenance": {
            "source_system": p.source_system,
            "source_id": p.source_id,
            "payload_sha256": p.payload_sha256,
        },
        "sex": record.sex,
        "birth_date": record.birth_date.isoformat() if record.birth_date else None,
        "age_years": record.age_years,
        "observations": [
            {
                "code": _code(o.code),
                "value": o.value,
                "unit": o.unit,
                "value_code": _code(o.value_code),
                "effective": _ts(o.effective),
                "source_id": o.source_id,
            }
            for o in record.observations
        ],
        "conditions": [
            {
                "code": _code(c.code),
                "onset": _ts(c.onset),
                "clinical_status": c.clinical_status,
                "source_id": c.source_id,
            }
            for c in record.conditions
        ],
        "encounters": [
            {"source_id": e.source_id, "class_code": e.class_code, "start": _ts(e.start), "end": _ts(e.end)}
            for e in record.encounters
        ],
    }


def record_from_json(data: dict[str, Any]) -> PatientRecord:
    p = data["provenance"]
    return PatientRecord(
        source_patient_id=data["source_patient_id"],
        provenance=Provenance(p["source_system"], p["source_id"], p["payload_sha256"]),
        sex=data.get("sex"),
        birth_date=date.fromisoformat(data["birth_date"]) if data.get("birth_date") else None,
        age_years=data.get("age_years"),
        observations=tuple(
            Observation(
                code=_code_of(o["code"]),
                value=o.get("value"),
                unit=o.get("unit"),
                value_code=_code_from(o.get("value_code")),
                effective=_ts_from(o.get("effective")),
                source_id=o.get("source_id", ""),
            )
            for o in data.get("observations", [])
        ),
        conditions=tuple(
            Condition(
                code=_code_of(c["code"]),
                onset=_ts_from(c.get("onset")),
                clinical_status=c.get("clinical_status", ""),
                source_id=c.get("source_id", ""),
            )
            for c in data.get("conditions", [])
        ),
        encounters=tuple(
            Encounter(
                e["source_id"], e.get("class_code", ""), _ts_from(e.get("start")), _ts_from(e.get("end"))
            )
            for e in data.get("encounters", [])
        ),
    )
