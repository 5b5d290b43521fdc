"""One hostile hospital of the four UCI hospitals against the model every hospital serves (issue 22).

`fibemrss bench poisoning --json PATH` (docs/security.md, "Poisoning"). The data and split are
`fibemrss bench quality`'s (FLamby's protocol, docs/quality.md), one split per seed; each
hospital's validation rows are a seeded quarter of its training rows (used for training too, as
the agent's are); the test rows are read only to report. Each round replays the agent's loop in
plaintext with its own rules (`services/hospital_agent/core/influence.py` and
`aggregate_bounds.py`): local training from the global model, the honest hospital's clip and
weight cap, the weighted average, the codec's bounds check, the study's influence check, the
strategy step, and each hospital's validation gate for what it serves. Averaging is in plaintext:
the codec only rounds to 2^-16 (tests/hostile/test_poisoning.py runs the same attacks through the
real codec and secure aggregation).

Per strategy and attack, runs of the same seeds: `clean` (no attacker, defences on),
`today` (the attacker, the codec's bounds only), `defended` (the attacker, the study's bounds and
each hospital's own gate) and `voted` (the same with the acceptance vote, as the agent runs it
under secure aggregation: every hospital votes its gate's verdict, the hostile one accepts its own
attack, and a round is folded into the global model and served by every hospital only when none
refuses; a refused round leaves the model and the strategy's state as they were); per round, each
honest hospital's served model's test accuracy and the pooled one. Clean runs without defences
and with the vote give the cost of the defences to an honest federation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fibemrss.domain.model_params import accuracy_of_logits, flatten, init_layers
from fibemrss.domain.strategies import StrategyState, client_proximal_mu
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.domain.torch_models import logits_function
from fibemrss.he.params import DEFAULT_PARAMS
from fibemrss.tools.bench.quality_bench import (
    SPLIT_SEED,
    VALIDATION_SEED,
    VALIDATION_TRAIN_FRACTION,
    BenchConfig,
    Hospital,
    StrategyRun,
    plain_average,
    prepare,
    split_indices,
)
from services.hospital_agent.core.aggregate_bounds import (
    AggregateBounds,
    AggregateRejected,
    check_aggregate,
    check_model,
)
from services.hospital_agent.core.influence import Best, check_influence, clip_update, gate
from services.hospital_agent.core.personalization import ValidationScore, score
from services.hospital_agent.core.training import train_local

Attack = Callable[[np.ndarray, np.ndarray, int, int, float], tuple[np.ndarray, int]]
CODEC = AggregateBounds.of(DEFAULT_PARAMS)


def accuracy(task: TaskSpec, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return accuracy_of_logits(logits_function(task.model, x.shape[1], params)(x), y, task.threshold).value


def _at_codec(values: np.ndarray) -> np.ndarray:
    """What a hostile hospital can still encrypt: every value within the codec's bound."""
    return np.clip(values, -CODEC.max_abs_value, CODEC.max_abs_value)


def _inside(base: np.ndarray, values: np.ndarray, n: int, bound: float) -> np.ndarray:
    honest = values - base
    target = base - 0.3 * bound * honest / max(float(np.linalg.norm(honest)), 1e-12)
    return n * target - (n - 1) * values


# (global model, honest update, honest weight, cohort size, the study's norm bound) -> upload
ATTACKS: dict[str, Attack] = {
    "inflated_weight": lambda g, v, w, n, b: (_at_codec(-2.0 * v), CODEC.max_weight),
    "scaled_replacement": lambda g, v, w, n, b: (_at_codec(g + n * (-2.0 * v - g)), w),
    "sign_flip": lambda g, v, w, n, b: (_at_codec(-(2 * n - 1) * v), w),
    "codec_bounds": lambda g, v, w, n, b: (-CODEC.max_abs_value * np.sign(v), w),
    # Honest protocol, every training label flipped (handled in the data).
    "label_flip": lambda g, v, w, n, b: (v, w),
    # Adaptive: knows the study's bound and keeps the average inside it, against honest progress.
    "within_bound": lambda g, v, w, n, b: (_at_codec(_inside(g, v, n, b)), w),
}


@dataclass(frozen=True)
class PoisoningConfig:
    rounds: int = 15
    seeds: tuple[int, ...] = (SPLIT_SEED, SPLIT_SEED + 1, SPLIT_SEED + 2, SPLIT_SEED + 3, SPLIT_SEED + 4)
    attacker: str = "hungary"
    attack_from: int = 1
    max_weight: int = 256  # above every UCI hospital's training rows (at most 200)
    max_update_norm: float = 1.0
    validation_tolerance: float = 0.02
    strategies: tuple[StrategyRun, ...] = (
        StrategyRun("fedavg", "fedavg"),
        StrategyRun("fedyogi", "fedyogi", (("eta", 0.03),)),
    )
    attacks: tuple[str, ...] = tuple(ATTACKS)


@dataclass
class Run:
    """One federation: each round's served accuracy per hospital, what was refused."""

    served_accuracy: list[dict[str, float | None]]
    refused: list[int]
    not_served: dict[str, list[int]]
    clipped: int
    honest_norms: list[float]
    vetoed: list[int] | None = None  # under the vote: rounds within the bounds that a hospital refused
    served_everywhere_alike: bool = True


def _validation(hospitals: Sequence[Hospital]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k, h in enumerate(hospitals):
        _, val = split_indices(h.y_train.tolist(), (VALIDATION_SEED, k), VALIDATION_TRAIN_FRACTION)
        out[h.name] = (h.x_train[val], h.y_train[val])
    return out


def federate(
    task: TaskSpec,
    hospitals: Sequence[Hospital],
    run: StrategyRun,
    bench: BenchConfig,
    config: PoisoningConfig,
    attack: str | None,
    defended: bool,
    votes: bool = False,
) -> Run:
    strategy = run.build()
    hyper = bench.hyper(client_proximal_mu(strategy))
    study = replace(
        task,
        max_weight=config.max_weight if defended else None,
        max_update_norm=config.max_update_norm if defended else None,
        validation_tolerance=config.validation_tolerance if defended else None,
    )
    validation = _validation(hospitals)
    params = flatten(init_layers(task.model, hospitals[0].x_train.shape[1]))
    state = StrategyState()
    served: dict[str, np.ndarray | None] = {h.name: None for h in hospitals}
    best: dict[str, Best | None] = {h.name: None for h in hospitals}
    out = Run([], [], {h.name: [] for h in hospitals}, 0, [], [] if votes else None)
    n = len(hospitals)
    for r in range(1, config.rounds + 1):
        updates, weights = [], []
        for h in hospitals:
            hostile = attack is not None and h.name == config.attacker
            y = 1.0 - h.y_train if hostile and attack == "label_flip" else h.y_train
            new = train_local(task.model, params, h.x_train, y, hyper, seed=r)
            weight = len(h.y_train)
            if study.max_weight is not None and not (hostile and attack != "label_flip"):
                weight = min(weight, study.max_weight)
            clipped, norm = clip_update(params, new, study.max_update_norm)
            if not hostile:
                out.honest_norms.append(norm)
            if not (hostile and attack != "label_flip"):
                out.clipped += int(study.max_update_norm is not None and norm > study.max_update_norm)
                new = clipped
            if hostile and attack is not None and r >= config.attack_from:
                new, weight = ATTACKS[attack](params, new, weight, n, config.max_update_norm)
            updates.append(new)
            weights.append(weight)
        average, total = plain_average(updates, weights), sum(weights)
        try:
            check_aggregate(average, total, n, CODEC)
            check_influence(study, params, average, total, n, DEFAULT_PARAMS.frac_bits)
            new_params, new_state = strategy.step(state, params, average)
            check_model(new_params)
        except AggregateRejected:
            out.refused.append(r)
        else:
            if votes:
                if _vote(study, hospitals, new_params, validation, best, out, r, config, attack):
                    params, state = new_params, new_state
                    for h in hospitals:
                        served[h.name] = params
                else:
                    assert out.vetoed is not None
                    out.vetoed.append(r)
            else:
                params, state = new_params, new_state
                for h in hospitals:
                    _serve(study, h.name, params, validation[h.name], served, best, out, r)
        if votes:
            models = list(served.values())
            out.served_everywhere_alike &= all(
                (m is None and models[0] is None)
                or (m is not None and models[0] is not None and m is models[0])
                for m in models
            )
        row: dict[str, float | None] = {}
        for h in hospitals:
            model = served[h.name]
            row[h.name] = None if model is None else accuracy(task, model, h.x_test, h.y_test)
        row["pooled"] = _pooled(task, hospitals, served, config.attacker if attack else None)
        out.served_accuracy.append(row)
    return out


def _serve(
    study: TaskSpec,
    name: str,
    params: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray],
    served: dict[str, np.ndarray | None],
    best: dict[str, Best | None],
    out: Run,
    r: int,
) -> None:
    """The agent's `_serve`: each good round's model through the gate, the first one against the
    initial model's figures."""
    tolerance = study.validation_tolerance
    candidate: ValidationScore | None = None
    if tolerance is not None:
        candidate = score(study, params, *rows)
        previous = best[name]
        # Before any model is served: the initial model's figures, as the agent does.
        start = score(study, flatten(init_layers(study.model, rows[0].shape[1])), *rows)
        reference = previous if previous is not None else Best(start.accuracy, start.log_loss)
        if not gate(candidate, reference, tolerance).accept:
            out.not_served[name].append(r)
            return
        first = Best(candidate.accuracy, candidate.log_loss)
        best[name] = first if previous is None else previous.with_(candidate)
    served[name] = params


def _vote(
    study: TaskSpec,
    hospitals: Sequence[Hospital],
    candidate: np.ndarray,
    validation: dict[str, tuple[np.ndarray, np.ndarray]],
    best: dict[str, Best | None],
    out: Run,
    r: int,
    config: PoisoningConfig,
    attack: str | None,
) -> bool:
    """The acceptance vote: every hospital's gate on the candidate against the best it served (the
    initial model's figures before any); the crude attacker accepts whatever it made; a label-
    flipping one runs the honest gate on its flipped rows. True when none refuses, and then every
    hospital's best is updated as it serves the candidate."""
    tolerance = study.validation_tolerance
    assert tolerance is not None
    scores: dict[str, ValidationScore] = {}
    accept = True
    for h in hospitals:
        x, y = validation[h.name]
        hostile = attack is not None and h.name == config.attacker
        if hostile and attack != "label_flip":
            continue
        if hostile:
            y = 1.0 - y
        scores[h.name] = score(study, candidate, x, y)
        previous = best[h.name]
        start = score(study, flatten(init_layers(study.model, x.shape[1])), x, y)
        reference = previous if previous is not None else Best(start.accuracy, start.log_loss)
        if not gate(scores[h.name], reference, tolerance).accept:
            out.not_served[h.name].append(r)
            accept = False
    if accept:
        for name, sc in scores.items():
            previous = best[name]
            best[name] = Best(sc.accuracy, sc.log_loss) if previous is None else previous.with_(sc)
    return accept


def _pooled(
    task: TaskSpec, hospitals: Sequence[Hospital], served: dict[str, np.ndarray | None], attacker: str | None
) -> float | None:
    """Accuracy over the honest hospitals' test rows, each with the model it serves."""
    correct = total = 0
    for h in hospitals:
        if h.name == attacker:
            continue
        model = served[h.name]
        if model is None:
            return None
        correct += round(accuracy(task, model, h.x_test, h.y_test) * len(h.y_test))
        total += len(h.y_test)
    return correct / total


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return None if len(present) < len(values) else float(np.mean(present))


def _curve(runs: Sequence[Run], key: str) -> list[float | None]:
    rounds = len(runs[0].served_accuracy)
    return [_mean([run.served_accuracy[r][key] for run in runs]) for r in range(rounds)]


def _worst_gap(attacked: list[float | None], clean: list[float | None]) -> float | None:
    """The largest loss of served accuracy against the clean run at any round (nothing served
    while the clean run serves counts as its whole accuracy)."""
    gaps = [(c or 0.0) - (a or 0.0) for a, c in zip(attacked, clean, strict=True) if c is not None]
    return max(gaps) if gaps else None


def run_poisoning_bench(
    shared_data: Path | None, config: PoisoningConfig, task: TaskSpec = HEART_DISEASE_V1
) -> dict[str, Any]:
    started = time.perf_counter()
    bench = replace(BenchConfig(), rounds=config.rounds)
    prepared = {seed: prepare(task, shared_data, plain_average, split_seed=seed) for seed in config.seeds}
    source = next(iter(prepared.values()))[2]
    names = [h.name for h in next(iter(prepared.values()))[0]]
    honest = [h for h in names if h != config.attacker]
    result: dict[str, Any] = {
        "bench": "poisoning",
        "data": source,
        "config": {
            "rounds": config.rounds,
            "seeds": list(config.seeds),
            "attacker": config.attacker,
            "attack_from": config.attack_from,
            "privacy.max_weight": config.max_weight,
            "privacy.max_update_norm": config.max_update_norm,
            "federation.validation_tolerance": config.validation_tolerance,
            "local": {"learning_rate": bench.learning_rate, "local_epochs": bench.local_epochs},
            "averaging": "plaintext (the codec rounds to 2^-16; the tests use the real codec)",
        },
        "strategies": {},
    }
    for run in config.strategies:

        def runs(
            attack: str | None, defended: bool, run: StrategyRun = run, votes: bool = False
        ) -> list[Run]:
            return [
                federate(task, hospitals, run, bench, config, attack, defended, votes)
                for hospitals, _, _ in prepared.values()
            ]

        clean_today, clean = runs(None, False), runs(None, True)
        clean_voted = runs(None, True, votes=True)
        keys = ["pooled", *honest]
        figures: dict[str, Any] = {
            "clean": {k: _curve(clean, k) for k in keys},
            "clean_without_defences": {k: _curve(clean_today, k) for k in keys},
            "clean_cost": {k: _worst_gap(_curve(clean, k), _curve(clean_today, k)) for k in keys},
            "clean_rounds_not_served": sum(len(v) for r in clean for v in r.not_served.values()),
            "clean_voted": {k: _curve(clean_voted, k) for k in keys},
            "clean_voted_cost": {k: _worst_gap(_curve(clean_voted, k), _curve(clean_today, k)) for k in keys},
            "clean_voted_final_cost": {
                k: (_curve(clean_today, k)[-1] or 0.0) - (_curve(clean_voted, k)[-1] or 0.0) for k in keys
            },
            "clean_rounds_refused_by_vote": sum(len(r.vetoed or []) for r in clean_voted) / len(clean_voted),
            "clean_updates_clipped": sum(r.clipped for r in clean),
            "honest_update_norm": {
                "median": float(np.median([x for r in clean_today for x in r.honest_norms])),
                "p95": float(np.percentile([x for r in clean_today for x in r.honest_norms], 95)),
                "max": float(np.max([x for r in clean_today for x in r.honest_norms])),
            },
            "attacks": {},
        }
        for attack in config.attacks:
            entry: dict[str, Any] = {}
            for mode, defended, votes in (
                ("today", False, False),
                ("defended", True, False),
                ("voted", True, True),
            ):
                attacked = runs(attack, defended, votes=votes)
                curves = {k: _curve(attacked, k) for k in keys}
                entry[mode] = {
                    "served_accuracy": curves,
                    "worst_gap_to_clean": {k: _worst_gap(curves[k], figures["clean"][k]) for k in keys},
                    "final_gap_to_clean": {
                        k: (figures["clean"][k][-1] or 0.0) - (curves[k][-1] or 0.0) for k in keys
                    },
                    "rounds_refused": sum(len(r.refused) for r in attacked) / len(attacked),
                    "rounds_not_served": {
                        h: sum(len(r.not_served[h]) for r in attacked) / len(attacked) for h in honest
                    },
                }
                if votes:
                    entry[mode]["rounds_refused_by_vote"] = sum(len(r.vetoed or []) for r in attacked) / len(
                        attacked
                    )
                    entry[mode]["every_hospital_serves_the_same_model"] = all(
                        r.served_everywhere_alike for r in attacked
                    )
            figures["attacks"][attack] = entry
        result["strategies"][run.label] = figures
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def quick_config() -> PoisoningConfig:
    """A few rounds of one seed (`--quick`): the bench's test."""
    return PoisoningConfig(rounds=4, seeds=(SPLIT_SEED,), attack_from=2)
