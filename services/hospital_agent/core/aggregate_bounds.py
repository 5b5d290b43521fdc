"""What a decrypted aggregate may be, before any hospital publishes a model from it.

Every hospital holds the secret key, so a hostile one can encrypt any value or weight, bypassing
its own encryptor's checks. The aggregator cannot look inside; each agent checks the decrypted
sum against the codec's bounds instead. The check is deterministic, so every honest hospital
rejects the same rounds and they all keep the same global model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.errors import DomainError
from fibemrss.he.chunk_format import unpack_header
from fibemrss.he.errors import HeError
from fibemrss.he.params import HeParams


class AggregateRejected(DomainError):
    """A closed round's aggregate lies outside the codec's bounds; no hospital applies it."""


@dataclass(frozen=True)
class AggregateBounds:
    max_weight: int  # one hospital's weight (its example count) at most
    max_abs_value: float  # one value of one hospital's update at most, in magnitude

    @classmethod
    def of(cls, params: HeParams) -> AggregateBounds:
        return cls(max_weight=params.max_weight, max_abs_value=params.max_abs_value)


def contributors(chunks: Sequence[bytes]) -> int:
    """How many hospitals were summed into an aggregate, as its chunk headers say."""
    try:
        return unpack_header(chunks[0]).parties if chunks else 0
    except HeError as exc:
        raise AggregateRejected(f"the aggregate's header is unreadable: {exc}") from None


def check_aggregate(average: np.ndarray, total_weight: int, parties: int, bounds: AggregateBounds) -> None:
    """Raises AggregateRejected with the reason when the weighted average of `parties` honest
    updates could not be this one."""
    if parties < 1:
        raise AggregateRejected("the aggregate sums no hospital")
    if not parties <= total_weight <= parties * bounds.max_weight:
        raise AggregateRejected(
            f"total weight {total_weight} lies outside 1..{bounds.max_weight} per hospital for {parties} hospitals"
        )
    magnitudes = np.abs(np.asarray(average, dtype=np.float64))
    bad = ~(magnitudes <= bounds.max_abs_value)  # NaN compares false: caught too
    if bad.any():
        index = int(np.argmax(bad))
        raise AggregateRejected(
            f"value {index} of the average lies beyond the codec's bound {bounds.max_abs_value:g} or is not finite"
        )


def check_model(params: np.ndarray) -> None:
    if not np.isfinite(params).all():
        raise AggregateRejected("the global model after this aggregate is not finite")
