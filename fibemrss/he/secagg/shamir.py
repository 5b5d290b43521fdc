"""t-of-n Shamir secret sharing of 32-byte secrets over the Mersenne prime field 2^521 - 1.

A secret (a self-mask seed or an X25519 private key) is the constant term of a random polynomial
of degree t - 1; holder x (1, 2, ... in the cohort's order) gets its value at x. Any t shares give
the secret back by Lagrange interpolation at 0; fewer than t reveal nothing about it (every
secret is equally likely given t - 1 shares). Coefficients come from the OS's randomness.
Pure: no I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
SHARE_BYTES = 66  # 521 bits
SECRET_BYTES = 32


class ShareError(ValueError):
    """Shares that cannot give a secret back (too few, repeated or malformed)."""


@dataclass(frozen=True)
class Share:
    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.y.to_bytes(SHARE_BYTES, "big")

    @staticmethod
    def from_bytes(data: bytes) -> Share:
        if len(data) != 4 + SHARE_BYTES:
            raise ShareError(f"a share is {4 + SHARE_BYTES} bytes, got {len(data)}")
        x, y = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
        if not 1 <= x < PRIME or y >= PRIME:
            raise ShareError("a share lies outside the field")
        return Share(x, y)


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, Share]:
    """One share of `secret` per holder x (distinct, >= 1); any `threshold` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"a shared secret is {SECRET_BYTES} bytes")
    if len(set(holders)) != len(holders) or any(x < 1 for x in holders):
        raise ShareError("holders must be distinct positive numbers")
    if not 1 <= threshold <= len(holders):
        raise ShareError(f"threshold {threshold} must lie between 1 and the {len(holders)} holders")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = Share(x, y)
    return shares


def combine(shares: Iterable[Share]) -> bytes:
    """The secret from shares of one polynomial (all of them are used: give exactly t, or more
    consistent ones). Lagrange interpolation at 0."""
    points = list(shares)
    if not points:
        raise ShareError("no share given")
    xs = [p.x for p in points]
    if len(set(xs)) != len(xs):
        raise ShareError("two shares of the same holder")
    secret = 0
    for i, p in enumerate(points):
        numerator, denominator = 1, 1
        for j, q in enumerate(points):
            if i != j:
                numerator = numerator * (-q.x) % PRIME
                denominator = denominator * (p.x - q.x) % PRIME
        secret = (secret + p.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShareError("the shares do not belong to one 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
