"""User-written CSV mapping profiles (YAML or JSON): columns to codes, units, value maps (pure).

A hospital whose export matches no built-in profile describes it in a small file instead of
waiting for code; the format is documented with an example in docs/gateway.md. A bad profile is
refused as a whole with one violation per bad key (`csv.profile_file.observations[2].code`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import yaml

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.normalize import ucum
from fibemrss.domain.normalize.parsing import (
    CSV_CELL_PROBLEM,
    DetailBudget,
    NotANumber,
    Violations,
    capped,
    csv_cells,
    finite_number,
)
from fibemrss.domain.records import SEXES, Code, Observation, PatientRecord, Provenance
from services.emr_gateway.core.parsers.csv_profiles import ParsedRow

MAX_PROFILE_BYTES = 256 * 1024
DEFAULT_MISSING = ("", "?", "na", "n/a", "nan", "null")
FIELD = "csv.profile_file"


@dataclass(frozen=True)
class Missing:
    """Markers that mean "not measured": text compared case-insensitively, numbers by value
    (so a marker 0 also matches "0.0")."""

    texts: frozenset[str]
    numbers: frozenset[float]

    def matches(self, raw: str) -> bool:
        text = raw.strip().lower()
        if text in self.texts:
            return True
        if self.numbers:
            try:
                return float(text) in self.numbers
            except ValueError:
                return False
        return False


@dataclass(frozen=True)
class ColumnMapping:
    """One column that becomes an observation: a quantity (`unit`) or a code (`values`)."""

    column: str
    code: Code
    unit: str | None
    values: Mapping[str, str] | None  # raw text (lower case) -> answer code
    value_system: str
    missing: Missing


@dataclass(frozen=True)
class CsvProfile:
    name: str
    source_system: str
    columns: tuple[str, ...]  # empty: the first line is a header
    delimiter: str
    id_column: str | None
    sex_column: str | None
    sex_values: Mapping[str, str]
    age_column: str | None
    birth_date_column: str | None
    birth_date_format: str
    observations: tuple[ColumnMapping, ...]
    missing: Missing


def _missing(raw: Any, path: str, problems: list[FieldProblem], base: Missing | None = None) -> Missing:
    texts = set(base.texts) if base else set(DEFAULT_MISSING)
    numbers = set(base.numbers) if base else set()
    if raw is None:
        return Missing(frozenset(texts), frozenset(numbers))
    if not isinstance(raw, list) or not all(isinstance(m, str | int | float) for m in raw):
        problems.append(FieldProblem(path, "must be a list of texts or numbers"))
        return Missing(frozenset(texts), frozenset(numbers))
    for marker in raw:
        if isinstance(marker, bool):
            problems.append(FieldProblem(path, "markers must be texts or numbers, not true/false"))
            continue
        if isinstance(marker, int | float):
            numbers.add(float(marker))
            continue
        texts.add(marker.strip().lower())
        try:
            value = float(marker)
        except ValueError:
            continue
        if math.isfinite(value):
            numbers.add(value)
    return Missing(frozenset(texts), frozenset(numbers))


def _str(
    data: Mapping[str, Any], key: str, path: str, problems: list[FieldProblem], required: bool = False
) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            problems.append(FieldProblem(f"{path}.{key}", "is required"))
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        problems.append(FieldProblem(f"{path}.{key}", "must be a text"))
        return None
    text = str(value).strip()
    if required and not text:
        problems.append(FieldProblem(f"{path}.{key}", "is required"))
        return None
    return text or None


def _value_map(raw: Any, path: str, problems: list[FieldProblem]) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        problems.append(FieldProblem(path, "must be a non-empty mapping of raw values to codes"))
        return None
    out: dict[str, str] = {}
    for k, v in raw.items():
        if isinstance(k, bool) or isinstance(v, bool) or not isinstance(v, str | int | float):
            problems.append(FieldProblem(f"{path}[{str(k)[:20]}]", "must map a text to a text"))
            continue
        out[_cell_key(str(k))] = str(v).strip()
    return out


def _cell_key(text: str) -> str:
    """Cells are matched case-insensitively, and "4.0" matches a map key "4" (float exports)."""
    key = text.strip().lower()
    return key[:-2] if key.endswith(".0") and key[:-2].lstrip("-").isdigit() else key


def _parse_document(data: bytes) -> Any:
    if len(data) > MAX_PROFILE_BYTES:
        raise InvalidArgument(
            "profile too large", [FieldProblem(FIELD, f"is over {MAX_PROFILE_BYTES} bytes")]
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            "profile is not UTF-8", [FieldProblem(FIELD, f"not UTF-8 at byte {exc.start}")]
        ) from None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidArgument("profile is not JSON", [FieldProblem(FIELD, "is not valid JSON")]) from None
    try:
        # Aliases are refused: a few lines of them can expand into an enormous document.
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise InvalidArgument(
                "profile uses YAML aliases", [FieldProblem(FIELD, "YAML aliases (*name) are not allowed")]
            )
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InvalidArgument(
            "profile is not YAML", [FieldProblem(FIELD, f"is not valid YAML{at}")]
        ) from None


def load_profile(data: bytes) -> CsvProfile:
    """Reads and validates a profile file; raises InvalidArgument naming each bad key."""
    doc = _parse_document(data)
    if not isinstance(doc, dict):
        raise InvalidArgument(
            "invalid CSV profile", [FieldProblem(FIELD, "must be a mapping (YAML) or an object (JSON)")]
        )
    p: list[FieldProblem] = []
    name = _str(doc, "name", FIELD, p) or "custom"
    source_system = _str(doc, "source_system", FIELD, p) or f"csv/{name}"
    delimiter = _str(doc, "delimiter", FIELD, p) or ","
    if len(delimiter) != 1:
        p.append(FieldProblem(f"{FIELD}.delimiter", "must be one character"))
        delimiter = ","
    columns: tuple[str, ...] = ()
    if "columns" in doc:
        raw_columns = doc["columns"]
        if (
            not isinstance(raw_columns, list)
            or not raw_columns
            or not all(isinstance(c, str) for c in raw_columns)
        ):
            p.append(FieldProblem(f"{FIELD}.columns", "must be a non-empty list of column names"))
        else:
            columns = tuple(c.strip() for c in raw_columns)
    missing = _missing(doc.get("missing"), f"{FIELD}.missing", p)
    sex_values: dict[str, str] = {}
    sex = doc.get("sex")
    sex_column = None
    if sex is not None:
        if not isinstance(sex, dict):
            p.append(FieldProblem(f"{FIELD}.sex", "must be a mapping with `column` and `values`"))
        else:
            sex_column = _str(sex, "column", f"{FIELD}.sex", p, required=True)
            sex_values = _value_map(sex.get("values"), f"{FIELD}.sex.values", p) or {}
            for k, v in sex_values.items():
                if v not in SEXES:
                    p.append(
                        FieldProblem(
                            f"{FIELD}.sex.values[{k[:20]}]", "must be male, female, other or unknown"
                        )
                    )
    observations: list[ColumnMapping] = []
    raw_obs = doc.get("observations")
    if not isinstance(raw_obs, list) or not raw_obs:
        p.append(FieldProblem(f"{FIELD}.observations", "must be a non-empty list"))
        raw_obs = []
    for i, item in enumerate(raw_obs):
        path = f"{FIELD}.observations[{i}]"
        if not isinstance(item, dict):
            p.append(FieldProblem(path, "must be a mapping"))
            continue
        column = _str(item, "column", path, p, required=True)
        system = _str(item, "system", path, p, required=True)
        code = _str(item, "code", path, p, required=True)
        unit = _str(item, "unit", path, p)
        values = _value_map(item.get("values"), f"{path}.values", p)
        if (unit is None) == (values is None):
            p.append(FieldProblem(path, "give exactly one of `unit` (a quantity) or `values` (a code map)"))
        if unit is not None:
            unit = ucum.normalize_unit(unit)
        if column and system and code:
            observations.append(
                ColumnMapping(
                    column=column,
                    code=Code(system, code, _str(item, "display", path, p) or ""),
                    unit=unit,
                    values=values,
                    value_system=_str(item, "value_system", path, p) or system,
                    missing=_missing(item.get("missing"), f"{path}.missing", p, base=missing),
                )
            )
    age_column = _str(doc, "age_column", FIELD, p)
    birth = doc.get("birth_date")
    birth_column, birth_format = None, "%Y-%m-%d"
    if birth is not None:
        if not isinstance(birth, dict):
            p.append(FieldProblem(f"{FIELD}.birth_date", "must be a mapping with `column` and `format`"))
        else:
            birth_column = _str(birth, "column", f"{FIELD}.birth_date", p, required=True)
            birth_format = _str(birth, "format", f"{FIELD}.birth_date", p) or birth_format
    id_column = _str(doc, "id_column", FIELD, p)
    known = set(columns)
    if columns:
        used = [("id_column", id_column), ("age_column", age_column), ("sex.column", sex_column)]
        used += [("birth_date.column", birth_column)]
        used += [(f"observations[{i}].column", m.column) for i, m in enumerate(observations)]
        for key, col in used:
            if col is not None and col not in known:
                p.append(FieldProblem(f"{FIELD}.{key}", "names a column that is not in `columns`"))
    if p:
        # A profile is at most 256 KiB, so its problems are few; the answer lists MAX_VIOLATIONS.
        raise InvalidArgument(
            "invalid CSV profile", capped(p, lambda n: FieldProblem(FIELD, f"{n} more problems"))
        )
    return CsvProfile(
        name=name,
        source_system=source_system,
        columns=columns,
        delimiter=delimiter,
        id_column=id_column,
        sex_column=sex_column,
        sex_values=sex_values,
        age_column=age_column,
        birth_date_column=birth_column,
        birth_date_format=birth_format,
        observations=tuple(observations),
        missing=missing,
    )


def _rows(profile: CsvProfile, content: str) -> Iterator[tuple[dict[str, str], str, int, int]]:
    """(cells by column name, the line's text for the payload hash, cells found, cells expected)."""
    lines = [line for line in content.lstrip("\ufeff").splitlines() if line.strip()]
    if not lines:
        return
    header = list(profile.columns)
    if not header:
        names = csv_cells(lines[0], profile.delimiter)
        if names is None:
            raise InvalidArgument(
                "unreadable CSV header", [FieldProblem("csv.content", f"the header {CSV_CELL_PROBLEM}")]
            )
        header = [h.strip() for h in names]
        lines = lines[1:]
    for line in lines:
        cells = csv_cells(line, profile.delimiter)
        if cells is None:
            yield {}, line.strip(), -1, len(header)  # the row is rejected for its cell
            continue
        values = {name: cells[i] if i < len(cells) else "" for i, name in enumerate(header)}
        yield values, line.strip(), len(cells), len(header)


def parse_with_profile(
    profile: CsvProfile,
    content: str,
    source_name: str,
    first_row: int = 0,
    budget: DetailBudget | None = None,
) -> Iterator[ParsedRow]:
    """Every data row as a record, or the violations that reject it (paths `row[i].column`); rows
    without an id are named by their number in the whole export (from `first_row`). Violations
    are capped while produced (`parsing.Violations`, the export's `budget` shared by its rows)."""
    for row, (values, line, found, expected) in enumerate(_rows(profile, content)):
        prefix = f"row[{row}]"
        source_id = f"{source_name}:{first_row + row + 1}"
        if profile.id_column:
            source_id = values.get(profile.id_column, "").strip() or source_id
        problems: Violations[FieldProblem] = Violations(FieldProblem, budget=budget)
        if found < 0:
            yield ParsedRow(row, source_id, None, (FieldProblem(prefix, CSV_CELL_PROBLEM),))
            continue
        if found != expected:
            yield ParsedRow(
                row, source_id, None, (FieldProblem(prefix, f"has {found} columns, expected {expected}"),)
            )
            continue
        observations: list[Observation] = []
        for m in profile.observations:
            raw = values.get(m.column)
            path = f"{prefix}.{m.column}"
            if raw is None:
                problems.add(path, "column is missing")
                continue
            if m.missing.matches(raw):
                continue  # missing stays missing: no observation at all, never a 0
            if m.values is not None:
                answer = m.values.get(_cell_key(raw))
                if answer is None:
                    problems.add(path, "value is not in the profile's value map")
                    continue
                observations.append(Observation(m.code, value_code=Code(m.value_system, answer)))
                continue
            number = _number(raw, path, problems)
            if number is not None:
                observations.append(Observation(m.code, value=number, unit=m.unit))
        sex = None
        if profile.sex_column:
            raw = values.get(profile.sex_column, "")
            if not profile.missing.matches(raw):
                sex = profile.sex_values.get(_cell_key(raw))
                if sex is None:
                    problems.add(f"{prefix}.{profile.sex_column}", "value is not in the sex map")
        age = None
        if profile.age_column:
            raw = values.get(profile.age_column, "")
            if not profile.missing.matches(raw):
                age = _number(raw, f"{prefix}.{profile.age_column}", problems)
        birth = None
        if profile.birth_date_column:
            raw = values.get(profile.birth_date_column, "").strip()
            if raw and not profile.missing.matches(raw):
                try:
                    birth = datetime.strptime(raw, profile.birth_date_format).date()
                except ValueError:
                    problems.add(
                        f"{prefix}.{profile.birth_date_column}", "is not a date in the profile's format"
                    )
        if problems:
            yield ParsedRow(row, source_id, None, tuple(problems.listed(prefix)))
            continue
        yield ParsedRow(row, source_id, _record(profile, source_id, line, sex, age, birth, observations))


def _record(
    profile: CsvProfile,
    source_id: str,
    line: str,
    sex: str | None,
    age: float | None,
    birth: date | None,
    observations: list[Observation],
) -> PatientRecord:
    digest = hashlib.sha256(line.encode("utf-8", "surrogatepass")).hexdigest()
    return PatientRecord(
        source_patient_id=source_id,
        provenance=Provenance(profile.source_system, source_id, digest),
        sex=sex,
        birth_date=birth,
        age_years=age,
        observations=tuple(observations),
    )


def _number(raw: str, path: str, problems: Violations[FieldProblem]) -> float | None:
    try:
        return finite_number(raw)
    except NotANumber as exc:
        problems.add(path, str(exc))
        return None
