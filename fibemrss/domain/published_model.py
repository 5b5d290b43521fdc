"""The model a hospital publishes after a federated round, and its JSON form (versioned).

Written by the hospital agent, read by the inference service; stored in the hospital's model
store as JSON. `FORMAT` is the layout version: a reader refuses a layout it does not know
instead of serving a half-understood model. Rows written before the field existed are format 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.feature_encoding import GlobalStats
from fibemrss.domain.model_params import param_count

FORMAT = 1


@dataclass(frozen=True)
class PublishedModel:
    model: str  # "logistic_regression", "mlp" or "package.module:factory"
    input_names: tuple[str, ...]
    input_dim: int
    # Built-ins: the numpy (out, in) layer shapes, each with a bias, served without torch.
    # None: a custom torch module, rebuilt by name.
    shapes: tuple[tuple[int, int], ...] | None
    params: np.ndarray = field(repr=False)  # flat float64 vector
    stats: GlobalStats
    threshold: float

    def __post_init__(self) -> None:
        problems: list[FieldProblem] = []
        if self.params.ndim != 1:
            problems.append(FieldProblem("params", "must be a flat vector"))
        elif not np.all(np.isfinite(self.params)):
            problems.append(FieldProblem("params", "must be finite numbers"))
        if self.shapes is not None:
            needed = param_count(list(self.shapes))
            if needed != self.params.size:
                problems.append(
                    FieldProblem("params", f"has {self.params.size} values, the shapes need {needed}")
                )
        if self.input_dim <= 0:
            problems.append(FieldProblem("input_dim", "must be positive"))
        if not 0.0 < self.threshold < 1.0:
            problems.append(FieldProblem("threshold", "must be between 0 and 1"))
        if problems:
            raise InvalidArgument("invalid published model", problems)

    @property
    def is_builtin(self) -> bool:
        return self.shapes is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "input_names": list(self.input_names),
            "input_dim": self.input_dim,
            "shapes": [list(s) for s in self.shapes] if self.shapes is not None else None,
            "params": self.params.tolist(),
            "stats": self.stats.to_json(),
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublishedModel:
        fmt = data.get("format", 1)
        if fmt != FORMAT:
            raise InvalidArgument(
                "unknown model layout", [FieldProblem("format", f"{fmt!r} is not a layout this build reads")]
            )
        try:
            shapes = data["shapes"]
            return cls(
                model=str(data["model"]),
                input_names=tuple(str(n) for n in data["input_names"]),
                input_dim=int(data["input_dim"]),
                shapes=tuple((int(s[0]), int(s[1])) for s in shapes) if shapes is not None else None,
                params=np.asarray(data["params"], dtype=np.float64),
                stats=GlobalStats.from_json(data["stats"]),
                threshold=float(data["threshold"]),
            )
        except KeyError as exc:
            raise InvalidArgument(
                "incomplete published model", [FieldProblem(str(exc.args[0]), "is required")]
            ) from None
        except (TypeError, ValueError):
            raise InvalidArgument(
                "malformed published model", [FieldProblem("model", "a field has the wrong type")]
            ) from None


ModelKind = Literal["global", "personalized"]


@dataclass(frozen=True)
class ModelVersion:
    """One published version of a task's model at a hospital, with its local evaluation.

    `kind` "global" is the federation's model after `federated_round`; "personalized" is that
    model fine-tuned on this hospital's own training rows (`base_version` is the global version
    it started from). A `standby` version is stored and can be pinned but is not served by
    default: the personalized model that lost the validation choice.
    """

    task: str
    version: int
    federated_round: int
    model: PublishedModel
    metrics: dict[str, Any]
    kind: ModelKind = "global"
    base_version: int | None = None
    standby: bool = False
