"""Quarantine review: applies a reviewer's corrections to a held record and checks them (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.normalize import ucum
from fibemrss.domain.normalize.cross_field import cross_field_findings
from fibemrss.domain.normalize.plausibility import canonical, check_observation
from fibemrss.domain.records import PatientRecord


@dataclass(frozen=True)
class Correction:
    """A corrected value (and unit, or None to keep the unit as sent) for one observation."""

    observation_index: int
    value: float
    unit: str | None = None


def corrected_record(record: PatientRecord, corrections: Sequence[Correction]) -> PatientRecord:
    """The record to store for an accepted entry, units made canonical.

    Without corrections the reviewer vouches for the record as sent. A corrected observation must
    pass the plausibility check it failed, and no cross-field rule may find it contradicting the
    rest of the record, or the correction is refused naming the field.
    """
    observations = list(record.observations)
    problems: list[FieldProblem] = []
    seen: set[int] = set()
    for i, c in enumerate(corrections):
        path = f"corrections[{i}]"
        if not 0 <= c.observation_index < len(observations):
            problems.append(FieldProblem(f"{path}.observation_index", "is not an observation of the record"))
            continue
        if c.observation_index in seen:
            problems.append(FieldProblem(f"{path}.observation_index", "is corrected twice"))
            continue
        seen.add(c.observation_index)
        if not math.isfinite(c.value):
            problems.append(FieldProblem(f"{path}.value", "must be a finite number"))
            continue
        unit = ucum.normalize_unit(c.unit) if c.unit else observations[c.observation_index].unit
        fixed = replace(observations[c.observation_index], value=c.value, unit=unit)
        reasons = check_observation(fixed)
        if reasons:
            problems.append(FieldProblem(f"{path}.value", f"is still implausible for {fixed.code.code}"))
            continue
        observations[c.observation_index] = fixed
    if not problems and corrections:
        # A corrected value must not contradict the rest of the record either (cross_field.py).
        # The rule is named, not its reason: reasons quote values, and errors reach logs.
        fixed_record = replace(record, observations=tuple(observations))
        findings = cross_field_findings(fixed_record)
        for i, c in enumerate(corrections):
            for rule, reason in findings:
                if f"observations[{c.observation_index}]" in reason:
                    problems.append(
                        FieldProblem(f"corrections[{i}].value", f"contradicts the record (rule {rule})")
                    )
                    break
    if problems:
        raise InvalidArgument("invalid corrections", problems)
    return canonical(replace(record, observations=tuple(observations)))
