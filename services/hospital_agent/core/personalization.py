"""Personalized local models: fine-tune the global model on the hospital's own rows, then choose
by validation which of the two to serve (no gRPC, no database).

The choice reads only the validation rows, a share of the training rows held back from
fine-tuning; the test rows are never looked at, so the test accuracy the agent reports for either
model is an honest estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fibemrss.domain.feature_encoding import GlobalStats
from fibemrss.domain.model_params import accuracy_of_logits
from fibemrss.domain.task_spec import HyperParameters, PersonalizationSpec, TaskSpec
from fibemrss.domain.torch_models import logits_function
from services.hospital_agent.core.local_data import Example, LocalData
from services.hospital_agent.core.training import train_local

Choice = Literal["global", "personalized"]
# Fine-tuning is seeded, so a restarted agent publishes the same personalized model.
FINE_TUNE_SEED = 1_000_003


@dataclass(frozen=True)
class ValidationScore:
    accuracy: float
    log_loss: float
    examples: int


@dataclass(frozen=True)
class Personalized:
    params: np.ndarray
    global_score: ValidationScore
    personalized_score: ValidationScore
    fit_examples: int

    @property
    def chosen(self) -> Choice:
        return choose(self.global_score, self.personalized_score)


def choose(global_score: ValidationScore, personalized_score: ValidationScore) -> Choice:
    """The personalized model only when it is better on validation (lower log-loss; accuracy
    moves in steps too coarse on a few dozen rows); a tie keeps the federation's model."""
    return "personalized" if personalized_score.log_loss < global_score.log_loss else "global"


def score(task: TaskSpec, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> ValidationScore:
    logits = logits_function(task.model, x.shape[1], params)(x).reshape(-1)
    # Mean binary cross-entropy from logits, stable for large |logit|.
    losses = np.logaddexp(0.0, logits) - y.astype(np.float64) * logits
    acc = accuracy_of_logits(logits, y, task.threshold)
    return ValidationScore(acc.value, float(losses.mean()), acc.total)


def fine_tune(
    task: TaskSpec,
    spec: PersonalizationSpec,
    global_params: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    seed: int = FINE_TUNE_SEED,
) -> np.ndarray:
    hyper = HyperParameters(
        learning_rate=spec.learning_rate,
        local_epochs=spec.local_epochs,
        batch_size=task.hyper.batch_size,
    )
    return train_local(task.model, global_params, x, y, hyper, seed=seed)


def personalize(
    task: TaskSpec,
    spec: PersonalizationSpec,
    stats: GlobalStats,
    global_params: np.ndarray,
    data: LocalData,
) -> Personalized | None:
    """Fine-tunes on the training rows outside validation and scores both models on validation;
    None when either share is empty (too few rows to fine-tune or to choose)."""
    fit, validation = data.fit_and_validation(task, spec.validation_fraction)
    if not fit or not validation:
        return None
    return personalize_rows(task, spec, stats, global_params, fit, validation)


def personalize_rows(
    task: TaskSpec,
    spec: PersonalizationSpec,
    stats: GlobalStats,
    global_params: np.ndarray,
    fit: tuple[Example, ...],
    validation: tuple[Example, ...],
) -> Personalized:
    x_fit, y_fit = LocalData.matrix(task, stats, fit)
    x_val, y_val = LocalData.matrix(task, stats, validation)
    return personalize_arrays(task, spec, global_params, (x_fit, y_fit), (x_val, y_val))


def personalize_arrays(
    task: TaskSpec,
    spec: PersonalizationSpec,
    global_params: np.ndarray,
    fit: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    seed: int = FINE_TUNE_SEED,
    refit: bool = True,
) -> Personalized:
    """Fine-tune on `fit`, score both models on `validation`. When the personalized model wins
    (and `refit`), it is fine-tuned again from the global model with the same settings on fit and
    validation rows together (every training row, as the global model had), and that one is
    served; the scores stay those of the validated fit-only model."""
    params = fine_tune(task, spec, global_params, fit[0], fit[1], seed)
    global_score = score(task, global_params, *validation)
    personalized_score = score(task, params, *validation)
    if refit and choose(global_score, personalized_score) == "personalized":
        x_all = np.concatenate([fit[0], validation[0]])
        y_all = np.concatenate([fit[1], validation[1]])
        params = fine_tune(task, spec, global_params, x_all, y_all, seed)
    return Personalized(params, global_score, personalized_score, len(fit[1]))
