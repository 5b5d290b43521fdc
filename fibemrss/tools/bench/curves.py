"""Accuracy per round and per hospital over several split seeds, with each final model's test
scores (for ROC and calibration): the quality benchmark's protocol, unrolled round by round.

Same data, preprocessing, hyper-parameters (BenchConfig, chosen on validation only) and
encryption as `quality_bench`; each seed re-draws every hospital's stratified train/test split.
The task's strategy (FedYogi for heart-disease-v1) and FedAvg run both in plaintext and through
the real HE codec.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fibemrss.domain.model_params import forward_logits, layer_shapes, sigmoid, unflatten
from fibemrss.domain.strategies import strategy_by_name
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.tools.bench.quality_bench import (
    FLAMBY_PUBLISHED,
    SPLIT_SEED,
    Averager,
    BenchConfig,
    HeRound,
    Hospital,
    plain_average,
    prepare,
    run_federated,
    train_centralized,
)

DEFAULT_SEEDS = tuple(SPLIT_SEED + i for i in range(5))


def _probabilities(task: TaskSpec, params: np.ndarray, x: np.ndarray) -> np.ndarray:
    return sigmoid(forward_logits(unflatten(params, layer_shapes(task.model, x.shape[1])), x))


def _accuracy(task: TaskSpec, params: np.ndarray, hospitals: Sequence[Hospital]) -> float:
    x = np.concatenate([h.x_test for h in hospitals])
    y = np.concatenate([h.y_test for h in hospitals])
    return float(np.mean((_probabilities(task, params, x) >= task.threshold) == (y > 0.5)))


def _one_seed(
    task: TaskSpec, shared_data: Path | None, seed: int, config: BenchConfig, strategies: dict[str, Any]
) -> dict[str, Any]:
    he = HeRound()
    hospitals, _, source = prepare(task, shared_data, he.average, split_seed=seed)
    out: dict[str, Any] = {"seed": seed, "data": source, "curves": {}, "final_params": {}}
    for label, strategy in strategies.items():
        for mode, average in (("plain", plain_average), ("encrypted", he.average)):
            pooled: list[float] = []
            per_hospital: dict[str, list[float]] = {h.name: [] for h in hospitals}

            def record(_r: int, params: np.ndarray) -> None:
                pooled.append(_accuracy(task, params, hospitals))  # noqa: B023 - used at once
                for h in hospitals:  # noqa: B023
                    per_hospital[h.name].append(_accuracy(task, params, [h]))  # noqa: B023

            averager: Averager = average
            final = run_federated(task, hospitals, strategy, config, averager, on_round=record)
            out["curves"][f"{label}_{mode}"] = {"pooled": pooled, "per_hospital": per_hospital}
            out["final_params"][f"{label}_{mode}"] = final
    x_pool = np.concatenate([h.x_train for h in hospitals])
    y_pool = np.concatenate([h.y_train for h in hospitals])
    pooled_model = train_centralized(task, x_pool, y_pool, config)
    out["pooled_model"] = {
        "pooled": _accuracy(task, pooled_model, hospitals),
        "per_hospital": {h.name: _accuracy(task, pooled_model, [h]) for h in hospitals},
    }
    out["local_only"] = {
        h.name: _accuracy(task, train_centralized(task, h.x_train, h.y_train, config), [h]) for h in hospitals
    }
    final_key = f"{task.hyper.strategy}_encrypted"
    out["scores"] = {
        h.name: {
            "p": _probabilities(task, out["final_params"][final_key], h.x_test).round(6).tolist(),
            "y": h.y_test.astype(int).tolist(),
        }
        for h in hospitals
    }
    out["max_abs_param_diff_encrypted_vs_plain"] = {
        label: float(
            np.max(np.abs(out["final_params"][f"{label}_encrypted"] - out["final_params"][f"{label}_plain"]))
        )
        for label in strategies
    }
    del out["final_params"]
    return out


def run_quality_curves(
    shared_data: Path | None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    task: TaskSpec = HEART_DISEASE_V1,
    config: BenchConfig | None = None,
) -> dict[str, Any]:
    config = config or BenchConfig()
    started = time.perf_counter()
    options = dict(task.hyper.server_options)
    strategies = {
        "fedavg": strategy_by_name("fedavg"),
        task.hyper.strategy: strategy_by_name(task.hyper.strategy, **options),
    }
    runs = [_one_seed(task, shared_data, seed, config, strategies) for seed in seeds]
    keys = list(runs[0]["curves"])
    hospitals = list(runs[0]["local_only"])

    def mean_sd(values: list[float]) -> dict[str, float]:
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return {"mean": round(float(np.mean(values)), 4), "sd": round(sd, 4)}

    final = {k: mean_sd([r["curves"][k]["pooled"][-1] for r in runs]) for k in keys}
    final["pooled_training"] = mean_sd([r["pooled_model"]["pooled"] for r in runs])
    per_hospital_final = {
        h: {
            **{k: mean_sd([r["curves"][k]["per_hospital"][h][-1] for r in runs]) for k in keys},
            "local_only": mean_sd([r["local_only"][h] for r in runs]),
            "pooled_training": mean_sd([r["pooled_model"]["per_hospital"][h] for r in runs]),
        }
        for h in hospitals
    }
    return {
        "task": task.name,
        "model": task.model,
        "task_strategy": task.hyper.strategy,
        "rounds": config.rounds,
        "seeds": list(seeds),
        "data": runs[0]["data"],
        "metric": "accuracy on each seed's held-out test rows (pooled over hospitals, or one hospital's)",
        "final_pooled_test_accuracy": final,
        "final_per_hospital_test_accuracy": per_hospital_final,
        "flamby_published_pooled_test_accuracy": FLAMBY_PUBLISHED,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 2),
    }
