"""Privacy spends and budgets of a hospital's datasets (pure types and composition rules).

Within one federation the spends of one kind compose tightly (the accountant's epsilon after r
rounds is recorded cumulatively); across federations and kinds they add up (basic composition):
a dataset's total is the sum of each (federation, kind)'s latest cumulative epsilon and delta.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

KIND_DP_SGD = "dp-sgd"
KIND_DATASET_SIZE = "dataset-size"


@dataclass(frozen=True)
class PrivacySpend:
    dataset: str
    task: str
    federation_id: bytes
    kind: str
    round: int
    rounds: int  # cumulative within the federation and kind
    epsilon: float  # cumulative within the federation and kind (inf: trained without DP)
    delta: float


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float


def total(spends: Iterable[PrivacySpend]) -> tuple[float, float]:
    """(epsilon, delta) of the latest spend of each (federation, kind), by basic composition."""
    epsilon = delta = 0.0
    for spend in spends:
        epsilon += spend.epsilon
        delta += spend.delta
    return epsilon, delta
