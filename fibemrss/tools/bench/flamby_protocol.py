"""FLamby's own Fed-Heart-Disease protocol, beside ours: its 740 patients, its split, its metric.

Part of `fibemrss bench quality` (docs/quality.md). What is FLamby's here, read from its public
dataset code and re-implemented (no code copied):

- data: each `processed.<center>.data` file, `?` as missing, the columns slope, ca and thal
  dropped, then every row with a missing value dropped: 740 patients (Cleveland 303, Hungary 261,
  Switzerland 46, VA 130); label num > 0; `cp` and `restecg` one-hot with the first category
  dropped (13 inputs); `chol` = 0 kept as a value, as FLamby does;
- split: per center, scikit-learn's `train_test_split(train_size=0.66, random_state=43,
  shuffle=True)`, stratified by label when both classes have more than 2 rows. Its algorithm
  (StratifiedShuffleSplit over numpy's legacy RandomState) is reproduced in
  `flamby_train_test_split`, so the same rows land in train and test without scikit-learn;
- normalization: each center by the mean and standard deviation (n - 1) of its own training rows
  (plus 1e-9); the pooled model by those of all training rows;
- model and metric: logistic regression; accuracy at 0.5 on each center's test set, averaged over
  the four centers (FLamby's "mean per-center test accuracy"), and on the pooled test set.

What is ours: training is the agents' (`train_local`, SGD, batch size 4, the learning rate and
budget of `BenchConfig`, chosen on validation in our protocol), federated rounds go through the
real HE codec, and "global then personalized" is the agents' personalization
(`services.hospital_agent.core.personalization`). Five seeds vary the order of the training batches
and the validation rows; the split is FLamby's, fixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fibemrss.domain.model_params import accuracy_of_logits
from fibemrss.domain.strategies import ServerStrategy, StrategyState, client_proximal_mu, strategy_by_name
from fibemrss.domain.task_spec import PersonalizationSpec, TaskSpec
from fibemrss.domain.torch_models import initial_vector, logits_function
from services.hospital_agent.core.personalization import Choice, personalize_arrays
from services.hospital_agent.core.training import train_local

CENTERS = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va-long-beach": "processed.va.data",
}
DROPPED_COLUMNS = (10, 11, 12)  # slope, ca, thal: FLamby drops them, they are the most often missing
ONE_HOT_COLUMNS = (2, 6)  # cp, restecg
TRAIN_FRACTION = 0.66
RANDOM_STATE = 43
SEEDS = (0, 1, 2, 3, 4)
# Fine-tuning grid, searched on validation rows only (never the test rows).
FINE_TUNE_EPOCHS = (10, 30)
FINE_TUNE_LEARNING_RATES = (0.03, 0.1, 0.3)
VALIDATION_FRACTION = 0.25
FLAMBY_PUBLISHED = {
    "fedavg_mean_per_center": 0.685,
    "pooled_mean_per_center": 0.735,
    "fenda_fl_mean_per_center_reported": 0.812,
}
GOAL_PERSONALIZED = 0.812
GOAL_MAX_LOSS = 0.01


@dataclass(frozen=True)
class Center:
    name: str
    x_train: np.ndarray  # normalized by this center's training rows
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_train_pooled: np.ndarray  # normalized by every center's training rows (the pooled model)
    x_test_pooled: np.ndarray


# -- data ------------------------------------------------------------------------------------------------
def read_center(text: str) -> tuple[np.ndarray, np.ndarray]:
    """One center's rows after FLamby's filtering: (features [n, 10] in file order, label 0/1)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [math.nan if c.strip() == "?" else float(c) for c in line.split(",")]
        kept = [v for i, v in enumerate(cells) if i not in DROPPED_COLUMNS]
        if not any(math.isnan(v) for v in kept):
            rows.append(kept)
    table = np.array(rows, dtype=np.float64)
    return table[:, :-1], (table[:, -1] > 0).astype(np.float64)


def one_hot(tables: Sequence[np.ndarray]) -> list[np.ndarray]:
    """cp and restecg one-hot over the categories seen in all centers, the first dropped (as
    pandas.get_dummies(drop_first=True) on the concatenated centers)."""
    pooled = np.concatenate(tables)
    categories = {c: np.unique(pooled[:, c])[1:] for c in ONE_HOT_COLUMNS}
    out = []
    for table in tables:
        plain = np.delete(table, list(ONE_HOT_COLUMNS), axis=1)
        dummies = [
            (table[:, c : c + 1] == categories[c][None, :]).astype(np.float64) for c in ONE_HOT_COLUMNS
        ]
        out.append(np.concatenate([plain, *dummies], axis=1))
    return out


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `draws` each class gets: floor of the proportional share, the rest given to
    the largest remainders, ties broken at random (scikit-learn's rule)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    missing = int(draws - floored.sum())
    if missing > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (candidates,) = np.where(remainder == value)
            take = min(len(candidates), missing)
            floored[rng.choice(candidates, size=take, replace=False)] += 1
            missing -= take
            if missing == 0:
                break
    return floored.astype(np.int64)


def flamby_train_test_split(
    labels: np.ndarray, train_fraction: float = TRAIN_FRACTION, random_state: int = RANDOM_STATE
) -> tuple[np.ndarray, np.ndarray]:
    """The (train, test) positions FLamby's scikit-learn call gives one center."""
    n = len(labels)
    test_size = 1.0 - train_fraction
    n_test, n_train = math.ceil(test_size * n), math.floor(train_fraction * n)
    rng = np.random.RandomState(random_state)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    if len(classes) < 2 or counts.min() <= 2:  # FLamby does not stratify then
        order = rng.permutation(n)
        return order[n_test : n_test + n_train], order[:n_test]
    members = np.split(np.argsort(inverse, kind="mergesort"), np.cumsum(counts)[:-1])
    to_train = _approximate_mode(counts, n_train, rng)
    to_test = _approximate_mode(counts - to_train, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for k in range(len(classes)):
        shuffled = members[k].take(rng.permutation(counts[k]), mode="clip")
        train.extend(shuffled[: to_train[k]].tolist())
        test.extend(shuffled[to_train[k] : to_train[k] + to_test[k]].tolist())
    return rng.permutation(train), rng.permutation(test)


def _normalize(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    mean = reference.mean(axis=0)
    std = reference.std(axis=0, ddof=1)
    return ((x - mean) / (std + 1e-9)).astype(np.float32)


def load_centers(folder: Path) -> list[Center]:
    raw = [read_center((folder / file).read_text()) for file in CENTERS.values()]
    features = one_hot([x for x, _ in raw])
    splits = [flamby_train_test_split(y) for _, y in raw]
    pooled_train = np.concatenate([x[np.sort(tr)] for x, (tr, _) in zip(features, splits, strict=True)])
    centers = []
    for name, x, (_, y), (tr, te) in zip(CENTERS, features, raw, splits, strict=True):
        tr, te = np.sort(tr), np.sort(te)  # positions; the order is immaterial to training seeds below
        centers.append(
            Center(
                name=name,
                x_train=_normalize(x[tr], x[tr]),
                y_train=y[tr].astype(np.float32),
                x_test=_normalize(x[te], x[tr]),
                y_test=y[te].astype(np.float32),
                x_train_pooled=_normalize(x[tr], pooled_train),
                x_test_pooled=_normalize(x[te], pooled_train),
            )
        )
    return centers


def validation_split(y: np.ndarray, seed: int, center_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(fine-tuning, validation) positions inside a center's training rows, stratified, seeded."""
    rng = np.random.default_rng([seed, center_index, 7])
    fit: list[int] = []
    validation: list[int] = []
    for label in (0.0, 1.0):
        members = rng.permutation(np.flatnonzero(y == label))
        n_val = int(round(VALIDATION_FRACTION * len(members)))
        validation += members[:n_val].tolist()
        fit += members[n_val:].tolist()
    return np.array(sorted(fit), dtype=np.int64), np.array(sorted(validation), dtype=np.int64)


# -- methods ---------------------------------------------------------------------------------------------
def _accuracy(task: TaskSpec, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return accuracy_of_logits(logits_function(task.model, x.shape[1], params)(x), y, task.threshold).value


def _zeros(task: TaskSpec, dim: int) -> np.ndarray:
    return initial_vector(task.model, dim)


def federate(
    task: TaskSpec,
    centers: Sequence[Center],
    strategy: ServerStrategy,
    rounds: int,
    average: Any,
    seed: int,
) -> np.ndarray:
    """The agents' rounds on FLamby's centers: one local epoch each, weighted by n_train."""
    hyper = replace(task.hyper, local_epochs=1, proximal_mu=client_proximal_mu(strategy))
    params = _zeros(task, centers[0].x_train.shape[1])
    state = StrategyState()
    for r in range(1, rounds + 1):
        updates = [
            train_local(task.model, params, c.x_train, c.y_train, hyper, seed=seed * 1000 + r)
            for c in centers
        ]
        params, state = strategy.step(state, params, average(updates, [len(c.y_train) for c in centers]))
    return params


def personalize_centers(
    task: TaskSpec,
    centers: Sequence[Center],
    global_params: np.ndarray,
    spec: PersonalizationSpec,
    seed: int,
    refit: bool = True,
) -> list[tuple[np.ndarray, Choice, float, float]]:
    """Per center, as its agent does: (served model, "global"/"personalized", global and
    personalized validation log-loss), chosen on validation rows carved from the training rows."""
    out = []
    for k, c in enumerate(centers):
        fit, val = validation_split(c.y_train, seed, k)
        result = personalize_arrays(
            task,
            spec,
            global_params,
            (c.x_train[fit], c.y_train[fit]),
            (c.x_train[val], c.y_train[val]),
            seed=seed * 1000 + 999,
            refit=refit,
        )
        served = result.params if result.chosen == "personalized" else global_params
        out.append((served, result.chosen, result.global_score.log_loss, result.personalized_score.log_loss))
    return out


def tune_fine_tuning(
    task: TaskSpec, centers: Sequence[Center], globals_by_seed: dict[int, np.ndarray]
) -> tuple[PersonalizationSpec, dict[str, float]]:
    """The fine-tuning epochs and learning rate with the lowest mean validation log-loss of the
    personalized models (over centers and seeds); only training rows are read."""
    losses: dict[str, float] = {}
    for epochs in FINE_TUNE_EPOCHS:
        for lr in FINE_TUNE_LEARNING_RATES:
            spec = PersonalizationSpec(epochs, lr, VALIDATION_FRACTION)
            per_seed = [
                np.mean([p for _, _, _, p in personalize_centers(task, centers, g, spec, s, refit=False)])
                for s, g in globals_by_seed.items()
            ]
            losses[f"epochs={epochs},lr={lr}"] = round(float(np.mean(per_seed)), 4)
    best = min(losses, key=lambda k: losses[k])
    epochs_text, lr_text = (part.split("=")[1] for part in best.split(","))
    return PersonalizationSpec(int(epochs_text), float(lr_text), VALIDATION_FRACTION), losses


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "sd": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4)}


def global_view(centers: Sequence[Center]) -> list[Center]:
    """The centers as our agents see them: every input standardized with the federation's global
    statistics (the n_train-weighted mean and spread of all training rows, which the agents
    compute through the HE codec) instead of each center's own."""
    return [replace(c, x_train=c.x_train_pooled, x_test=c.x_test_pooled) for c in centers]


def run_flamby_protocol(
    folder: Path, task: TaskSpec, rounds: int, strategy_label: str, strategy: ServerStrategy, average: Any
) -> dict[str, Any]:
    """Every method over SEEDS on FLamby's data and split; figures as mean and sd over seeds.

    Federated methods run twice: on FLamby's per-center normalization, and on our agents'
    global statistics (suffix `_global_stats`)."""
    centers = load_centers(folder)
    views = {"": list(centers), "_global_stats": global_view(centers)}
    fedavg = strategy_by_name("fedavg")
    central = replace(task.hyper, local_epochs=rounds, proximal_mu=0.0)  # the federated runs' budget
    zeros = _zeros(task, centers[0].x_train.shape[1])
    x_pool = np.concatenate([c.x_train_pooled for c in centers])
    y_pool = np.concatenate([c.y_train for c in centers])
    # method -> seed -> (model per center, the inputs it reads)
    models: dict[str, dict[int, tuple[list[np.ndarray], list[Center]]]] = {}
    globals_by_view: dict[str, dict[int, np.ndarray]] = {suffix: {} for suffix in views}
    for s in SEEDS:
        pooled = train_local(task.model, zeros, x_pool, y_pool, central, seed=s * 1000)
        models.setdefault("pooled", {})[s] = ([pooled] * 4, views["_global_stats"])
        local = [
            train_local(task.model, zeros, c.x_train, c.y_train, central, seed=s * 1000) for c in centers
        ]
        models.setdefault("local_only", {})[s] = (local, views[""])
        for suffix, view in views.items():
            avg = federate(task, view, fedavg, rounds, average, s)
            models.setdefault(f"fedavg{suffix}", {})[s] = ([avg] * 4, view)
            globals_by_view[suffix][s] = federate(task, view, strategy, rounds, average, s)
            models.setdefault(f"{strategy_label}{suffix}", {})[s] = ([globals_by_view[suffix][s]] * 4, view)
    personalization: dict[str, Any] = {}
    for suffix, view in views.items():
        spec, grid = tune_fine_tuning(task, view, globals_by_view[suffix])
        choices: dict[str, list[str]] = {c.name: [] for c in centers}
        for s in SEEDS:
            served = personalize_centers(task, view, globals_by_view[suffix][s], spec, s)
            models.setdefault(f"personalized{suffix}", {})[s] = ([m for m, _, _, _ in served], view)
            for c, (_, chosen, _, _) in zip(centers, served, strict=True):
                choices[c.name].append(chosen)
        personalization[f"personalized{suffix}"] = {
            "from": f"{strategy_label}{suffix}",
            "fine_tuning": {"local_epochs": spec.local_epochs, "learning_rate": spec.learning_rate},
            "grid_validation_log_loss": grid,
            "served_by_center": {
                name: {k: v.count(k) for k in ("global", "personalized")} for name, v in choices.items()
            },
        }
    results: dict[str, dict[str, list[float]]] = {}
    n_test = sum(len(c.y_test) for c in centers)
    for method, by_seed in models.items():
        row = results.setdefault(method, {"mean_per_center": [], "pooled": []})
        for s in SEEDS:
            params, view = by_seed[s]
            accs = [_accuracy(task, p, c.x_test, c.y_test) for p, c in zip(params, view, strict=True)]
            row["mean_per_center"].append(float(np.mean(accs)))
            row["pooled"].append(sum(a * len(c.y_test) for a, c in zip(accs, view, strict=True)) / n_test)
            for c, a in zip(centers, accs, strict=True):
                row.setdefault(c.name, []).append(a)
    summary: dict[str, dict[str, Any]] = {
        method: {k: _mean_sd(v) for k, v in row.items()} for method, row in results.items()
    }
    for method, row in results.items():
        summary[method]["by_seed"] = {k: [round(v, 4) for v in values] for k, values in row.items()}
    best = "_global_stats"  # the goals are about what the agents do: global statistics
    worst_loss = max(
        float(g - p)
        for c in centers
        for g, p in zip(
            results[f"{strategy_label}{best}"][c.name], results[f"personalized{best}"][c.name], strict=True
        )
    )
    personalized_mean = summary[f"personalized{best}"]["mean_per_center"]["mean"]
    return {
        "protocol": "FLamby Fed-Heart-Disease: its 740 patients, features, per-center normalization and split",
        "examples": {c.name: {"train": len(c.y_train), "test": len(c.y_test)} for c in centers},
        "inputs": int(centers[0].x_train.shape[1]),
        "seeds": list(SEEDS),
        "budget": f"{rounds} epochs over every training record: federated {rounds} rounds x 1 local epoch",
        "local_only_note": "each center's own model on its own test set",
        "normalization": {
            "(no suffix), local_only": "FLamby's: each center by its own training rows' mean and sd",
            "_global_stats, pooled": "ours: every center by the federation's global statistics (all training rows)",
        },
        "global_then_personalized": {
            **personalization,
            "validation_fraction_of_train": VALIDATION_FRACTION,
            "fine_tuning_chosen_on": (
                "mean validation log-loss of the personalized models over centers and seeds; test rows unread"
            ),
            "choice_per_center": "the personalized model only when its validation log-loss is lower (the agents' rule)",
        },
        "test_accuracy": summary,
        "flamby_published": FLAMBY_PUBLISHED,
        "goals": {
            "on": f"personalized{best} against {strategy_label}{best}",
            f"personalized_mean_per_center_at_least_{GOAL_PERSONALIZED}": personalized_mean
            >= GOAL_PERSONALIZED,
            f"no_center_worse_personalized_than_global_by_more_than_{GOAL_MAX_LOSS}_in_any_seed": worst_loss
            <= GOAL_MAX_LOSS,
            "largest_center_loss_personalized_vs_global": round(worst_loss, 4),
        },
    }
