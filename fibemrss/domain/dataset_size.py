"""The weight a hospital gives its updates, so that no one can compute its patient count (pure).

A round's sum reveals the total weight to every hospital, and rounds (or federations) with and
without a hospital would give its weight by subtraction. So the weight is not the example count
but a value drawn once per federation and then fixed: the count plus discrete Laplace noise of
scale b, rounded to a multiple of `quantum`. Fixed means differencing any number of rounds of
one federation yields that same single draw, never a fresh one to average away; the draw is a
(1/b)-differentially-private release of the count with respect to one patient (rounding is
post-processing), and each new federation spends 1/b again (docs/he-codec.md, "Dataset sizes").
The noise comes from HMAC-SHA256 of a secret that never leaves the hospital, so a restarted agent
draws the same value.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Literal

Weighting = Literal["examples", "noised"]


def _uniform(key: bytes, label: bytes) -> float:
    """A uniform number in (0, 1) from HMAC-SHA256(key, label), 53 bits."""
    word = int.from_bytes(hmac.new(key, label, hashlib.sha256).digest()[:8], "big") >> 11
    return (word + 0.5) / 2**53


def discrete_laplace(key: bytes, scale: float) -> int:
    """An integer with P(k) proportional to exp(-|k| / scale), drawn from the key (the
    difference of two geometric variables, by inversion)."""
    if scale <= 0:
        return 0
    log_p = -1.0 / scale  # log of the geometric's ratio exp(-1/scale)
    g1 = math.floor(math.log(_uniform(key, b"g1")) / log_p)
    g2 = math.floor(math.log(_uniform(key, b"g2")) / log_p)
    return g1 - g2


def federation_weight(
    examples: int,
    secret: bytes,
    federation_id: bytes,
    task: str,
    weighting: Weighting,
    scale: float,
    quantum: int,
    max_weight: int,
) -> int:
    """The weight of this hospital's updates in one federation: `examples` itself, or the noised
    and quantized count fixed for the federation (at least `quantum`, at most `max_weight`)."""
    if weighting == "examples":
        return max(1, min(examples, max_weight))
    key = hmac.new(
        secret, b"dataset-size-v1|" + federation_id + b"|" + task.encode(), hashlib.sha256
    ).digest()
    noisy = examples + discrete_laplace(key, scale)
    quantized = quantum * round(noisy / quantum)
    return max(quantum, min(quantized, max_weight))
