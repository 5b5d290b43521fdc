"""What every numeric input of every inference API may hold, checked here for every edge.

Two shapes of input reach a model:

- a patient (`Diagnose`, `DiagnoseBatch`, CDS Hooks' prefetch): each observation value must be a
  finite number, and the value of a code the model reads must lie in that feature's plausible
  range (`fibemrss.domain.normalize.plausibility`, the gateway's own table) after conversion to
  the feature's unit (a value sent without a unit is read in the feature's unit); the age must
  lie between 0 and `MAX_AGE_YEARS`. The accepted values are scored in the feature's unit.
- encoded rows (KServe v2 `ModelInfer`, gRPC and REST): every element finite, a numeric
  feature's value column a z-score whose value (z * std + mean, with the served model's
  statistics) lies in the feature's plausible range, its `_missing` indicator 0 or 1 (and the
  value column 0 when it is 1), and each categorical feature's one-hot columns 0 or 1 with at
  most one of them 1.

Anything else is refused with the field named, never scored: a value no record could hold gives
no reference at all rather than a confident one. Messages never repeat the value (patient data).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fibemrss.domain.errors import FieldProblem
from fibemrss.domain.feature_encoding import GlobalStats, input_names, numeric_features
from fibemrss.domain.feature_extraction import FeatureValue, extract
from fibemrss.domain.normalize import ucum
from fibemrss.domain.normalize.plausibility import plausible_limits
from fibemrss.domain.records import MAX_AGE_YEARS, Observation, PatientRecord
from fibemrss.domain.task_spec import TaskSpec

# A refusal names at most this many values, then how many more there were, so that a 65,536-row
# tensor of junk costs a bounded answer.
MAX_VIOLATIONS = 10
AGE_UNIT = "a"
MORE = "more values are refused; the first are named above"
# Up to this many elements, encoded rows are checked in plain Python first (one patient's row
# is about 30); a batch that fails, or a larger one, is checked (and named) with numpy.
SMALL_BATCH_ELEMENTS = 1024
_FLOAT_MAX = float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class FeatureLimits:
    """A numeric feature's inclusive range in its own unit (None: finite is all it needs)."""

    feature: str
    code: str
    unit: str
    low: float | None
    high: float | None

    @property
    def described(self) -> str:
        unit = f" {self.unit}" if self.unit and self.unit != "1" else ""
        return f"{self.feature} ({self.code}) between {self.low:g} and {self.high:g}{unit}"

    def holds(self, value: float) -> bool:
        return self.low is None or self.high is None or self.low <= value <= self.high


def feature_limits(task: TaskSpec) -> list[FeatureLimits | None]:
    """Per feature in spec order: the numeric ones' limits (age included), None for categorical."""
    out: list[FeatureLimits | None] = []
    for f in task.features:
        if f.source == "age":
            out.append(FeatureLimits(f.name, "age", AGE_UNIT, 0.0, float(MAX_AGE_YEARS)))
        elif f.source == "numeric":
            limits = plausible_limits(f.system, f.code, f.unit)
            low, high = (min(limits), max(limits)) if limits is not None else (None, None)
            out.append(FeatureLimits(f.name, f.code, f.unit, low, high))
        else:
            out.append(None)
    return out


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ObservationProblem:
    """Why one observation was refused: which part of it ("value" or "unit") and the reason."""

    part: str
    description: str


class PatientInputs:
    """The checks on a patient's values for one task, built once per task."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        limits = feature_limits(task)
        self._by_code = {
            (f.system, f.code): lim
            for f, lim in zip(task.features, limits, strict=True)
            if lim is not None and f.source != "age"
        }
        self._age = next(
            (lim for f, lim in zip(task.features, limits, strict=True) if f.source == "age"), None
        )

    def check_observation(self, obs: Observation) -> tuple[Observation, ObservationProblem | None]:
        """The observation in its feature's unit, or why it is refused."""
        if obs.value is None:
            return obs, None
        if not _finite_number(obs.value):
            return obs, ObservationProblem("value", "must be a finite number")
        lim = self._by_code.get((obs.code.system, obs.code.code))
        if lim is None:
            return obs, None  # a code the model does not read: finite is enough
        unit = obs.unit or lim.unit
        try:
            value = (
                float(obs.value) if unit == lim.unit else ucum.convert(obs.value, unit, lim.unit, lim.code)
            )
        except ucum.UnitError:
            return obs, ObservationProblem(
                "unit",
                f"{lim.feature} ({lim.code}) is read in {lim.unit or '1'}; this unit does not convert to it",
            )
        if not math.isfinite(value) or not lim.holds(value):
            return obs, ObservationProblem("value", f"must be a plausible {lim.described}")
        if unit == lim.unit and obs.unit == lim.unit:
            return obs, None
        return replace(obs, value=value, unit=lim.unit), None

    def age_problem(self, age: float | None) -> str | None:
        if age is None or self._age is None:
            return None
        if not _finite_number(age) or not self._age.holds(float(age)):
            return f"must give an age between 0 and {MAX_AGE_YEARS} years"
        return None

    def read(self, record: PatientRecord, field: str) -> tuple[list[FeatureValue], list[FieldProblem]]:
        """The task's feature values of `record` (values in each feature's unit), or every
        problem, each field under `field` (`patient`, `patients[3]`)."""
        problems: list[FieldProblem] = []
        observations: list[Observation] = []
        for i, obs in enumerate(record.observations):
            checked, problem = self.check_observation(obs)
            if problem is not None:
                problems.append(
                    FieldProblem(f"{field}.observations[{i}].{problem.part}", problem.description)
                )
            observations.append(checked)
        if record.age_years is not None and (reason := self.age_problem(record.age_years)):
            problems.append(FieldProblem(f"{field}.age_years", reason))
        if problems:
            return [], capped(problems, field)
        if tuple(observations) != record.observations:
            record = replace(record, observations=tuple(observations))
        values = extract(self.task, record)[0]
        if record.age_years is None and record.birth_date is not None:
            age = next(
                (v for f, v in zip(self.task.features, values, strict=True) if f.source == "age"), None
            )
            if not isinstance(age, str) and (reason := self.age_problem(age)):
                problems.append(FieldProblem(f"{field}.birth_date", reason))
        return values, problems


def capped(problems: list[FieldProblem], field: str) -> list[FieldProblem]:
    """The first MAX_VIOLATIONS problems, and one more under `field` when there were more."""
    if len(problems) <= MAX_VIOLATIONS:
        return problems
    return [*problems[:MAX_VIOLATIONS], FieldProblem(field, MORE)]


# -- encoded rows (KServe v2) -----------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedLimits:
    """Per input column of a served model: its bounds (z-scores for value columns, widened by a
    relative 1e-5 for FP32 rounding), whether it is an indicator (0 or 1), the one-hot groups and
    the (value, missing) column pairs; computed once per model version, so that checking a row
    costs a few vectorized comparisons."""

    names: tuple[str, ...]
    low: np.ndarray  # float64 [dim], -inf where unbounded
    high: np.ndarray
    binary: np.ndarray  # bool [dim]
    what: tuple[str, ...]  # per column, what it must hold (for the message)
    value_cols: np.ndarray  # int [pairs]: each numeric feature's value column...
    missing_cols: np.ndarray  # ...and its missing indicator
    group_cols: np.ndarray  # int: the one-hot columns of every categorical feature, in order
    group_offsets: np.ndarray  # int [groups]: where each feature's columns start in group_cols
    group_names: tuple[str, ...]
    # The same rules per column for `_small_rows_pass` (a batch of a few rows costs less in plain
    # Python than in twenty numpy calls): (low, high, binary), unbounded as +-float max so that
    # an infinity fails the range; the (value, missing) pairs; each one-hot group's [start, end).
    columns: tuple[tuple[float, float, bool], ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()
    groups: tuple[tuple[int, int], ...] = ()

    @classmethod
    def build(cls, task: TaskSpec, stats: GlobalStats) -> EncodedLimits:
        names = input_names(task)
        dim = len(names)
        low = np.full(dim, -np.inf)
        high = np.full(dim, np.inf)
        binary = np.zeros(dim, dtype=bool)
        what = ["a finite number"] * dim
        pairs: list[tuple[int, int]] = []
        group_cols: list[int] = []
        group_offsets: list[int] = []
        group_names: list[str] = []
        groups: list[tuple[int, int]] = []
        slot = {i: j for j, i in enumerate(numeric_features(task))}
        limits = feature_limits(task)
        col = 0
        for k, f in enumerate(task.features):
            if k in slot:
                mean, std = stats.means[slot[k]], stats.stds[slot[k]]
                lim = limits[k]
                if lim is not None and lim.low is not None and lim.high is not None and std > 0:
                    z_low, z_high = (lim.low - mean) / std, (lim.high - mean) / std
                    low[col], high[col] = z_low - 1e-5 * (1 + abs(z_low)), z_high + 1e-5 * (1 + abs(z_high))
                    what[col] = (
                        f"the z-score of a plausible {lim.described}, between {z_low:.6g} and {z_high:.6g}"
                    )
                binary[col + 1] = True
                what[col + 1] = "0 or 1 (the missing indicator)"
                pairs.append((col, col + 1))
                col += 2
            else:
                width = len(f.categories)
                binary[col : col + width] = True
                for c in range(col, col + width):
                    what[c] = f"0 or 1 (one-hot of {f.name})"
                if width:
                    group_offsets.append(len(group_cols))
                    group_cols.extend(range(col, col + width))
                    group_names.append(f.name)
                    groups.append((col, col + width))
                col += width
        return cls(
            tuple(names),
            low,
            high,
            binary,
            tuple(what),
            np.array([v for v, _ in pairs], dtype=np.intp),
            np.array([m for _, m in pairs], dtype=np.intp),
            np.array(group_cols, dtype=np.intp),
            np.array(group_offsets, dtype=np.intp),
            tuple(group_names),
            columns=tuple(
                (0.0, 1.0, True) if b else (max(lo, -_FLOAT_MAX), min(hi, _FLOAT_MAX), False)
                for lo, hi, b in zip(low.tolist(), high.tolist(), binary.tolist(), strict=True)
            ),
            pairs=tuple(pairs),
            groups=tuple(groups),
        )

    def _small_rows_pass(self, x: np.ndarray) -> bool:
        """True when every row of a small batch holds what `problems` accepts; False when some
        element may not (then `problems` names it): the same rules, element by element."""
        columns, pairs, groups = self.columns, self.pairs, self.groups
        for row in x.tolist():
            for v, (low, high, binary) in zip(row, columns, strict=True):
                # NaN fails both comparisons; an infinity fails the +-float max bounds.
                if not low <= v <= high or (binary and v != 0.0 and v != 1.0):
                    return False
            for value_col, missing_col in pairs:
                if row[missing_col] == 1.0 and row[value_col] != 0.0:
                    return False
            for start, end in groups:
                if sum(row[start:end]) > 1.0:
                    return False
        return True

    def problems(self, x: np.ndarray, field_of: Callable[[int], str]) -> list[FieldProblem]:
        """The refused elements of the rows `x` [batch, dim] (the non-finite ones first, alone),
        at most MAX_VIOLATIONS named; `field_of(flat index)` is the field the element came in."""
        dim = len(self.names)
        if x.size <= SMALL_BATCH_ELEMENTS and self.columns and self._small_rows_pass(x):
            return []
        finite = np.isfinite(x)
        if not finite.all():
            nonfinite = [
                (int(i), "must be a finite number") for i in np.flatnonzero(~finite)[: MAX_VIOLATIONS + 1]
            ]
            return self._named(nonfinite, dim, field_of)
        z = x.astype(np.float64, copy=False)
        bad = (z < self.low) | (z > self.high) | (self.binary & (z != 0) & (z != 1))
        both = (z[:, self.missing_cols] == 1) & (z[:, self.value_cols] != 0)
        over = (
            np.add.reduceat(z[:, self.group_cols], self.group_offsets, axis=1) > 1
            if len(self.group_cols)
            else np.zeros((len(z), 0), dtype=bool)
        )
        if not (bad.any() or both.any() or over.any()):
            return []
        found: list[tuple[int, str]] = [
            (int(r) * dim + int(c), f"must be {self.what[c]}")
            for r, c in np.argwhere(bad)[: MAX_VIOLATIONS + 1]
        ]
        found += [
            (
                int(r) * dim + int(self.value_cols[p]),
                f"must be 0 when {self.names[self.missing_cols[p]]} is 1",
            )
            for r, p in np.argwhere(both)[: MAX_VIOLATIONS + 1]
        ]
        found += [
            (
                int(r) * dim + int(self.group_cols[self.group_offsets[g]]),
                f"must be 0 beside another 1: at most one one-hot column of {self.group_names[g]} may be 1",
            )
            for r, g in np.argwhere(over)[: MAX_VIOLATIONS + 1]
        ]
        return self._named(found, dim, field_of)

    def _named(
        self, found: list[tuple[int, str]], dim: int, field_of: Callable[[int], str]
    ) -> list[FieldProblem]:
        found.sort()
        out = [self._problem(i, reason, dim, field_of) for i, reason in found[:MAX_VIOLATIONS]]
        if len(found) > MAX_VIOLATIONS:  # each check above took one more than it may name
            out.append(FieldProblem(field_of(-1), MORE))
        return out

    def _problem(self, index: int, reason: str, dim: int, field_of: Callable[[int], str]) -> FieldProblem:
        row, col = divmod(index, dim)
        return FieldProblem(
            field_of(index), f"element {index} (row {row}, column {col} {self.names[col]}): {reason}"
        )


def element_fields(raw: bool) -> Callable[[int], str]:
    """How a KServe element is named: its typed-contents index, or the raw entry (gRPC spelling)."""
    if raw:
        return lambda _index: "raw_input_contents[0]"
    return lambda index: (
        "inputs[0].contents.fp32_contents" if index < 0 else f"inputs[0].contents.fp32_contents[{index}]"
    )
