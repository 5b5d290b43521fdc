"""The hospital's examples for a task, split into a fixed, seeded train and test set (pure)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.feature_encoding import GlobalStats, encode
from fibemrss.domain.feature_extraction import FeatureValue
from fibemrss.domain.task_spec import TaskSpec


@dataclass(frozen=True)
class Example:
    patient_key: str
    values: tuple[FeatureValue, ...]
    label: float


def is_test(task: TaskSpec, patient_key: str) -> bool:
    """Deterministic in the key alone, so a restart or a re-ingest never moves a patient."""
    digest = hashlib.sha256(f"{task.split_seed}|{patient_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < task.test_fraction


def is_validation(task: TaskSpec, patient_key: str, fraction: float) -> bool:
    """A training patient held back from fine-tuning to choose between the global and the
    personalized model (a hash independent of the test split's)."""
    digest = hashlib.sha256(f"{task.split_seed}|validation|{patient_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class LocalData:
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    @classmethod
    def split(cls, task: TaskSpec, examples: Sequence[Example]) -> LocalData:
        ordered = sorted(examples, key=lambda e: e.patient_key)
        return cls(
            tuple(e for e in ordered if not is_test(task, e.patient_key)),
            tuple(e for e in ordered if is_test(task, e.patient_key)),
        )

    def fit_and_validation(
        self, task: TaskSpec, fraction: float
    ) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
        """The training rows split for personalization: (fine-tuning rows, validation rows)."""
        return (
            tuple(e for e in self.train if not is_validation(task, e.patient_key, fraction)),
            tuple(e for e in self.train if is_validation(task, e.patient_key, fraction)),
        )

    @staticmethod
    def matrix(
        task: TaskSpec, stats: GlobalStats, examples: Sequence[Example]
    ) -> tuple[np.ndarray, np.ndarray]:
        x = encode(task, stats, [e.values for e in examples])
        y = np.array([e.label for e in examples], dtype=np.float32)
        return x, y
