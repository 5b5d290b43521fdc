"""FHIR R4 bundles: the 20 real Synthea bundles, hand-made edge cases, and hostile input."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fibemrss.domain.normalize.errors import FieldViolation, ParseError
from fibemrss.domain.normalize.fhir_r4 import MAPPED_TYPES, BundleParse, parse_bundle, read_json
from fibemrss.domain.records import ICD10, LOINC, SNOMED

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FHIR_DIR = SHARED / "fhir_r4"
REAL_BUNDLES = sorted(FHIR_DIR.glob("*.json")) if FHIR_DIR.is_dir() else []
# The smallest real bundle (31 entries): cheap to copy and mutate in property tests.
SMALL_BUNDLE = FHIR_DIR / "Jason347_Goyette777_27e4ad3f-fa03-7761-6e3f-650723ef8658.json"

needs_shared = pytest.mark.skipif(
    not REAL_BUNDLES, reason=f"shared data not found at {FHIR_DIR} (checked out without ../shared/data)"
)


def fields(error: ParseError) -> list[str]:
    return [v.field for v in error.field_violations]


# --- real data ------------------------------------------------------------------------------


def _expected_observation_records(resource: dict[str, Any]) -> int:
    """Counted from the raw JSON, independently of the parser: the resource's own value (or
    the resource itself when it has neither value nor components), plus each component with a
    quantity or coded value. valueString components are not mapped."""
    own = any(k.startswith("value") for k in resource) or not resource.get("component")
    mapped_component_values = ("valueQuantity", "valueCodeableConcept")
    components = sum(any(k in c for k in mapped_component_values) for c in resource.get("component", []))
    return int(own) + components


@needs_shared
@pytest.mark.parametrize("path", REAL_BUNDLES, ids=lambda p: p.name.split("_")[0])
def test_real_bundle_maps_every_patient_encounter_observation_and_condition(path: Path) -> None:
    raw = json.loads(path.read_bytes())
    raw_counts: dict[str, int] = {}
    for entry in raw["entry"]:
        rtype = entry["resource"]["resourceType"]
        raw_counts[rtype] = raw_counts.get(rtype, 0) + 1

    result = parse_bundle(path.read_bytes())

    assert result.bundle_type == "transaction"
    assert dict(result.resource_counts) == raw_counts
    for rtype in MAPPED_TYPES:
        assert result.mapped_counts[rtype] == raw_counts.get(rtype, 0), rtype
    assert result.rejected == () and result.unattributed == ()
    (record,) = result.records
    patient = raw["entry"][0]["resource"]
    assert record.provenance.source_id == patient["id"]
    assert record.provenance.source_system == "fhir"
    assert len(record.provenance.payload_sha256) == 64
    assert record.sex == patient["gender"]
    assert record.birth_date is not None and record.birth_date.isoformat() == patient["birthDate"]
    assert len(record.encounters) == raw_counts.get("Encounter", 0)
    assert len(record.conditions) == raw_counts.get("Condition", 0)
    raw_observations = [e["resource"] for e in raw["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(record.observations) == sum(_expected_observation_records(r) for r in raw_observations)
    assert all(o.code.system == LOINC for o in record.observations)
    assert all(o.effective is not None and o.effective.tzinfo == UTC for o in record.observations)
    assert all(
        c.code.system == SNOMED and c.clinical_status in ("active", "resolved") for c in record.conditions
    )
    # Everything left out is named: only the free-text answers of the PRAPARE survey.
    assert {n.description for n in result.notes} <= {"valueString is not mapped"}


@needs_shared
def test_real_bundles_add_up_to_the_readme_and_have_distinct_hashes() -> None:
    totals: dict[str, int] = dict.fromkeys(MAPPED_TYPES, 0)
    hashes = set()
    for path in REAL_BUNDLES:
        result = parse_bundle(path.read_bytes())
        for rtype in MAPPED_TYPES:
            totals[rtype] += result.mapped_counts[rtype]
        hashes.add(result.records[0].provenance.payload_sha256)
    # Resource totals stated in shared/data/fhir_r4/README.md.
    assert totals == {"Patient": 20, "Encounter": 420, "Observation": 2476, "Condition": 353}
    assert len(hashes) == 20


@needs_shared
def test_blood_pressure_panel_becomes_one_observation_per_component() -> None:
    raw = json.loads(SMALL_BUNDLE.read_bytes())
    panels = [
        e["resource"]
        for e in raw["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "85354-9"
    ]
    assert panels, "the small bundle has a blood-pressure panel"
    record = parse_bundle(SMALL_BUNDLE.read_bytes()).records[0]
    panel_id = panels[0]["id"]
    parts = {o.code.code: o for o in record.observations if o.source_id.startswith(panel_id)}
    assert set(parts) == {"8480-6", "8462-4"}
    assert all(o.unit == "mm[Hg]" and o.value is not None for o in parts.values())
    assert not any(o.code.code == "85354-9" for o in record.observations)


@needs_shared
def test_payload_hash_ignores_formatting_but_not_content() -> None:
    raw = json.loads(SMALL_BUNDLE.read_bytes())
    compact = parse_bundle(json.dumps(raw, separators=(",", ":")))
    pretty = parse_bundle(json.dumps(raw, indent=4, sort_keys=True).encode())
    assert compact.records[0].provenance == pretty.records[0].provenance
    changed = copy.deepcopy(raw)
    patient = changed["entry"][0]["resource"]
    patient["birthDate"] = "2025-08-07"
    assert parse_bundle(json.dumps(changed)).records[0].provenance.payload_sha256 != (
        compact.records[0].provenance.payload_sha256
    )


# --- hand-made bundles --------------------------------------------------------------------


def bundle(*resources: dict[str, Any], kind: str = "collection", full_urls: bool = True) -> dict[str, Any]:
    entries = []
    for r in resources:
        entry: dict[str, Any] = {"resource": r}
        if full_urls and "id" in r:
            entry["fullUrl"] = f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}"
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def patient(pid: str = "p1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1970-05-17", **extra}


def heart_rate(ref: str, oid: str = "o1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": ref},
        "effectiveDateTime": "2024-03-01T08:30:00+02:00",
        "valueQuantity": {
            "value": 72,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
        **extra,
    }


def test_observation_fields_and_time_zone_conversion() -> None:
    result = parse_bundle(json.dumps(bundle(patient(), heart_rate("Patient/p1"))))
    (record,) = result.records
    (o,) = record.observations
    assert (o.code.system, o.code.code, o.value, o.unit, o.source_id) == (LOINC, "8867-4", 72.0, "/min", "o1")
    assert o.effective == datetime(2024, 3, 1, 6, 30, tzinfo=UTC)
    assert record.sex == "female" and str(record.birth_date) == "1970-05-17"


@pytest.mark.parametrize(
    "ref",
    [
        "Patient/p1",
        "http://ehr.example/fhir/Patient/p1",
        "https://other.example/base/Patient/p1",
        "Patient/p1/_history/3",
        "urn:uuid:7b6c7c54-db0d-5853-e8da-e8227b84b82a",
    ],
)
def test_subject_reference_forms_resolve(ref: str) -> None:
    b = bundle(patient(), heart_rate(ref))
    b["entry"][0]["fullUrl"] = (
        "urn:uuid:7b6c7c54-db0d-5853-e8da-e8227b84b82a"
        if ref.startswith("urn")
        else (b["entry"][0]["fullUrl"])
    )
    result = parse_bundle(json.dumps(b))
    assert len(result.records[0].observations) == 1
    assert result.unattributed == ()


def test_reference_to_a_missing_patient_is_reported_in_a_collection_and_fatal_in_a_transaction() -> None:
    b = bundle(patient(), heart_rate("Patient/nobody"))
    result = parse_bundle(json.dumps(b))
    assert result.unattributed == (
        FieldViolation(
            "entry[1].resource.subject.reference", "refers to a Patient that is not in the bundle"
        ),
    )
    assert len(result.records) == 1 and result.records[0].observations == ()
    b["type"] = "transaction"
    with pytest.raises(ParseError) as exc:
        parse_bundle(json.dumps(b))
    assert fields(exc.value) == ["entry[1].resource.subject.reference"]


def test_bad_date_rejects_only_that_patient_in_a_batch() -> None:
    b = bundle(
        patient("p1"),
        patient("p2"),
        heart_rate("Patient/p1", effectiveDateTime="2024-02-30T10:00:00Z"),
        heart_rate("Patient/p2", oid="o2"),
        kind="batch",
    )
    result = parse_bundle(json.dumps(b))
    assert [r.source_patient_id for r in result.records] == ["p2"]
    (rejected,) = result.rejected
    assert rejected.patient_id == "p1"
    assert rejected.violations == (
        FieldViolation("entry[2].resource.effectiveDateTime", "is not a valid calendar date and time"),
    )
    assert result.mapped_counts == {"Patient": 1, "Encounter": 0, "Observation": 1, "Condition": 0}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda o: o["valueQuantity"].update(value="72"), "entry[1].resource.valueQuantity.value"),
        (lambda o: o["valueQuantity"].update(value=True), "entry[1].resource.valueQuantity.value"),
        (lambda o: o["valueQuantity"].pop("value"), "entry[1].resource.valueQuantity.value"),
        (lambda o: o.pop("code"), "entry[1].resource.code"),
        (lambda o: o.update(effectiveDateTime="2024-03-01T08:30:00"), "entry[1].resource.effectiveDateTime"),
        (lambda o: o.update(effectiveDateTime="yesterday"), "entry[1].resource.effectiveDateTime"),
        (lambda o: o.pop("subject"), "entry[1].resource.subject"),
        (lambda o: o.update(component="x"), "entry[1].resource.component"),
    ],
)
def test_bad_fields_of_a_transaction_raise_with_their_path(mutate: Any, field: str) -> None:
    observation = heart_rate("Patient/p1")
    mutate(observation)
    with pytest.raises(ParseError) as exc:
        parse_bundle(json.dumps(bundle(patient(), observation, kind="transaction")))
    assert fields(exc.value) == [field]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\xff\xfe not utf-8", "$"),
        (b"{not json", "$"),
        (b'{"resourceType": "Bundle", "type": "collection", "entry": [NaN]}', "$"),
        (b"[1, 2]", "$"),
        (b'{"resourceType": "Patient"}', "resourceType"),
        (b'{"resourceType": "Bundle", "type": "history"}', "type"),
        (b'{"resourceType": "Bundle", "type": "batch", "entry": {}}', "entry"),
        (b"[" * 100_000, "$"),
        (b'{"resourceType": "Bundle", "type": "batch", "entry": [], "n": 1' + b"0" * 5000 + b"}", "$"),
    ],
)
def test_unreadable_payloads_raise_parse_error(payload: bytes, field: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_bundle(payload)
    assert fields(exc.value) == [field]


def test_condition_encounter_meta_source_and_identifier() -> None:
    p = patient(
        meta={"source": "http://ehr.example/epic#req-42"},
        identifier=[
            {"system": "urn:ssn", "value": "999-00-1111"},
            {"type": {"coding": [{"code": "MR"}]}, "system": "urn:mrn", "value": "MRN-7"},
        ],
    )
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {
            "coding": [
                {"system": "http://hl7.org/fhir/sid/icd-10", "code": "I25.1"},
                {"system": "http://snomed.info/sct", "code": "53741008"},
            ]
        },
        "subject": {"reference": "Patient/p1"},
        "onsetDateTime": "2019-06",
    }
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2024-01-01T23:00:00-05:00", "end": "2024-01-03T10:00:00Z"},
    }
    (record,) = parse_bundle(json.dumps(bundle(p, condition, encounter))).records
    assert record.source_patient_id == "MRN-7"
    assert record.provenance.source_system == "http://ehr.example/epic"
    (c,) = record.conditions
    assert (c.code.system, c.code.code, c.clinical_status) == (SNOMED, "53741008", "active")
    assert c.onset == datetime(2019, 6, 1, tzinfo=UTC)
    (e,) = record.encounters
    assert (e.source_id, e.class_code) == ("e1", "IMP")
    assert e.start == datetime(2024, 1, 2, 4, 0, tzinfo=UTC)


def test_icd10_condition_and_coded_value_and_unmapped_things_are_noted() -> None:
    condition = {
        "resourceType": "Condition",
        "code": {"coding": [{"system": ICD10, "code": "E11.9"}]},
        "subject": {"reference": "Patient/p1"},
        "onsetString": "childhood",
    }
    coded = heart_rate("Patient/p1", oid="o2")
    del coded["valueQuantity"]
    coded["valueCodeableConcept"] = {"coding": [{"system": SNOMED, "code": "260385009"}]}
    bounded = heart_rate("Patient/p1", oid="o3")
    bounded["valueQuantity"]["comparator"] = "<"
    device_obs = heart_rate("Device/d1", oid="o4")
    text_only = heart_rate("Patient/p1", oid="o5", code={"text": "pulse", "coding": [{"system": LOINC}]})
    claim = {"resourceType": "Claim", "id": "x", "patient": {"reference": "Patient/p1"}}
    result = parse_bundle(
        json.dumps(bundle(patient(), condition, coded, bounded, device_obs, text_only, claim))
    )
    (record,) = result.records
    assert record.conditions[0].code.code == "E11.9" and record.conditions[0].onset is None
    assert [o.value_code.code for o in record.observations if o.value_code] == ["260385009"]
    assert result.resource_counts == {"Patient": 1, "Condition": 1, "Observation": 4, "Claim": 1}
    assert result.mapped_counts["Observation"] == 1
    noted = {n.field for n in result.notes}
    assert noted == {
        "entry[1].resource.onsetString",
        "entry[3].resource.valueQuantity.comparator",
        "entry[3].resource",
        "entry[4].resource.subject",
        "entry[5].resource.code",
        "entry[5].resource",
    }


# --- property tests: hostile input never escapes as anything but ParseError ------------------


def _parse_or_parse_error(payload: bytes | str) -> BundleParse | None:
    try:
        result = parse_bundle(payload)
    except ParseError as exc:
        assert exc.field_violations and all(v.field and v.description for v in exc.field_violations)
        return None
    assert isinstance(result, BundleParse)
    return result


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
FHIR_KEYS = [
    "resourceType", "id", "subject", "reference", "code", "coding", "system", "valueQuantity", "value",
    "unit", "component", "effectiveDateTime", "effectivePeriod", "start", "end", "period", "class",
    "gender", "birthDate", "identifier", "type", "onsetDateTime", "clinicalStatus", "valueCodeableConcept",
    "meta", "source", "fullUrl", "resource", "entry",
]  # fmt: skip
fhir_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from(
        ["Patient", "Observation", "Encounter", "Condition", "Patient/p1", "2024-01-01T00:00:00Z"]
    )
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(FHIR_KEYS), children, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300))
def test_random_bytes(payload: bytes) -> None:
    _parse_or_parse_error(payload)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_random_json(value: Any) -> None:
    _parse_or_parse_error(json.dumps(value))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["collection", "transaction", "batch", "searchset"]),
    resources=st.lists(
        st.tuples(
            st.sampled_from(MAPPED_TYPES), st.dictionaries(st.sampled_from(FHIR_KEYS), fhir_like, max_size=6)
        ),
        max_size=5,
    ),
)
def test_random_bundles_of_mapped_types(kind: str, resources: list[tuple[str, dict[str, Any]]]) -> None:
    entries = [{"resource": {**body, "resourceType": rtype}} for rtype, body in resources]
    _parse_or_parse_error(json.dumps({"resourceType": "Bundle", "type": kind, "entry": entries}))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            out.extend(_paths(child, (*prefix, key)))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out.extend(_paths(child, (*prefix, i)))
    return out


SMALL_TEXT = SMALL_BUNDLE.read_text() if SMALL_BUNDLE.is_file() else ""
SMALL_PATHS = _paths(json.loads(SMALL_TEXT)) if SMALL_TEXT else []


@needs_shared
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.integers(min_value=0), st.one_of(st.just("delete"), fhir_like)), min_size=1, max_size=4
    ),
    kind=st.sampled_from(["collection", "transaction", "batch", "searchset"]),
)
def test_mutated_real_bundle(mutations: list[tuple[int, Any]], kind: str) -> None:
    doc = json.loads(SMALL_TEXT)
    doc["type"] = kind
    for index, replacement in mutations:
        path = SMALL_PATHS[index % len(SMALL_PATHS)]
        if not path:
            continue
        parent: Any = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if replacement == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = replacement
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    _parse_or_parse_error(json.dumps(doc))


@needs_shared
@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0), junk=st.binary(max_size=8))
def test_byte_mutated_real_bundle(cut: int, junk: bytes) -> None:
    data = SMALL_TEXT.encode()
    at = cut % len(data)
    _parse_or_parse_error(data[:at] + junk + data[at + len(junk) :])


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    minutes=st.integers(-840, 840),
)
def test_datetime_round_trip_through_any_offset(moment: datetime, minutes: int) -> None:
    from datetime import timedelta, timezone

    aware = moment.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=minutes)))
    b = bundle(patient(), heart_rate("Patient/p1", effectiveDateTime=aware.isoformat()))
    assert parse_bundle(json.dumps(b)).records[0].observations[0].effective == aware.astimezone(UTC)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 123456789012345678901234567890, "b": -98765432109876543210}',  # beyond 64 bits
        '{"a": 18446744073709551615, "b": -9223372036854775808, "c": 9007199254740993}',  # 64-bit edges
        '{"a": 0.1, "b": 1e16, "c": -0.0, "d": 5e-324, "e": 1.7976931348623157e308}',
        '{"a": "\\ud800", "b": "\\u0000", "c": "\\ud83d\\ude00"}',  # lone surrogate, NUL, a pair
        '\ufeff{"a": [1, {"b": null}], "a": true}',  # a BOM, a duplicate key (the last wins)
    ],
)
def test_fast_json_path_reads_exactly_what_the_standard_library_reads(text: str) -> None:
    """The reader decodes with orjson where it can; integers beyond 64 bits (orjson would make them
    floats), lone surrogates and a BOM go to the standard library, so the values, and with them
    the payload hash and the fates, never depend on which decoder read the payload."""
    expected = json.loads(text.removeprefix("\ufeff"))
    for data in (text, text.encode("utf-8", "surrogatepass")):
        got = read_json(data)
        assert got == expected
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)  # types too
