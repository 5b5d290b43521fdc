"""Model parameters as plain numpy layers: shapes, flattening for the HE codec, forward pass.

Training happens in PyTorch inside the agent; everything that only reads a model (evaluation,
inference) uses this numpy forward pass, so those processes need no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fibemrss.domain.errors import InvalidArgument

MLP_HIDDEN = 16
Layer = tuple[np.ndarray, np.ndarray]  # (weight [out, in], bias [out])


def layer_shapes(model: str, input_dim: int) -> list[tuple[int, int]]:
    if model == "logistic_regression":
        return [(1, input_dim)]
    if model == "mlp":
        return [(MLP_HIDDEN, input_dim), (1, MLP_HIDDEN)]
    raise InvalidArgument(f"unknown model {model!r}; known: logistic_regression, mlp")


def param_count(shapes: list[tuple[int, int]]) -> int:
    return sum(o * i + o for o, i in shapes)


def init_layers(model: str, input_dim: int, seed: int = 0) -> list[Layer]:
    """The round-0 model; seeded so that every hospital starts from the same parameters."""
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    for out_dim, in_dim in layer_shapes(model, input_dim):
        if model == "logistic_regression":
            w = np.zeros((out_dim, in_dim))
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(in_dim), size=(out_dim, in_dim))
        layers.append((w, np.zeros(out_dim)))
    return layers


def flatten(layers: list[Layer]) -> np.ndarray:
    return np.concatenate([np.concatenate([w.ravel(), b.ravel()]) for w, b in layers]).astype(np.float64)


def unflatten(vector: np.ndarray, shapes: list[tuple[int, int]]) -> list[Layer]:
    layers: list[Layer] = []
    pos = 0
    for out_dim, in_dim in shapes:
        w = vector[pos : pos + out_dim * in_dim].reshape(out_dim, in_dim)
        pos += out_dim * in_dim
        b = vector[pos : pos + out_dim]
        pos += out_dim
        layers.append((w.astype(np.float64), b.astype(np.float64)))
    if pos != vector.size:
        raise InvalidArgument(f"parameter vector has {vector.size} values, the model needs {pos}")
    return layers


def forward_logits(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)
    for k, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h[:, 0]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0


def accuracy_of_logits(logits: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> Accuracy:
    if len(y) == 0:
        return Accuracy(0, 0)
    predicted = sigmoid(logits) >= threshold
    return Accuracy(int((predicted == (y > 0.5)).sum()), int(len(y)))


def accuracy(layers: list[Layer], x: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> Accuracy:
    return accuracy_of_logits(forward_logits(layers, x), y, threshold)
