"""A diagnosis reference from a published model (pure: numpy, and torch only for custom models)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.feature_encoding import GlobalStats, input_dim, numeric_features
from fibemrss.domain.feature_extraction import FeatureValue, extract
from fibemrss.domain.model_params import Layer, forward_logits, sigmoid, unflatten
from fibemrss.domain.published_model import ModelVersion, PublishedModel
from fibemrss.domain.records import PatientRecord
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.torch_models import logits_function
from services.inference.core.input_limits import EncodedLimits

CAVEAT = (
    "This is a statistical reference from a federated model, not a diagnosis. It must be "
    "interpreted by a clinician together with the full clinical picture."
)
TOP_CONTRIBUTIONS = 5


@dataclass(frozen=True)
class EncodingPlan:
    """Where each feature lives in the model input, computed once per model version.

    It encodes exactly like `fibemrss.domain.feature_encoding.encode` (a unit test holds them equal),
    but one row at a time without re-deriving the layout, and it builds every "feature k
    missing" row of the occlusion in one vectorized step instead of re-encoding each.
    """

    task: TaskSpec
    dim: int
    # Per feature: its first input column, and for numeric features its global mean and std.
    starts: tuple[int, ...]
    moments: tuple[tuple[float, float] | None, ...]
    # keep[k] is 1 outside feature k's columns and 0 inside; fill[k] holds the encoding of
    # "feature k missing" in those columns. Row k of x * keep + fill is x with feature k occluded.
    keep: np.ndarray
    fill: np.ndarray
    # The features' names, in order: what a reference names (contributions, imputed features).
    names: tuple[str, ...] = ()

    @classmethod
    def build(cls, task: TaskSpec, stats: GlobalStats) -> EncodingPlan:
        dim = input_dim(task)
        n = len(task.features)
        keep = np.ones((n, dim), dtype=np.float32)
        fill = np.zeros((n, dim), dtype=np.float32)
        slot = {i: j for j, i in enumerate(numeric_features(task))}
        starts: list[int] = []
        moments: list[tuple[float, float] | None] = []
        col = 0
        for k, f in enumerate(task.features):
            starts.append(col)
            if k in slot:
                moments.append((stats.means[slot[k]], stats.stds[slot[k]]))
                width = 2
                fill[k, col + 1] = 1.0  # the "was missing" indicator; the value is the mean (z = 0)
            else:
                moments.append(None)
                width = len(f.categories)
            keep[k, col : col + width] = 0.0
            col += width
        names = tuple(f.name for f in task.features)
        return cls(task, dim, tuple(starts), tuple(moments), keep, fill, names)

    def encode_into(self, out: np.ndarray, values: Sequence[FeatureValue]) -> None:
        """Writes one row's encoding into `out` (a zeroed float32 row of length `dim`)."""
        for f, start, moment, value in zip(
            self.task.features, self.starts, self.moments, values, strict=True
        ):
            if moment is not None:
                if isinstance(value, float | int):
                    out[start] = (float(value) - moment[0]) / moment[1]
                else:
                    out[start + 1] = 1.0
            elif isinstance(value, str) and value in f.categories:
                out[start + f.categories.index(value)] = 1.0

    def encode(self, rows: Sequence[Sequence[FeatureValue]]) -> np.ndarray:
        x = np.zeros((len(rows), self.dim), dtype=np.float32)
        for r, values in enumerate(rows):
            self.encode_into(x[r], values)
        return x

    def with_occlusions(self, x: np.ndarray) -> np.ndarray:
        """[n, dim] -> [n, 1 + features, dim]: each row, then the row with feature k missing."""
        out = np.empty((x.shape[0], 1 + self.keep.shape[0], self.dim), dtype=np.result_type(x, self.keep))
        out[:, 0] = x
        occluded = out[:, 1:]
        np.multiply(x[:, None, :], self.keep, out=occluded)
        occluded += self.fill
        return out


@dataclass(frozen=True)
class LoadedModel:
    """A model version decoded once, shared read-only by all requests."""

    task: TaskSpec
    version: int
    federated_round: int
    layers: list[Layer]
    stats: GlobalStats
    threshold: float
    plan: EncodingPlan

    # Set for a custom torch model (see fibemrss.domain.torch_models); built-ins use `layers` in numpy.
    torch_forward: Callable[[np.ndarray], np.ndarray] | None = None
    # Which model this is: the federation's ("global") or this hospital's fine-tuned one
    # ("personalized", from global version `base_version`; 0 for a global model).
    kind: str = "global"
    base_version: int = 0
    # What each encoded input column may hold under this version's statistics (KServe v2 inputs).
    limits: EncodedLimits | None = None

    @classmethod
    def from_published(
        cls,
        task: TaskSpec,
        version: int,
        federated_round: int,
        model: PublishedModel,
        kind: str = "global",
        base_version: int = 0,
    ) -> LoadedModel:
        plan = EncodingPlan.build(task, model.stats)
        forward = logits_function(model.model, plan.dim, model.params) if model.shapes is None else None
        layers = [] if model.shapes is None else unflatten(model.params, list(model.shapes))
        return cls(
            task,
            version,
            federated_round,
            layers,
            model.stats,
            model.threshold,
            plan,
            forward,
            kind,
            base_version,
            EncodedLimits.build(task, model.stats),
        )

    @classmethod
    def from_version(cls, task: TaskSpec, mv: ModelVersion) -> LoadedModel:
        return cls.from_published(
            task, mv.version, mv.federated_round, mv.model, mv.kind, mv.base_version or 0
        )

    @property
    def described(self) -> str:
        """Which model answered, for people: "global version 15" or "personalized version 16
        (fine-tuned from global version 15)"."""
        if self.kind == "personalized":
            return f"personalized version {self.version} (fine-tuned from global version {self.base_version})"
        return f"global version {self.version}"

    @property
    def input_dim(self) -> int:
        return self.plan.dim

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Encoded inputs [n, input_dim] -> logits [n] (float64)."""
        if self.torch_forward is not None:
            return self.torch_forward(x)
        return forward_logits(self.layers, x)


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


def diagnose(model: LoadedModel, record: PatientRecord, top: int = TOP_CONTRIBUTIONS) -> Reference:
    return diagnose_batch(model, [record], top)[0]


def diagnose_batch(
    model: LoadedModel, records: Sequence[PatientRecord], top: int = TOP_CONTRIBUTIONS
) -> list[Reference]:
    """References for several patients from one forward pass over all their occlusion rows.

    A feature's signed contribution is the patient's logit minus the logit with that feature
    treated as missing (occlusion): valid for any model, and exact for logistic regression.
    """
    return diagnose_values(model, [extract(model.task, r)[0] for r in records], top)


def diagnose_values(
    model: LoadedModel, rows: Sequence[Sequence[FeatureValue]], top: int = TOP_CONTRIBUTIONS
) -> list[Reference]:
    """diagnose_batch on feature values already read (`feature_extraction.extract`, by any transport)."""
    task = model.task
    x = model.plan.encode(rows)
    n_features = len(task.features)
    stacked = model.plan.with_occlusions(x).reshape(-1, model.plan.dim)
    logits = model.logits(stacked).reshape(len(rows), 1 + n_features)
    probabilities = sigmoid(logits[:, 0])
    deltas = logits[:, :1] - logits[:, 1:]
    names = model.plan.names
    out: list[Reference] = []
    for values, p, delta in zip(rows, probabilities.tolist(), deltas.tolist(), strict=True):
        contributions = [(names[k], delta[k]) for k in range(n_features) if values[k] is not None]
        contributions.sort(key=lambda c: abs(c[1]), reverse=True)
        out.append(
            Reference(
                probability=p,
                label="disease" if p >= model.threshold else "no disease",
                risk_band=risk_band(p),
                contributions=contributions[:top],
                # feature_encoding.imputed_features, with the names read once per model version
                imputed=[names[k] for k in range(n_features) if values[k] is None],
            )
        )
    return out


def infer(model: LoadedModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The raw model on encoded inputs [n, input_dim]: (probability, logit), each [n, 1] float32."""
    logits = model.logits(x)
    return sigmoid(logits).astype(np.float32)[:, None], logits.astype(np.float32)[:, None]
