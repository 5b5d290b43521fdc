"""The published-model type and the small protobuf <-> domain pairs survive a round trip, and
refuse what they cannot read with the field named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.feature_encoding import GlobalStats, input_dim, input_names
from fibemrss.domain.feature_extraction import TrainingExample
from fibemrss.domain.model_params import layer_shapes, param_count
from fibemrss.domain.published_model import PublishedModel
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.serde.values import (
    feature_value_from_proto,
    feature_value_to_proto,
    timestamp_from_proto,
    timestamp_to_proto,
    training_example_from_proto,
    training_example_to_proto,
)

TASK = HEART_DISEASE_V1
DIM = input_dim(TASK)


def model(**changes: object) -> PublishedModel:
    shapes = tuple(layer_shapes("mlp", DIM))
    fields: dict[str, object] = {
        "model": "mlp",
        "input_names": tuple(input_names(TASK)),
        "input_dim": DIM,
        "shapes": shapes,
        "params": np.random.default_rng(0).normal(size=param_count(list(shapes))),
        "stats": GlobalStats((1.0, 2.0), (0.5, 0.25), (1.0, 0.75)),
        "threshold": 0.4,
    }
    fields.update(changes)
    return PublishedModel(**fields)  # type: ignore[arg-type]  # keyword fields built as a dict


def test_a_published_model_survives_its_json_form_exactly() -> None:
    original = model()
    data = original.to_json()
    assert data["format"] == 1
    back = PublishedModel.from_json(data)
    np.testing.assert_array_equal(back.params, original.params)
    assert (back.model, back.shapes, back.stats, back.threshold) == (
        original.model,
        original.shapes,
        original.stats,
        original.threshold,
    )
    assert back.input_names == original.input_names and back.is_builtin


def test_rows_written_before_the_format_field_read_as_format_1_and_unknown_layouts_are_refused() -> None:
    legacy = model().to_json()
    del legacy["format"]
    assert PublishedModel.from_json(legacy).model == "mlp"
    with pytest.raises(InvalidArgument) as error:
        PublishedModel.from_json({**legacy, "format": 2})
    assert error.value.violations[0].field == "format"
    missing = dict(legacy)
    del missing["stats"]
    with pytest.raises(InvalidArgument) as error:
        PublishedModel.from_json(missing)
    assert error.value.violations[0].field == "stats"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"params": np.zeros(3)}, "params"),
        ({"params": np.full(param_count(layer_shapes("mlp", DIM)), np.nan)}, "params"),
        ({"threshold": 1.5}, "threshold"),
        ({"input_dim": 0}, "input_dim"),
    ],
)
def test_an_inconsistent_model_is_refused_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        model(**changes)
    assert field in {v.field for v in error.value.violations}


def test_a_custom_torch_model_has_no_shapes() -> None:
    custom = model(model="pkg.mod:factory", shapes=None, params=np.zeros(5))
    assert not custom.is_builtin
    assert PublishedModel.from_json(custom.to_json()).shapes is None


@given(
    st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_timestamps_round_trip_as_the_same_instant_in_utc(moment: datetime, offset_minutes: int) -> None:
    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    back = timestamp_from_proto(timestamp_to_proto(local))
    assert back == moment and back is not None and back.tzinfo == UTC
    assert timestamp_to_proto(None) is None and timestamp_from_proto(None) is None


@given(
    st.lists(
        st.one_of(st.none(), st.floats(allow_nan=False), st.text(max_size=8)), max_size=12
    ),
    st.one_of(st.none(), st.sampled_from([0.0, 1.0])),
)
def test_training_examples_and_feature_values_round_trip(values: list[object], label: float | None) -> None:
    example = TrainingExample("key-1", tuple(values), label)  # type: ignore[arg-type]  # drawn values
    msg = training_example_to_proto(example)
    assert training_example_from_proto(emr_pb2.TrainingExample.FromString(msg.SerializeToString())) == example
    for v in values:
        assert feature_value_from_proto(feature_value_to_proto(v)) == v  # type: ignore[arg-type]
