"""Models by name: built-ins share the numpy layout, any importable torch factory trains and serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.feature_encoding import GlobalStats, input_dim, input_names, numeric_features
from fibemrss.domain.model_params import forward_logits, layer_shapes, sigmoid, unflatten
from fibemrss.domain.published_model import PublishedModel
from fibemrss.domain.records import PatientRecord, Provenance
from fibemrss.domain.task_spec import HyperParameters
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.domain.torch_models import (
    build_module,
    initial_vector,
    load_vector,
    logits_function,
    parameter_count,
    vector_of,
)
from services.hospital_agent.core.training import train_local
from services.inference.core.diagnosis import LoadedModel, diagnose_batch

CUSTOM = "fibemrss.domain.model_examples:residual_mlp"


@pytest.mark.parametrize("model", ["logistic_regression", "mlp"])
def test_builtin_torch_modules_use_the_numpy_parameter_layout(model: str) -> None:
    dim = 7
    vector = np.random.default_rng(0).normal(size=parameter_count(model, dim))
    module = build_module(model, dim)
    load_vector(module, vector)
    x = np.random.default_rng(1).normal(size=(5, dim)).astype(np.float32)
    with torch.no_grad():
        torch_logits = module(torch.from_numpy(x))[:, 0].numpy()
    numpy_logits = forward_logits(unflatten(vector, layer_shapes(model, dim)), x)
    np.testing.assert_allclose(torch_logits, numpy_logits, rtol=1e-5, atol=1e-5)


def test_a_custom_factory_by_name_trains_and_serves() -> None:
    dim = 4
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, dim)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    start = initial_vector(CUSTOM, dim)
    assert start.size == parameter_count(CUSTOM, dim) == (dim + 1) + (dim * 8 + 8) + (8 + 1)
    np.testing.assert_array_equal(start, initial_vector(CUSTOM, dim))  # every hospital starts alike
    trained = train_local(CUSTOM, start, x, y, HyperParameters(learning_rate=0.1, local_epochs=3), seed=0)

    def accuracy(vector: np.ndarray) -> float:
        return float(((sigmoid(logits_function(CUSTOM, dim, vector)(x)) >= 0.5) == (y > 0.5)).mean())

    assert accuracy(trained) > 0.9
    module = build_module(CUSTOM, dim)
    load_vector(module, trained)
    np.testing.assert_allclose(vector_of(module), trained, rtol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "fibemrss.domain.model_examples:nope", "no.such.module:f", ":"])
def test_unknown_models_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parameter_count(name, 3)
    assert error.value.violations[0].field == "model"


def test_inference_serves_a_custom_model_published_without_layer_shapes() -> None:
    task = HEART_DISEASE_V1
    dim = input_dim(task)
    vector = np.random.default_rng(3).normal(0, 0.3, size=parameter_count(CUSTOM, dim))
    n_numeric = len(numeric_features(task))
    stats = GlobalStats((50.0,) * n_numeric, (10.0,) * n_numeric, (1.0,) * n_numeric)
    model = LoadedModel.from_published(
        task,
        7,
        7,
        PublishedModel.from_json(
            {
                "model": CUSTOM,
                "input_names": input_names(task),
                "input_dim": dim,
                "shapes": None,
                "params": vector.tolist(),
                "stats": stats.to_json(),
                "threshold": 0.5,
            }
        ),
    )
    patient = PatientRecord("p", Provenance("s", "p", "h"), sex="female", age_years=70.0)
    ref = diagnose_batch(model, [patient])[0]
    x = model.plan.encode([[70.0, "female"] + [None] * (len(task.features) - 2)])
    expected = float(sigmoid(logits_function(CUSTOM, dim, vector)(x))[0])
    assert ref.probability == pytest.approx(expected, rel=1e-6)
