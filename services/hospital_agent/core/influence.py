"""Bounded influence and the validation gate: what one hostile hospital can do to the model every
hospital serves (pure; docs/security.md, "Poisoning").

Every hospital holds the HE secret key, so a hostile one can encrypt any weight and any values
the codec admits; its upload is masked, so nobody can look at it alone. What the others can check
is the decrypted sum, and what they serve:

- `clip_update`: an honest hospital clips its own update (the change from the global model it
  trained from) to the study's `privacy.max_update_norm`, and caps its weight at
  `privacy.max_weight`.
- `check_influence`: every hospital refuses a round whose total weight exceeds contributors x
  `max_weight`, or whose average lies farther than `max_update_norm` from the global model the
  round trained from. The average of clipped honest updates never does (a convex combination of
  points in the ball stays in it); a hostile upload may still move the model anywhere inside that
  ball. Deterministic, so every hospital refuses the same rounds and keeps the same global model.
- `gate`: a hospital serves a new model only when, on the hospital's own validation rows, it is
  not worse than the best model it has served (the initial model's figures before any): accuracy
  more than `federation.validation_tolerance` below and a higher log-loss (so no worse than its
  predecessor, and no slow drift down either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.task_spec import TaskSpec
from services.hospital_agent.core.aggregate_bounds import AggregateRejected
from services.hospital_agent.core.personalization import ValidationScore


def clip_update(base: np.ndarray, params: np.ndarray, max_norm: float | None) -> tuple[np.ndarray, float]:
    """(params moved back onto the ball of radius `max_norm` around `base`, the update's norm
    before clipping); unchanged without a bound or inside it."""
    delta = np.asarray(params, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    norm = float(np.linalg.norm(delta))
    if max_norm is None or norm <= max_norm:
        return np.asarray(params, dtype=np.float64), norm
    return np.asarray(base, dtype=np.float64) + delta * (max_norm / norm), norm


def codec_slack(n_values: int, frac_bits: int, parties: int = 1, total_weight: int = 1) -> float:
    """How far fixed-point rounding may move an average of clipped updates: each of `parties`
    rounds w*v*2^frac_bits once (1/2), divided by 2^frac_bits x the total weight, per value,
    doubled (HeParams.average_error)."""
    return math.sqrt(n_values) * 2.0**-frac_bits * parties / max(total_weight, 1)


def check_influence(
    task: TaskSpec,
    base: np.ndarray,
    average: np.ndarray,
    total_weight: int,
    parties: int,
    frac_bits: int,
) -> None:
    """Raises AggregateRejected when the round's average could not come from `parties` hospitals
    within the study's bounds: a total weight above parties x max_weight, or a move from `base`
    (the global model the round trained from) beyond max_update_norm."""
    if task.max_weight is not None and total_weight > parties * task.max_weight:
        raise AggregateRejected(
            f"total weight {total_weight} exceeds the study's {task.max_weight} per hospital for {parties} hospitals"
        )
    if task.max_update_norm is not None:
        move = float(
            np.linalg.norm(np.asarray(average, dtype=np.float64) - np.asarray(base, dtype=np.float64))
        )
        allowed = task.max_update_norm + codec_slack(len(base), frac_bits, parties, total_weight)
        if not move <= allowed:
            raise AggregateRejected(
                f"the average moves the global model by {move:.4g}, beyond the study's update norm "
                f"{task.max_update_norm:g}"
            )


@dataclass(frozen=True)
class Best:
    """The best figures of any model a hospital has served, on its validation rows."""

    accuracy: float
    log_loss: float

    def with_(self, score: ValidationScore) -> Best:
        return Best(max(self.accuracy, score.accuracy), min(self.log_loss, score.log_loss))


@dataclass(frozen=True)
class Verdict:
    accept: bool
    candidate: ValidationScore
    best: Best
    tolerance: float

    def describe(self) -> str:
        return (
            f"validation accuracy {self.candidate.accuracy:.4f} against {self.best.accuracy:.4f}, log-loss "
            f"{self.candidate.log_loss:.4f} against {self.best.log_loss:.4f}, the best served, on "
            f"{self.candidate.examples} validation rows (tolerance {self.tolerance:g})"
        )


def gate(candidate: ValidationScore, best: Best, tolerance: float) -> Verdict:
    """Refuse the candidate when it is worse than the best model served on both counts: its
    accuracy more than `tolerance` below the best accuracy, and its log-loss above the lowest.
    Accuracy on a few dozen rows moves in steps of one row (an honest round dips by two or three
    rows now and then while its log-loss still falls); a poisoned model loses both."""
    worse = candidate.accuracy < best.accuracy - tolerance - 1e-12 and candidate.log_loss > best.log_loss
    return Verdict(not worse, candidate, best, tolerance)
