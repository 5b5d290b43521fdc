"""Pairwise additive masks that cancel in the sum of a round (pure: no I/O, no transport).

Each hospital i of a round's cohort holds an X25519 key pair for the round. With every other
member j it agrees on a secret (X25519), derives a 32-byte seed from it with HKDF-SHA256 bound to
the federation, round, attempt and the pair's names, and expands the seed with AES-256-CTR into a
vector m_ij uniform modulo the plaintext modulus t. Hospital i adds +m_ij when i < j and -m_ij
when i > j to its encoded slots before encryption, so the masks cancel exactly in the sum of the
whole cohort and in no smaller sum: an upload, or a sum missing any member, decrypts to values
uniform modulo t. See docs/he-codec.md ("Pairwise masking") for what each party learns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fibemrss.he.errors import HeKeyError

PUBLIC_KEY_BYTES = 32
_SEED_BYTES = 32
# Masks are drawn from 64-bit words below the largest multiple of the modulus that fits: a plain
# modulus below 2^60 rejects fewer than 1 word in 16 (the default, ~2^52, 1 in 4,096).
_MAX_MODULUS = 2**60


@dataclass(frozen=True)
class MaskContext:
    """What a pairwise seed is bound to, so no two rounds, attempts or federations share a mask."""

    federation_id: bytes
    task: str
    round: int
    attempt: int

    def info(self, low: str, high: str) -> bytes:
        parts = [b"fibemrss-mask-v1", self.federation_id, self.task.encode(), low.encode(), high.encode()]
        digest = hashlib.sha256()
        for part in parts:
            digest.update(len(part).to_bytes(4, "little") + part)
        digest.update(self.round.to_bytes(8, "little", signed=True))
        digest.update(self.attempt.to_bytes(4, "little"))
        return digest.digest()


class MaskKeyPair:
    """One hospital's X25519 key pair for one round, derived from a 32-byte secret seed so a
    restarted agent recovers the same pair (see `round_key_seed`)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise HeKeyError("a mask key seed must be 32 bytes")
        self._private = X25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def shared_secret(self, peer_public_key: bytes) -> bytes:
        if len(peer_public_key) != PUBLIC_KEY_BYTES:
            raise HeKeyError(f"a mask public key must be {PUBLIC_KEY_BYTES} bytes")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
        except ValueError as error:  # an all-zero shared secret: a low-order point, never honest
            raise HeKeyError(f"invalid mask public key: {error}") from error


def round_key_seed(local_secret: bytes, context: MaskContext) -> bytes:
    """The seed of a hospital's key pair for (federation, task, round): one per round, the same
    across attempts and restarts. `local_secret` never leaves the hospital."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=context.federation_id,
        info=b"fibemrss-mask-key-v1|" + context.task.encode() + b"|" + str(context.round).encode(),
    ).derive(local_secret)


def expand_mask(seed: bytes, n_slots: int, modulus: int) -> np.ndarray:
    """n_slots integers uniform in [0, modulus), from AES-256-CTR keyed by seed (64-bit words
    below the largest multiple of the modulus under 2^64, reduced modulo it: rejection sampling,
    so no value is more likely than another)."""
    if modulus >= _MAX_MODULUS or modulus < 2:
        raise ValueError("expand_mask needs a plain modulus below 2^60")
    limit = np.uint64((2**64 // modulus) * modulus)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    out = np.empty(n_slots, dtype=np.int64)
    filled = 0
    while filled < n_slots:
        want = n_slots - filled
        words = np.frombuffer(encryptor.update(bytes(8 * want)), dtype="<u8")
        if (words >= limit).any():  # rare (above): redraw those from the stream
            words = words[words < limit]
        out[filled : filled + words.size] = (words % np.uint64(modulus)).astype(np.int64)
        filled += words.size
    return out


def pairwise_seed(
    own: MaskKeyPair, own_name: str, peer_name: str, peer_key: bytes, context: MaskContext
) -> bytes:
    low, high = sorted((own_name, peer_name))
    return HKDF(
        algorithm=hashes.SHA256(), length=_SEED_BYTES, salt=None, info=context.info(low, high)
    ).derive(own.shared_secret(peer_key))


def cohort_mask(
    own: MaskKeyPair,
    own_name: str,
    cohort_keys: Mapping[str, bytes],
    context: MaskContext,
    n_slots: int,
    modulus: int,
) -> np.ndarray:
    """sum_j sign(i, j) m_ij mod modulus over every other member j of the cohort (own_name's
    entry in cohort_keys must be its own public key). Summed over the whole cohort it is 0."""
    if cohort_keys.get(own_name) != own.public_key:
        raise HeKeyError(f"the cohort's key for {own_name!r} is not this hospital's key for the round")
    total = np.zeros(n_slots, dtype=np.int64)
    for peer, key in sorted(cohort_keys.items()):
        if peer == own_name:
            continue
        mask = expand_mask(pairwise_seed(own, own_name, peer, key, context), n_slots, modulus)
        if own_name < peer:
            total += mask
        else:
            total -= mask
        # total stays in (-modulus, 2 modulus): fold it back into [0, modulus) without a division
        np.subtract(total, modulus, out=total, where=total >= modulus)
        np.add(total, modulus, out=total, where=total < 0)
    return total


def apply_mask(slots: np.ndarray, mask: np.ndarray, modulus: int) -> np.ndarray:
    """(slots + mask) mod modulus, in the centered range (-modulus/2, modulus/2] SEAL encodes.

    Encoded slots lie in (-modulus/2, modulus/2] (the codec's bounds keep them far inside) and the
    mask in [0, modulus), so one conditional subtraction folds the sum back: no division."""
    if mask.shape != slots.shape:
        raise ValueError(f"mask covers {mask.size} slots, the vector {slots.size}")
    masked = slots.astype(np.int64) + mask
    np.subtract(masked, modulus, out=masked, where=masked > modulus // 2)
    return masked


def remove_mask(slots: np.ndarray, mask: np.ndarray, modulus: int) -> np.ndarray:
    """(slots - mask) mod modulus in the centered range over the mask's first slots (the rest,
    padding, unchanged): the inverse of `apply_mask` on decrypted slots (secure aggregation
    subtracts the masks its protocol says remain in a sum)."""
    n = mask.size
    if n > slots.size:
        raise ValueError(f"mask covers {n} slots, the vector {slots.size}")
    out = slots.astype(np.int64)
    head = out[:n] - mask % modulus
    np.add(head, modulus, out=head, where=head <= -((modulus + 1) // 2))
    np.subtract(head, modulus, out=head, where=head > modulus // 2)
    out[:n] = head
    return out
