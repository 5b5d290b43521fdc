"""Wire format of one ciphertext chunk: a small clear header, then length-prefixed SEAL ciphertexts.

The header is visible to the aggregator on purpose: it says which slots the chunk covers, how many
parties have been summed into it and under which key ceremony, so mismatched chunks are refused
instead of silently added. It carries no parameter value and no dataset size.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

from fibemrss.he.errors import HeFormatError

CHUNK_MAGIC = b"FHEC"
CHUNK_FORMAT_VERSION = 1
# magic, version, kind, frac_bits, seeded, parties, key_id, n_values, chunk_index, chunk_count, n_ciphertexts
_HEADER = struct.Struct("<4sBBBBH8sQIIH")
_U32 = struct.Struct("<I")
# A SEAL ciphertext at N = 4096 with one 60-bit prime is at most 64 KiB plus SEAL's header; anything
# far larger is not ours and is refused before SEAL allocates for it.
MAX_CIPHERTEXT_BYTES = 1 << 20


class ChunkKind(enum.IntEnum):
    WEIGHTED_UPDATE = 1  # slot 0 holds the weight, then round(w * v * 2^frac_bits)
    SUMS = 2  # round(v * 2^frac_bits), no weight slot


@dataclass(frozen=True)
class ChunkHeader:
    kind: ChunkKind
    frac_bits: int
    seeded: bool  # fresh symmetric ciphertexts store a PRNG seed instead of their second polynomial
    parties: int  # how many parties' contributions this chunk sums
    key_id: bytes
    n_values: int
    chunk_index: int
    chunk_count: int
    n_ciphertexts: int

    def stream(self) -> tuple[ChunkKind, int, bytes, int, int]:
        """Fields shared by every chunk of one encrypted vector."""
        return (self.kind, self.frac_bits, self.key_id, self.n_values, self.chunk_count)

    def layout(self) -> tuple[tuple[ChunkKind, int, bytes, int, int], int, int]:
        """Fields that must be equal for two chunks to be added slot by slot."""
        return (self.stream(), self.chunk_index, self.n_ciphertexts)

    def summed_with(self, other: ChunkHeader) -> ChunkHeader:
        return replace(self, parties=self.parties + other.parties, seeded=False)


def pack_chunk(header: ChunkHeader, ciphertexts: list[bytes]) -> bytes:
    if len(ciphertexts) != header.n_ciphertexts:
        raise ValueError("header.n_ciphertexts does not match the ciphertexts given")
    parts = [
        _HEADER.pack(
            CHUNK_MAGIC,
            CHUNK_FORMAT_VERSION,
            int(header.kind),
            header.frac_bits,
            int(header.seeded),
            header.parties,
            header.key_id,
            header.n_values,
            header.chunk_index,
            header.chunk_count,
            header.n_ciphertexts,
        )
    ]
    for ciphertext in ciphertexts:
        parts.append(_U32.pack(len(ciphertext)))
        parts.append(ciphertext)
    return b"".join(parts)


def unpack_header(chunk: bytes) -> ChunkHeader:
    try:
        (magic, version, kind, frac_bits, seeded, parties, key_id, n_values, index, count, n_cts) = (
            _HEADER.unpack_from(chunk, 0)
        )
    except struct.error as error:
        raise HeFormatError("ciphertext chunk is shorter than its header") from error
    if magic != CHUNK_MAGIC:
        raise HeFormatError("not a FIBEMRSS ciphertext chunk (bad magic)")
    if version != CHUNK_FORMAT_VERSION:
        raise HeFormatError(f"ciphertext chunk format version {version} is not supported")
    if kind not in ChunkKind.__members__.values():
        raise HeFormatError(f"ciphertext chunk has an unknown kind {kind}")
    if parties < 1 or n_cts < 1 or count < 1 or index >= count:
        raise HeFormatError("ciphertext chunk header is inconsistent")
    return ChunkHeader(
        ChunkKind(kind), frac_bits, bool(seeded), parties, key_id, n_values, index, count, n_cts
    )


def unpack_chunk(chunk: bytes) -> tuple[ChunkHeader, list[bytes]]:
    header = unpack_header(chunk)
    ciphertexts: list[bytes] = []
    offset = _HEADER.size
    for _ in range(header.n_ciphertexts):
        if offset + _U32.size > len(chunk):
            raise HeFormatError("ciphertext chunk is truncated")
        (length,) = _U32.unpack_from(chunk, offset)
        offset += _U32.size
        if length > MAX_CIPHERTEXT_BYTES or offset + length > len(chunk):
            raise HeFormatError("ciphertext chunk is truncated or holds an oversized ciphertext")
        ciphertexts.append(chunk[offset : offset + length])
        offset += length
    if offset != len(chunk):
        raise HeFormatError("ciphertext chunk has trailing bytes")
    return header, ciphertexts
