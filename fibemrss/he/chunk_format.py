"""Wire format of one ciphertext chunk: a small clear header, then its ciphertexts in one of two forms.

The header is visible to the aggregator on purpose: it says which slots the chunk covers, how many
parties have been summed into it and under which key ceremony, so mismatched chunks are refused
instead of silently added. It carries no parameter value and no dataset size.

Forms (the header's `compact` flag):

- compact (a hospital's upload, one party): `u16 prefix length | u16 tail length | u32 payload
  length | prefix` once, then per ciphertext `tail | payload`. The prefix is SEAL's header and the
  ciphertext's metadata, the tail SEAL's 64-byte seed of c1, the payload c0 bit-packed without its
  dropped bits (fibemrss.he.compact).
- SEAL (a sum): per ciphertext `u32 length | SEAL's serialization`.

Version 1 (until the packed codec: one value per slot, c0 in 64-bit words) is refused by its version
byte, never misread.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

from fibemrss.he.errors import HeFormatError

CHUNK_MAGIC = b"FHEC"
CHUNK_FORMAT_VERSION = 2
# magic, version, kind, frac_bits, compact, parties, key_id, n_values, chunk_index, chunk_count, n_ciphertexts
_HEADER = struct.Struct("<4sBBBBH8sQIIH")
HEADER_BYTES = _HEADER.size
_U32 = struct.Struct("<I")
_COMPACT = struct.Struct("<HHI")
# A SEAL ciphertext at N = 4096 with three 24-bit primes is about 200 KiB uncompressed plus SEAL's
# header; anything far larger is not ours and is refused before SEAL allocates for it.
MAX_CIPHERTEXT_BYTES = 1 << 20
_MAX_PREFIX_OR_TAIL = 4096


class ChunkKind(enum.IntEnum):
    WEIGHTED_UPDATE = 1  # the weight, then round(w * v * 2^frac_bits), packed values_per_slot a slot
    SUMS = 2  # round(v * 2^frac_bits), packed alike, no weight


@dataclass(frozen=True)
class ChunkHeader:
    kind: ChunkKind
    frac_bits: int
    compact: bool  # a fresh upload: c0 bit-packed without its dropped bits, c1 as SEAL's seed
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
        return replace(self, parties=self.parties + other.parties, compact=False)


@dataclass(frozen=True)
class CompactCiphertexts:
    """The ciphertexts of a compact chunk: the prefix they share, and each one's seed and c0."""

    prefix: bytes
    tails: list[bytes]
    payloads: list[bytes]


def _pack_header(header: ChunkHeader) -> bytes:
    return _HEADER.pack(
        CHUNK_MAGIC,
        CHUNK_FORMAT_VERSION,
        int(header.kind),
        header.frac_bits,
        int(header.compact),
        header.parties,
        header.key_id,
        header.n_values,
        header.chunk_index,
        header.chunk_count,
        header.n_ciphertexts,
    )


def pack_chunk(header: ChunkHeader, ciphertexts: list[bytes]) -> bytes:
    """A chunk of SEAL-serialized ciphertexts (a sum)."""
    if len(ciphertexts) != header.n_ciphertexts or header.compact:
        raise ValueError("header.n_ciphertexts or header.compact does not match the ciphertexts given")
    parts = [_pack_header(header)]
    for ciphertext in ciphertexts:
        parts.append(_U32.pack(len(ciphertext)))
        parts.append(ciphertext)
    return b"".join(parts)


def pack_compact_chunk(header: ChunkHeader, body: CompactCiphertexts) -> bytes:
    """A chunk of compact ciphertexts (one party's upload)."""
    n = header.n_ciphertexts
    if not header.compact or len(body.tails) != n or len(body.payloads) != n:
        raise ValueError("header.n_ciphertexts or header.compact does not match the ciphertexts given")
    tail_len, payload_len = len(body.tails[0]), len(body.payloads[0])
    if any(len(t) != tail_len for t in body.tails) or any(len(p) != payload_len for p in body.payloads):
        raise ValueError("compact ciphertexts of one chunk must have equal sizes")
    parts = [_pack_header(header), _COMPACT.pack(len(body.prefix), tail_len, payload_len), body.prefix]
    for tail, payload in zip(body.tails, body.payloads, strict=True):
        parts.append(tail)
        parts.append(payload)
    return b"".join(parts)


def unpack_header(chunk: bytes) -> ChunkHeader:
    try:
        (magic, version, kind, frac_bits, compact, parties, key_id, n_values, index, count, n_cts) = (
            _HEADER.unpack_from(chunk, 0)
        )
    except struct.error as error:
        raise HeFormatError("ciphertext chunk is shorter than its header") from error
    if magic != CHUNK_MAGIC:
        raise HeFormatError("not a FIBEMRSS ciphertext chunk (bad magic)")
    if version != CHUNK_FORMAT_VERSION:
        raise HeFormatError(
            f"ciphertext chunk format version {version} is not supported (this codec reads version "
            f"{CHUNK_FORMAT_VERSION}; version 1 chunks came from the codec of one value per slot: "
            "re-encrypt them)"
        )
    if kind not in ChunkKind.__members__.values():
        raise HeFormatError(f"ciphertext chunk has an unknown kind {kind}")
    if parties < 1 or n_cts < 1 or count < 1 or index >= count or compact not in (0, 1):
        raise HeFormatError("ciphertext chunk header is inconsistent")
    if compact and parties != 1:
        raise HeFormatError("a compact chunk holds exactly one party's upload")
    return ChunkHeader(
        ChunkKind(kind), frac_bits, bool(compact), parties, key_id, n_values, index, count, n_cts
    )


def unpack_chunk(chunk: bytes) -> tuple[ChunkHeader, list[bytes] | CompactCiphertexts]:
    """The header, and the SEAL ciphertexts (a sum) or the compact ciphertexts (an upload)."""
    header = unpack_header(chunk)
    if header.compact:
        return header, _unpack_compact(chunk, header)
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


def _unpack_compact(chunk: bytes, header: ChunkHeader) -> CompactCiphertexts:
    try:
        prefix_len, tail_len, payload_len = _COMPACT.unpack_from(chunk, _HEADER.size)
    except struct.error as error:
        raise HeFormatError("compact ciphertext chunk is truncated") from error
    if (
        prefix_len > _MAX_PREFIX_OR_TAIL
        or tail_len > _MAX_PREFIX_OR_TAIL
        or payload_len > MAX_CIPHERTEXT_BYTES
    ):
        raise HeFormatError("compact ciphertext chunk announces oversized parts")
    offset = _HEADER.size + _COMPACT.size
    step = tail_len + payload_len
    if offset + prefix_len + header.n_ciphertexts * step != len(chunk):
        raise HeFormatError("compact ciphertext chunk is truncated or has trailing bytes")
    prefix = chunk[offset : offset + prefix_len]
    offset += prefix_len
    tails, payloads = [], []
    for _ in range(header.n_ciphertexts):
        tails.append(chunk[offset : offset + tail_len])
        payloads.append(chunk[offset + tail_len : offset + step])
        offset += step
    return CompactCiphertexts(prefix, tails, payloads)
