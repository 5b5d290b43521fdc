"""Models by name: the built-in logistic regression and MLP, or any importable torch factory.

A task's `model` is "logistic_regression", "mlp", or "package.module:factory", where
`factory(input_dim: int) -> torch.nn.Module` returns a module mapping [n, input_dim] inputs to
[n, 1] logits. Parameters travel as one flat float64 vector in `module.parameters()` order (for
the built-ins that is the numpy layout of fibemrss.domain.model_params, so their forward pass needs no
torch). torch is imported only when a module is actually built: importing it costs about 2.4 s, which the
gateway, the CLI and the inference service of a built-in model never pay (the function-local
`import torch` lines below are deliberate, for that start-up time).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.model_params import (
    flatten,
    forward_logits,
    init_layers,
    layer_shapes,
    param_count,
    unflatten,
)

BUILTIN_MODELS = ("logistic_regression", "mlp")


def is_builtin(model: str) -> bool:
    return model in BUILTIN_MODELS


def _factory(model: str) -> Callable[[int], Any]:
    module_name, sep, attribute = model.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidArgument(
            "unknown model",
            [
                FieldProblem(
                    "model",
                    f"{model!r} is neither {' nor '.join(BUILTIN_MODELS)} nor 'package.module:factory'",
                )
            ],
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgument(
            "model factory not found", [FieldProblem("model", f"cannot import {model!r}: {exc}")]
        ) from None
    if not callable(factory):
        raise InvalidArgument(
            "model factory not callable", [FieldProblem("model", f"{model!r} is not callable")]
        )
    return factory


def build_module(model: str, input_dim: int) -> Any:
    """A torch module for `model`; built-ins are nn.Linear stacks matching model_params' layout."""
    from torch import nn

    if model == "logistic_regression":
        return nn.Sequential(nn.Linear(input_dim, 1))
    if model == "mlp":
        hidden = layer_shapes("mlp", input_dim)[0][0]
        return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    module = _factory(model)(input_dim)
    if not isinstance(module, nn.Module):
        raise InvalidArgument(
            "bad model factory", [FieldProblem("model", f"{model!r} did not return a torch module")]
        )
    return module


def vector_of(module: Any) -> np.ndarray:
    from torch.nn.utils import parameters_to_vector

    return parameters_to_vector(module.parameters()).detach().numpy().astype(np.float64)


def load_vector(module: Any, vector: np.ndarray) -> None:
    import torch
    from torch.nn.utils import vector_to_parameters

    expected = sum(p.numel() for p in module.parameters())
    if vector.size != expected:
        raise InvalidArgument(f"parameter vector has {vector.size} values, the model needs {expected}")
    with torch.no_grad():
        vector_to_parameters(torch.from_numpy(np.asarray(vector, dtype=np.float32)), module.parameters())


def parameter_count(model: str, input_dim: int) -> int:
    if is_builtin(model):
        return param_count(layer_shapes(model, input_dim))
    return sum(p.numel() for p in build_module(model, input_dim).parameters())


def initial_vector(model: str, input_dim: int, seed: int = 0) -> np.ndarray:
    """The round-0 model, seeded so that every hospital starts from the same parameters."""
    if is_builtin(model):
        return flatten(init_layers(model, input_dim, seed))
    import torch

    torch.manual_seed(seed)
    return vector_of(build_module(model, input_dim))


def logits_function(model: str, input_dim: int, vector: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Encoded inputs [n, input_dim] -> logits [n] (float64) for a parameter vector."""
    if is_builtin(model):
        layers = unflatten(np.asarray(vector, dtype=np.float64), layer_shapes(model, input_dim))
        return lambda x: forward_logits(layers, x)
    import torch

    module = build_module(model, input_dim)
    load_vector(module, vector)
    module.eval()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(np.asarray(x, dtype=np.float32)))
        return out.reshape(len(x), -1)[:, 0].numpy().astype(np.float64)

    return forward
