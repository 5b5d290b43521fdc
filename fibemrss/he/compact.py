"""An upload's ciphertexts in fewer bytes: c0 without its lowest bits, tightly bit-packed, c1 as its seed.

SEAL serializes a fresh symmetric ciphertext as (c0, the 64-byte seed that regenerates c1), c0 as one
64-bit word per coefficient and data prime, zstd-compressed. Here c0 (recombined from its residues
modulo the data primes into one integer below q) is rounded down to a multiple of 2^d and sent as
floor(c0 / 2^d) in exactly bits(q >> d) bits; the receiver puts back z * 2^d + 2^(d-1), which differs
from c0 by at most 2^(d-1): an additive error on the decryption noise, never multiplied by the secret
key (docs/he-codec.md, "Noise and overflow argument"). What is sent is a function of the ciphertext,
so it reveals nothing the ciphertext did not (the security argument is unchanged).

The rest of SEAL's serialization (its header, the ciphertext's metadata, the seed) is kept verbatim
and put back around the restored c0, in SEAL's uncompressed form, which SEAL loads and checks itself.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from fibemrss.he.errors import HeFormatError

_SEAL_MAGIC = b"\x5e\xa1"
_SEAL_HEADER = struct.Struct("<2sBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_COMPR_NONE = 0
_COMPR_ZSTD = 2
_LOW32 = np.uint64(0xFFFFFFFF)
# A seeded ciphertext at our sizes decompresses to ~100 KB; anything far larger is not ours.
_MAX_RAW_BYTES = 1 << 22


@dataclass(frozen=True)
class SeededParts:
    """One fresh seeded ciphertext cut in three: what precedes c0 (SEAL's header and the metadata),
    c0's residues (data primes x N, as uint64), and what follows c0 (the seed)."""

    prefix: bytes
    c0: np.ndarray
    tail: bytes


class RnsCompressor:
    """c0 <-> its upload form, for one context's data primes and number of dropped bits."""

    def __init__(self, primes: Sequence[int], n: int, dropped_bits: int) -> None:
        self.primes = [int(p) for p in primes]
        self.n = n
        self.dropped_bits = dropped_bits
        q = 1
        for p in self.primes:
            q *= p
        self.bits = ((q - 1) >> dropped_bits).bit_length()
        if self.bits > 63:
            raise ValueError("an uploaded coefficient must fit 63 bits")
        self.coefficient_bytes = n * self.bits // 8
        # Garner's mixed-radix constants: radix_mod[i][j] = (p_0 ... p_{j-1}) mod p_i, inverse[i] =
        # (p_0 ... p_{i-1})^-1 mod p_i.
        self._radix_mod = [[_prod(self.primes[:j]) % p for j in range(i)] for i, p in enumerate(self.primes)]
        self._inverse = [pow(_prod(self.primes[:i]) % p, -1, p) for i, p in enumerate(self.primes)]
        self._scale = [np.uint64(pow(2, dropped_bits, p)) for p in self.primes]
        self._half = [np.uint64((1 << dropped_bits >> 1) % p) for p in self.primes]

    def compress(self, c0: np.ndarray) -> np.ndarray:
        """floor(c0 / 2^d) per coefficient, c0 given as residues of shape (..., primes, N)."""
        residues = [c0[..., i, :].astype(np.uint64) for i in range(len(self.primes))]
        d = np.uint64(self.dropped_bits)
        if len(self.primes) == 1:
            return residues[0] >> d
        # Garner: c0 = h_0 + p_0 h_1 + p_0 p_1 h_2 + ... with 0 <= h_i < p_i (every product < 2^62).
        digits: list[np.ndarray] = []
        for i, p in enumerate(self.primes):
            prime = np.uint64(p)
            if i == 0:
                digits.append(residues[0] % prime)
                continue
            known = np.zeros_like(residues[i])
            for j in range(i):
                known = (known + digits[j] % prime * np.uint64(self._radix_mod[i][j])) % prime
            difference = (residues[i] + prime - known) % prime
            digits.append(difference * np.uint64(self._inverse[i]) % prime)
        # Horner from the top digit in two limbs (high, low 32 bits): the value stays below q < 2^96.
        high = np.zeros_like(digits[-1])
        low = digits[-1].copy()
        for j in range(len(self.primes) - 2, -1, -1):
            prime = np.uint64(self.primes[j])
            low = low * prime + digits[j]
            high = high * prime + (low >> np.uint64(32))
            low &= _LOW32
        return (high << np.uint64(32 - self.dropped_bits)) | (low >> d)

    def restore(self, z: np.ndarray) -> np.ndarray:
        """Residues (..., primes, N) of z * 2^d + 2^(d-1), the rounded c0 (within 2^(d-1) of it)."""
        out = np.empty(z.shape[:-1] + (len(self.primes), self.n), dtype=np.uint64)
        for i, p in enumerate(self.primes):
            prime = np.uint64(p)
            if len(self.primes) == 1:
                out[..., i, :] = ((z << np.uint64(self.dropped_bits)) + self._half[i]) % prime
            else:
                out[..., i, :] = (z % prime * self._scale[i] + self._half[i]) % prime
        return out

    def pack(self, z: np.ndarray) -> bytes:
        """Each coefficient in exactly `bits` bits, little-endian, end to end."""
        bits = np.unpackbits(z.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        return np.packbits(bits[:, : self.bits], bitorder="little").tobytes()

    def unpack(self, data: bytes, count: int) -> np.ndarray:
        if len(data) != count * self.coefficient_bytes:
            raise HeFormatError("compact ciphertext has the wrong length")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").reshape(-1, self.bits)
        words = np.zeros((bits.shape[0], 64), dtype=np.uint8)
        words[:, : self.bits] = bits
        return (
            np.packbits(words, axis=1, bitorder="little").view("<u8").reshape(count, self.n).astype(np.uint64)
        )


def split_seeded(blob: bytes, n_primes: int, n: int) -> SeededParts:
    """Cut SEAL's serialization of a fresh seeded ciphertext (zstd or uncompressed) around c0."""
    try:
        magic, header_size, _, _, mode, _, size = _SEAL_HEADER.unpack_from(blob, 0)
    except struct.error as error:
        raise HeFormatError("not a SEAL ciphertext") from error
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or size != len(blob):
        raise HeFormatError("not a SEAL ciphertext")
    body = blob[_SEAL_HEADER.size :]
    if mode == _COMPR_ZSTD:
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    elif mode != _COMPR_NONE:
        raise HeFormatError(f"SEAL compression mode {mode} is not expected")
    words = n_primes * n
    # c0 is SEAL's DynArray: its own 16-byte header (size = 16 + 8 + 8 words), a u64 count, the words.
    array_size = struct.pack("<Q", _SEAL_HEADER.size + 8 + 8 * words)
    count = struct.pack("<Q", words)
    start = body.find(_SEAL_MAGIC)
    while start >= 0 and body[start + 8 : start + 16] + body[start + 16 : start + 24] != array_size + count:
        start = body.find(_SEAL_MAGIC, start + 1)
    if start < 0:
        raise HeFormatError("SEAL ciphertext does not hold one polynomial and a seed")
    c0_at = start + 24
    c0 = np.frombuffer(body, dtype="<u8", count=words, offset=c0_at).reshape(n_primes, n)
    # The same for every ciphertext of a context: uncompressed, its size filled in by join_seeded.
    _, _, major, minor, _, reserved, _ = _SEAL_HEADER.unpack_from(blob, 0)
    header = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, major, minor, _COMPR_NONE, reserved, 0)
    return SeededParts(header + body[:c0_at], c0, body[c0_at + 8 * words :])


def join_seeded(prefix: bytes, c0: np.ndarray, tail: bytes) -> bytes:
    """SEAL's uncompressed serialization of the seeded ciphertext whose parts are given."""
    if len(prefix) < _SEAL_HEADER.size or len(prefix) + len(tail) > _MAX_RAW_BYTES:
        raise HeFormatError("compact ciphertext has a malformed template")
    body = prefix[_SEAL_HEADER.size :] + c0.astype("<u8").tobytes() + tail
    magic, header_size, major, minor, _, reserved, _ = _SEAL_HEADER.unpack_from(prefix, 0)
    header = _SEAL_HEADER.pack(
        magic, header_size, major, minor, _COMPR_NONE, reserved, _SEAL_HEADER.size + len(body)
    )
    return header + body


def _prod(values: Sequence[int]) -> int:
    out = 1
    for value in values:
        out *= value
    return out
