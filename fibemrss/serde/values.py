"""Protobuf <-> domain for the small values every message carries: timestamps, feature values,
training examples. In pairs, `x_to_proto` / `x_from_proto`."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.domain.feature_extraction import FeatureValue, TrainingExample


def timestamp_to_proto(value: datetime | None) -> Timestamp | None:
    """None stays None (an unset field); a naive datetime is read as UTC."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo is None else value.astimezone(UTC))
    return ts


def timestamp_from_proto(msg: Timestamp | None) -> datetime | None:
    """An aware UTC datetime; None for an unset field (pass None when HasField is false)."""
    if msg is None:
        return None
    return msg.ToDatetime(tzinfo=UTC)


def feature_value_to_proto(value: FeatureValue) -> emr_pb2.FeatureValue:
    if isinstance(value, str):
        return emr_pb2.FeatureValue(category=value)
    if value is None:
        return emr_pb2.FeatureValue()
    return emr_pb2.FeatureValue(number=float(value))


def feature_value_from_proto(msg: emr_pb2.FeatureValue) -> FeatureValue:
    kind = msg.WhichOneof("value")
    if kind == "number":
        return msg.number
    if kind == "category":
        return msg.category
    return None


def training_example_to_proto(example: TrainingExample) -> emr_pb2.TrainingExample:
    msg = emr_pb2.TrainingExample(
        patient_key=example.patient_key,
        features=[feature_value_to_proto(v) for v in example.values],
    )
    if example.label is not None:
        msg.label = example.label
    return msg


def training_example_from_proto(msg: emr_pb2.TrainingExample) -> TrainingExample:
    return TrainingExample(
        msg.patient_key,
        tuple(feature_value_from_proto(f) for f in msg.features),
        msg.label if msg.HasField("label") else None,
    )
