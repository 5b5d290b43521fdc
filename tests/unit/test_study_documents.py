"""Study documents: the shipped ones parse and match the published schema; malformed ones are
refused naming the field (by the parser and by the schema alike); the identity is the canonical
form's hash, blind to layout and prose, sensitive to meaning."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jsonschema
import pytest
import yaml

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.feature_extraction import extract, in_cohort
from fibemrss.domain.records import LOINC, SNOMED, Code, Condition, Observation, PatientRecord, Provenance
from fibemrss.domain.study import (
    CODEC_MAX_WEIGHT,
    canonical_form,
    parse_study,
    shipped_documents,
    study_hash,
    study_to_json,
)
from fibemrss.domain.tasks import HEART_DISEASE_V1, TASKS
from fibemrss.he.params import DEFAULT_PARAMS

SCHEMA = json.loads((resources.files("fibemrss.domain") / "studies" / "study.schema.json").read_text())
HEART = yaml.safe_load(shipped_documents()["heart-disease-v1.yaml"])


def schema_errors(doc: Any) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc)]


@pytest.mark.parametrize("file", sorted(shipped_documents()))
def test_every_shipped_study_parses_matches_the_schema_and_round_trips(file: str) -> None:
    content = shipped_documents()[file]
    task = parse_study(content, file)
    assert schema_errors(yaml.safe_load(content)) == []
    assert TASKS[task.name] == task
    again = parse_study(json.dumps(study_to_json(task)), "round-trip")
    assert again == task and study_hash(again) == study_hash(task)
    assert schema_errors(study_to_json(task)) == []


def test_layout_key_order_comments_and_description_do_not_change_the_identity_but_meaning_does() -> None:
    base = study_hash(HEART_DISEASE_V1)
    reordered = dict(reversed(list(copy.deepcopy(HEART).items())))
    reordered["description"] = "other words"
    as_json = json.dumps(reordered, indent=4)
    assert study_hash(parse_study(as_json)) == base
    for path, value in (
        (("federation", "rounds"), 16),
        (("hyper_parameters", "learning_rate"), 0.031),
        (("version",), HEART["version"] + 1),
        (("personalization", "local_epochs"), 31),
        (("label", "observation", "above"), 1),
    ):
        changed = copy.deepcopy(HEART)
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert study_hash(parse_study(json.dumps(changed))) != base, path
    changed = copy.deepcopy(HEART)
    changed["features"][3]["unit"] = "kPa"
    assert study_hash(parse_study(json.dumps(changed))) != base
    assert canonical_form(HEART_DISEASE_V1) == canonical_form(parse_study(as_json))


def test_the_poisoning_bounds_round_trip_and_change_the_identity_only_when_set() -> None:
    """privacy.max_weight, privacy.max_update_norm and federation.validation_tolerance (issue 22)
    are written only when set: a study without them keeps its hash."""
    assert "max_weight" not in study_to_json(HEART_DISEASE_V1)["privacy"]
    assert "validation_tolerance" not in study_to_json(HEART_DISEASE_V1)["federation"]
    doc = copy.deepcopy(HEART)
    doc.setdefault("privacy", {}).update(max_weight=1024, max_update_norm=2.5)
    doc["federation"]["validation_tolerance"] = 0.05
    task = parse_study(json.dumps(doc))
    assert (task.max_weight, task.max_update_norm, task.validation_tolerance) == (1024, 2.5, 0.05)
    assert schema_errors(doc) == [] and schema_errors(study_to_json(task)) == []
    again = parse_study(json.dumps(study_to_json(task)))
    assert again == task and study_hash(again) == study_hash(task) != study_hash(HEART_DISEASE_V1)


def broken(edit: Any) -> dict[str, Any]:
    doc = copy.deepcopy(HEART)
    edit(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (broken(lambda d: d.pop("study")), "study"),
        (broken(lambda d: d.update(study="Heart Disease!")), "study"),
        (broken(lambda d: d.pop("version")), "version"),
        (broken(lambda d: d.update(features=[])), "features"),
        (broken(lambda d: d["features"][2].update(source="lab")), "features[2].source"),
        (broken(lambda d: d["features"][3].pop("unit")), "features[3].unit"),
        (broken(lambda d: d["features"][3].pop("code")), "features[3].code"),
        (broken(lambda d: d["features"][2].pop("categories")), "features[2].categories"),
        (broken(lambda d: d["features"][3].update(categories=["a"])), "features[3].categories"),
        (broken(lambda d: d["features"][3].update(scale=0)), "features[3].scale"),
        (broken(lambda d: d["features"][3].update(colour="red")), "features[3].colour"),
        (broken(lambda d: d.update(label={})), "label"),
        (broken(lambda d: d["label"]["observation"].pop("above")), "label.observation.above"),
        (broken(lambda d: d["hyper_parameters"].update(strategy="fedmagic")), "hyper_parameters.strategy"),
        (broken(lambda d: d["hyper_parameters"].update(batch_size=0)), "hyper_parameters.batch_size"),
        (broken(lambda d: d["federation"].update(rounds="many")), "federation.rounds"),
        (broken(lambda d: d["evaluation"].update(threshold=2)), "evaluation.threshold"),
        (broken(lambda d: d.update(model="os.system")), "model"),
        (broken(lambda d: d.update(cohort={"min_age": 200})), "cohort.min_age"),
        (broken(lambda d: d.update(surprise=1)), "surprise"),
        (broken(lambda d: d.setdefault("privacy", {}).update(max_weight=DEFAULT_PARAMS.max_weight + 1)), "privacy.max_weight"),
        (broken(lambda d: d.setdefault("privacy", {}).update(max_update_norm=0)), "privacy.max_update_norm"),
        (broken(lambda d: d["federation"].update(validation_tolerance=2)), "federation.validation_tolerance"),
    ],
)
def test_a_malformed_study_is_refused_naming_the_field_and_the_schema_refuses_it_too(
    doc: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_study(json.dumps(doc))
    assert field in {v.field for v in error.value.violations}
    assert schema_errors(doc), f"the schema accepts what the parser refuses ({field})"


def test_unreadable_text_is_refused_with_the_line() -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_study("study: [unclosed\nversion: 1\n", "mine.yaml")
    assert error.value.violations[0].field == "mine.yaml" and "line" in error.value.violations[0].description


def test_condition_features_labels_and_the_cohort_read_a_record() -> None:
    task = TASKS["hypertension-synthea-v1"]

    def record(age: float, conditions: tuple[Condition, ...]) -> PatientRecord:
        return PatientRecord(
            "p",
            Provenance("s", "p", "h"),
            sex="female",
            age_years=age,
            observations=(
                Observation(
                    Code(LOINC, "8480-6"), 150.0, "mm[Hg]", effective=datetime(2020, 1, 1, tzinfo=UTC)
                ),
            ),
            conditions=conditions,
        )

    htn = Condition(Code(SNOMED, "59621000"), datetime(2015, 1, 1, tzinfo=UTC), "active")
    old_stress = Condition(Code(SNOMED, "73595000"), datetime(2000, 1, 1, tzinfo=UTC), "active")
    recent_stress = Condition(Code(SNOMED, "73595000"), datetime(2019, 6, 1, tzinfo=UTC), "active")
    values, label = extract(task, record(60, (htn, old_stress)))
    assert (
        label == 1.0 and values[task.features.index(task.feature("stress"))] == "absent"
    )  # outside 10 years
    values, label = extract(task, record(60, (recent_stress,)))
    assert label == 0.0 and values[task.features.index(task.feature("stress"))] == "present"
    resolved = Condition(Code(SNOMED, "59621000"), datetime(2015, 1, 1, tzinfo=UTC), "resolved")
    assert extract(task, record(60, (resolved,)))[1] == 0.0
    assert in_cohort(task, record(60, ())) and not in_cohort(task, record(12, ()))



def test_a_study_caps_a_hospitals_weight_at_most_at_the_codecs_bound() -> None:
    """The study's bound is the codec's: a larger privacy.max_weight would pass review and then be
    refused by the encoder at the first upload (before, the study allowed 65,536 beside a codec of 1,024)."""
    assert CODEC_MAX_WEIGHT == DEFAULT_PARAMS.max_weight
    doc = study_to_json(HEART_DISEASE_V1)
    doc.setdefault("privacy", {}).update(max_weight=DEFAULT_PARAMS.max_weight)
    assert parse_study(json.dumps(doc)).max_weight == DEFAULT_PARAMS.max_weight
    assert schema_errors(doc) == []
