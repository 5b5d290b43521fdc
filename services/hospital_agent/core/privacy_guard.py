"""The agent's privacy budget check (against a ledger port: no database here).

Before each round the agent works out what the round spends on its dataset (the noised dataset
size once per federation; a DP-SGD training round, or an unbounded spend without DP), adds it to
what the ledger holds, refuses the round if the hospital's budget for the dataset would be
exceeded, and otherwise records the spend before any noised value exists. The ledger and budget
live in the hospital's own database, so a refusal survives restarts and nothing central overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from fibemrss.domain.errors import FailedPrecondition
from fibemrss.domain.privacy import KIND_DATASET_SIZE, KIND_DP_SGD, Budget, PrivacySpend, total
from fibemrss.domain.privacy_accounting import epsilon_after_rounds
from fibemrss.domain.task_spec import TaskSpec


class LedgerPort(Protocol):
    def budget(self, dataset: str) -> Budget | None: ...

    def latest(self, dataset: str) -> list[PrivacySpend]: ...

    def record(self, spend: PrivacySpend, actor: str) -> None: ...


class BudgetExceeded(FailedPrecondition):
    """The round would take the dataset beyond the hospital's privacy budget."""


@dataclass(frozen=True)
class RoundSpend:
    epsilon: float  # this federation's DP-SGD spend after the round (inf without DP, 0 before training)
    delta: float


class PrivacyGuard:
    def __init__(self, hospital: str, task: TaskSpec, dataset: str, ledger: LedgerPort) -> None:
        self._actor = f"agent@{hospital}"
        self._task = task
        self._dataset = dataset
        self._ledger = ledger

    def federation_spend(self, federation_id: bytes) -> RoundSpend:
        for spend in self._ledger.latest(self._dataset):
            if spend.federation_id == federation_id and spend.kind == KIND_DP_SGD:
                return RoundSpend(spend.epsilon, spend.delta)
        return RoundSpend(0.0, 0.0)

    def before_round(self, federation_id: bytes, round_number: int) -> RoundSpend:
        """Records this round's spend, or raises BudgetExceeded naming the figures."""
        latest = self._ledger.latest(self._dataset)
        mine = {s.kind: s for s in latest if s.federation_id == federation_id}
        new: list[PrivacySpend] = []
        if self._task.weighting == "noised" and KIND_DATASET_SIZE not in mine:
            new.append(
                self._spend(
                    federation_id, KIND_DATASET_SIZE, round_number, 1, 1 / self._task.weight_noise_scale, 0.0
                )
            )
        if round_number >= 1:
            rounds = mine[KIND_DP_SGD].rounds + 1 if KIND_DP_SGD in mine else 1
            dp = self._task.dp
            if dp is None:
                new.append(self._spend(federation_id, KIND_DP_SGD, round_number, rounds, math.inf, 0.0))
            else:
                eps = epsilon_after_rounds(self._task, dp, rounds)
                new.append(
                    self._spend(federation_id, KIND_DP_SGD, round_number, rounds, eps, dp.target_delta)
                )
        projected = {(s.federation_id, s.kind): s for s in latest}
        projected.update({(s.federation_id, s.kind): s for s in new})
        epsilon, delta = total(projected.values())
        budget = self._ledger.budget(self._dataset)
        if budget is not None and (epsilon > budget.epsilon or delta > budget.delta):
            spent_eps, spent_delta = total(latest)
            raise BudgetExceeded(
                f"round {round_number} of {self._task.name} would spend dataset {self._dataset!r} to "
                f"epsilon {epsilon:.4g}, delta {delta:.3g}, beyond its budget of epsilon "
                f"{budget.epsilon:g}, delta {budget.delta:g} (spent so far: epsilon {spent_eps:.4g}, "
                f"delta {spent_delta:.3g}); refusing the round"
            )
        for spend in new:
            self._ledger.record(spend, self._actor)
        dp_spend = next((s for s in new if s.kind == KIND_DP_SGD), mine.get(KIND_DP_SGD))
        return RoundSpend(dp_spend.epsilon, dp_spend.delta) if dp_spend else RoundSpend(0.0, 0.0)

    def _spend(
        self, federation_id: bytes, kind: str, round_number: int, rounds: int, epsilon: float, delta: float
    ) -> PrivacySpend:
        return PrivacySpend(
            self._dataset, self._task.name, federation_id, kind, round_number, rounds, epsilon, delta
        )
