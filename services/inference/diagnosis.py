"""A diagnosis reference from a published model (pure: numpy only, no gRPC, no database)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fibemrss.feature_encoding import GlobalStats, encode, imputed_features
from fibemrss.feature_extraction import extract
from fibemrss.model_params import Layer, forward_logits, sigmoid, unflatten
from fibemrss.records import PatientRecord
from fibemrss.task_spec import TaskSpec

CAVEAT = (
    "This is a statistical reference from a federated model, not a diagnosis. It must be "
    "interpreted by a clinician together with the full clinical picture."
)


@dataclass(frozen=True)
class LoadedModel:
    """A model version decoded once, shared read-only by all requests."""

    task: TaskSpec
    version: int
    federated_round: int
    layers: list[Layer]
    stats: GlobalStats
    threshold: float

    @classmethod
    def from_json(
        cls, task: TaskSpec, version: int, federated_round: int, model: dict[str, Any]
    ) -> LoadedModel:
        shapes = [tuple(s) for s in model["shapes"]]
        layers = unflatten(np.asarray(model["params"], dtype=np.float64), shapes)  # type: ignore[arg-type]
        return cls(
            task,
            version,
            federated_round,
            layers,
            GlobalStats.from_json(model["stats"]),
            float(model.get("threshold", task.threshold)),
        )


@dataclass(frozen=True)
class Reference:
    probability: float
    label: str
    risk_band: str
    contributions: list[tuple[str, float]]  # (feature, signed logit contribution), largest first
    imputed: list[str]


def risk_band(p: float) -> str:
    if p < 0.25:
        return "low"
    if p < 0.5:
        return "intermediate"
    if p < 0.75:
        return "high"
    return "very high"


def diagnose(model: LoadedModel, record: PatientRecord, top: int = 5) -> Reference:
    values, _ = extract(model.task, record)
    # Row 0 is the patient; row k+1 is the patient with feature k treated as missing. The logit
    # difference is the feature's signed contribution (occlusion), valid for any model.
    rows = [values] + [[None if j == k else v for j, v in enumerate(values)] for k in range(len(values))]
    logits = forward_logits(model.layers, encode(model.task, model.stats, rows))
    probability = float(sigmoid(logits[:1])[0])
    contributions = [
        (f.name, float(logits[0] - logits[k + 1]))
        for k, f in enumerate(model.task.features)
        if values[k] is not None
    ]
    contributions.sort(key=lambda c: abs(c[1]), reverse=True)
    return Reference(
        probability=probability,
        label="disease" if probability >= model.threshold else "no disease",
        risk_band=risk_band(probability),
        contributions=contributions[:top],
        imputed=imputed_features(model.task, values),
    )
