"""Encrypts weighted model updates and federated sums, adds them blind, and decrypts the results.

Slot layout, identical at every hospital so chunk i of one hospital adds to chunk i of another:
the integers to encrypt are laid end to end (a weighted update puts its weight first), taken
params.values_per_slot at a time as the digits of one slot (base params.digit_base, the first the
lowest), and the slots cut into ciphertexts of N slots (zero-padded) and those into chunks of
params.ciphertexts_per_chunk. Masks (secure aggregation) are added to the slots, modulo t.
An upload travels compact (fibemrss.he.compact); a sum as SEAL serializes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tenseal import sealapi

from fibemrss.he.chunk_format import (
    ChunkHeader,
    ChunkKind,
    CompactCiphertexts,
    pack_chunk,
    pack_compact_chunk,
    unpack_chunk,
    unpack_header,
)
from fibemrss.he.compact import RnsCompressor, join_seeded, split_seeded
from fibemrss.he.errors import HeFormatError, HeKeyError, HeOverflowError
from fibemrss.he.keys import AggregatorKey, HospitalKey
from fibemrss.he.masking import apply_mask, remove_mask
from fibemrss.he.params import DEFAULT_PARAMS, HeParams
from fibemrss.he.seal_bytes import SealBytes


def ciphertexts_per_chunk_layout(params: HeParams, n_integers: int) -> list[int]:
    """How many ciphertexts each chunk holds for n_integers integers (a weighted update's values
    and its weight), params.values_per_ciphertext to a ciphertext (at least one ciphertext)."""
    n_ciphertexts = max(1, math.ceil(n_integers / params.values_per_ciphertext))
    per_chunk = params.ciphertexts_per_chunk
    return [min(per_chunk, n_ciphertexts - start) for start in range(0, n_ciphertexts, per_chunk)]


def integer_count(kind: ChunkKind, n_values: int) -> int:
    """Integers a vector of n_values encodes to (a weighted update puts its weight first)."""
    return n_values + 1 if kind is ChunkKind.WEIGHTED_UPDATE else n_values


def slot_count(kind: ChunkKind, n_values: int, params: HeParams = DEFAULT_PARAMS) -> int:
    """Slots a vector of n_values occupies (the length of its mask): its integers, weight
    included, params.values_per_slot to a slot."""
    return math.ceil(integer_count(kind, n_values) / params.values_per_slot)


def pack_slots(integers: np.ndarray, params: HeParams) -> np.ndarray:
    """Slots holding `integers` as digits (base T, centered, lowest first), values_per_slot a slot.
    Each |integer| <= (T-1)/2 gives |slot| <= (T^k - 1)/2 < t/2: inside SEAL's centered range."""
    k = params.values_per_slot
    if k == 1:
        return integers.astype(np.int64)
    padded = np.zeros(math.ceil(integers.size / k) * k, dtype=np.int64)
    padded[: integers.size] = integers
    digits = padded.reshape(-1, k)
    base = np.int64(params.digit_base)
    slots = digits[:, k - 1].copy()
    for j in range(k - 2, -1, -1):
        slots = slots * base + digits[:, j]
    return slots


def unpack_slots(slots: np.ndarray, params: HeParams, n_integers: int) -> np.ndarray:
    """The integers of `pack_slots`, from centered slots (each digit back in [-(T-1)/2, (T-1)/2])."""
    k = params.values_per_slot
    if k == 1:
        return slots[:n_integers].astype(np.int64)
    base = np.int64(params.digit_base)
    half = np.int64((params.digit_base - 1) // 2)
    rest = slots.astype(np.int64)
    digits = np.empty((rest.size, k), dtype=np.int64)
    for j in range(k):
        # rest = digit + base * (next rest), digit centered: one division gives both.
        rest, digit = np.divmod(rest + half, base)
        digits[:, j] = digit - half
    return digits.reshape(-1)[:n_integers]


def _data_primes(context: Any) -> list[int]:
    return [modulus.value() for modulus in context.first_context_data().parms().coeff_modulus()]


def _compressor(key: HospitalKey | AggregatorKey) -> RnsCompressor:
    params = key.params
    return RnsCompressor(_data_primes(key.seal_context), params.poly_modulus_degree, params.c0_dropped_bits)


class _CompactReader:
    """Turns a chunk's ciphertexts, compact or not, back into SEAL's serializations."""

    def __init__(self, key: HospitalKey | AggregatorKey) -> None:
        self._compressor = _compressor(key)

    def blobs(self, body: list[bytes] | CompactCiphertexts) -> list[bytes]:
        if not isinstance(body, CompactCiphertexts):
            return body
        if len(body.payloads[0]) != self._compressor.coefficient_bytes:
            raise HeFormatError(
                f"compact ciphertext holds {len(body.payloads[0])} bytes of c0, not "
                f"{self._compressor.coefficient_bytes} (another codec's parameters)"
            )
        z = self._compressor.unpack(b"".join(body.payloads), len(body.payloads))
        c0 = self._compressor.restore(z)
        return [join_seeded(body.prefix, c0[i], tail) for i, tail in enumerate(body.tails)]


def _as_vector(values: np.ndarray) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1:
        raise ValueError(f"values must be a 1-D array, got shape {vector.shape}")
    return vector


def _first_index_beyond(magnitudes: np.ndarray, bound: float) -> int | None:
    """Index of the first magnitude above bound or not finite (NaN compares false, so test twice)."""
    bad = ~(magnitudes <= bound)
    return int(np.argmax(bad)) if bad.any() else None


class UpdateEncryptor:
    """Hospital side: turns a weighted update or a vector of sums into ciphertext chunks."""

    def __init__(self, key: HospitalKey) -> None:
        if not isinstance(key, HospitalKey):
            raise HeKeyError("encrypting needs the hospital key (with the secret key)")
        self._key = key
        self._params = key.params
        self._encoder = sealapi.BatchEncoder(key.seal_context)
        # Symmetric encryption: SEAL then stores the second polynomial as a seed, halving uploads.
        self._encryptor = sealapi.Encryptor(key.seal_context, key.secret_key)
        self._scratch = SealBytes()
        self._compressor = _compressor(key)

    @property
    def params(self) -> HeParams:
        return self._params

    def encrypt(self, values: np.ndarray, weight: int, mask: np.ndarray | None = None) -> list[bytes]:
        """Encrypt weight * values in fixed point, and weight itself, as chunks to stream.

        Bounds (HeOverflowError beyond them): 1 <= weight <= params.max_weight (2^10) and
        |value| <= params.max_abs_value (2^3); the sum of up to params.max_parties (128) hospitals
        then decrypts exactly, and the average is within params.average_error(parties, total
        weight) = parties / (2^(frac_bits+1) x total weight) of the exact one.
        `mask` (fibemrss.he.masking.cohort_mask over `slot_count` slots, weight included) is added
        modulo the plain modulus before encryption; masks of a whole cohort cancel in the sum.
        """
        vector = _as_vector(values)
        checked_weight = self._checked_weight(weight)
        bound = self._params.max_abs_value
        beyond = _first_index_beyond(np.abs(vector), bound)
        if beyond is not None:
            raise HeOverflowError(
                f"model value at index {beyond} is beyond the bound |value| <= {bound:g} "
                "(HeParams.max_abs_value) or not finite; clip or rescale the update"
            )
        slots = np.empty(vector.size + 1, dtype=np.int64)
        slots[0] = checked_weight
        slots[1:] = np.rint(vector * (checked_weight * 2.0**self._params.frac_bits))
        return self._encrypt_slots(
            slots, ChunkKind.WEIGHTED_UPDATE, self._params.frac_bits, vector.size, mask
        )

    def encrypt_sums(
        self, values: np.ndarray, frac_bits: int | None = None, mask: np.ndarray | None = None
    ) -> list[bytes]:
        """Encrypt values to be summed across hospitals (counts, sums, sums of squares).

        Each |value| must be at most params.max_abs_sum_value(frac_bits): 2^11 (2,048) at the
        default 8 fractional bits; pass frac_bits=0 for counts or larger values (bound 2^19, about
        5.2e5) or pre-scale them. Each party's rounding error is at most 2^-(frac_bits+1).
        """
        vector = _as_vector(values)
        bits = self._params.stats_frac_bits if frac_bits is None else frac_bits
        if not 0 <= bits <= 40:
            raise ValueError(f"frac_bits must lie in [0, 40], got {bits}")
        bound = self._params.max_abs_sum_value(bits)
        beyond = _first_index_beyond(np.abs(vector), bound)
        if beyond is not None:
            raise HeOverflowError(
                f"sum at index {beyond} is beyond the bound |value| <= {bound:.6g} for frac_bits={bits} "
                "(HeParams.max_abs_sum_value) or not finite; pre-scale it or lower frac_bits"
            )
        slots = np.rint(vector * 2.0**bits).astype(np.int64)
        return self._encrypt_slots(slots, ChunkKind.SUMS, bits, vector.size, mask)

    def _checked_weight(self, weight: int) -> int:
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
            raise TypeError(f"weight must be an int (a number of examples), got {type(weight).__name__}")
        if weight < 1:
            raise ValueError(f"weight must be at least 1, got {weight}")
        if weight > self._params.max_weight:
            raise HeOverflowError(
                f"weight {weight} is beyond the bound {self._params.max_weight} (HeParams.max_weight); "
                "cap the example count"
            )
        return int(weight)

    def _encrypt_slots(
        self, slots: np.ndarray, kind: ChunkKind, frac_bits: int, n_values: int, mask: np.ndarray | None
    ) -> list[bytes]:
        layout = ciphertexts_per_chunk_layout(self._params, slots.size)
        slots = pack_slots(slots, self._params)
        if mask is not None:
            slots = apply_mask(slots, np.asarray(mask, dtype=np.int64), self._params.plain_modulus)
        n_per_ciphertext = self._params.slots_per_ciphertext
        n_primes = self._params.data_prime_count
        chunks: list[bytes] = []
        first_slot = 0
        for chunk_index, n_ciphertexts in enumerate(layout):
            parts = []
            for _ in range(n_ciphertexts):
                plain = sealapi.Plaintext()
                # BatchEncoder zero-pads a short last slice to N slots.
                self._encoder.encode(slots[first_slot : first_slot + n_per_ciphertext].tolist(), plain)
                blob = self._scratch.dump(self._encryptor.encrypt_symmetric(plain))
                parts.append(split_seeded(blob, n_primes, n_per_ciphertext))
                first_slot += n_per_ciphertext
            z = self._compressor.compress(np.stack([part.c0 for part in parts]))
            coefficient_bytes = self._compressor.coefficient_bytes
            packed = self._compressor.pack(z)
            body = CompactCiphertexts(
                prefix=parts[0].prefix,
                tails=[part.tail for part in parts],
                payloads=[
                    packed[i * coefficient_bytes : (i + 1) * coefficient_bytes] for i in range(len(parts))
                ],
            )
            header = ChunkHeader(
                kind=kind,
                frac_bits=frac_bits,
                compact=True,
                parties=1,
                key_id=self._key.key_id,
                n_values=n_values,
                chunk_index=chunk_index,
                chunk_count=len(layout),
                n_ciphertexts=n_ciphertexts,
            )
            chunks.append(pack_compact_chunk(header, body))
        return chunks


class ChunkAccumulator:
    """Aggregator side: the running sum of one chunk position across hospitals.

    Memory is bounded by one chunk. It refuses chunks of another layout or key ceremony, and a sum
    of more than params.max_parties parties, beyond which exact decryption is no longer guaranteed.
    A chunk added can be subtracted again (`subtract`): BFV addition is addition modulo q, a
    group, so the sum comes back bit for bit, which lets the aggregator add an upload while it
    streams in and take it out again if the upload is refused.
    """

    def __init__(self, key: AggregatorKey) -> None:
        if not isinstance(key, AggregatorKey):
            raise HeKeyError("the accumulator takes an AggregatorKey (use HospitalKey.aggregator_key())")
        self._key = key
        self._evaluator = sealapi.Evaluator(key.seal_context)
        self._scratch = SealBytes()
        self._reader = _CompactReader(key)
        self._header: ChunkHeader | None = None
        self._sums: list[Any] = []

    @property
    def parties(self) -> int:
        return 0 if self._header is None else self._header.parties

    @property
    def chunk_count(self) -> int:
        """The chunk positions of the vector this sum is a position of (0 before any chunk)."""
        return 0 if self._header is None else self._header.chunk_count

    def add(self, chunk: bytes) -> None:
        header, serialized = unpack_chunk(chunk)
        summed = self._summed_header(header)
        ciphertexts = self._load(serialized)
        if self._header is None:
            self._sums = ciphertexts
        else:
            for running, ciphertext in zip(self._sums, ciphertexts, strict=True):
                self._evaluator.add_inplace(running, ciphertext)
        self._header = summed

    def absorb(self, other: ChunkAccumulator) -> None:
        """Adds another accumulator's sum (of the same key) in place, without serializing it;
        `other` must not be used afterwards (its ciphertexts may become this sum's)."""
        if other._header is None:
            return
        if other._key.key_id != self._key.key_id:
            raise HeKeyError("the accumulators hold sums under different key ceremonies")
        summed = self._summed_header(other._header)
        if self._header is None:
            self._sums = other._sums
        else:
            for running, ciphertext in zip(self._sums, other._sums, strict=True):
                self._evaluator.add_inplace(running, ciphertext)
        self._header = summed
        other._header, other._sums = None, []

    def subtract(self, chunk: bytes) -> None:
        """Takes a chunk added before out of the sum again: the sum (ciphertexts and header,
        parties included) is then bit-exactly what it was before that chunk was added."""
        header, serialized = unpack_chunk(chunk)
        if self._header is None or header.parties > self._header.parties:
            raise HeFormatError("the chunk holds more parties than the sum it is subtracted from")
        if header.key_id != self._key.key_id:
            raise HeKeyError("chunk was encrypted under another key ceremony than this aggregator's key")
        if header.layout() != self._header.layout():
            raise HeFormatError(
                "chunks cover different slots (kind, frac_bits, n_values, chunk index or count differ)"
            )
        ciphertexts = self._load(serialized)
        left = self._header.parties - header.parties
        if left == 0:
            # Nothing remains: the accumulator is empty again, as before its first chunk.
            self._header, self._sums = None, []
            return
        for running, ciphertext in zip(self._sums, ciphertexts, strict=True):
            self._evaluator.sub_inplace(running, ciphertext)
        self._header = replace(self._header, parties=left)

    def result(self) -> bytes:
        if self._header is None:
            raise HeFormatError("no chunk has been added")
        serialized = [self._scratch.dump(ciphertext) for ciphertext in self._sums]
        return pack_chunk(replace(self._header, compact=False), serialized)

    def _summed_header(self, header: ChunkHeader) -> ChunkHeader:
        """The header of this sum with `header`'s parties added, or the error refusing them."""
        if header.key_id != self._key.key_id:
            raise HeKeyError("chunk was encrypted under another key ceremony than this aggregator's key")
        if self._header is not None and header.layout() != self._header.layout():
            raise HeFormatError(
                "chunks cover different slots (kind, frac_bits, n_values, chunk index or count differ)"
            )
        summed = header if self._header is None else self._header.summed_with(header)
        if summed.parties > self._key.params.max_parties:
            raise HeOverflowError(
                f"sum would hold {summed.parties} parties, beyond the bound {self._key.params.max_parties} "
                "(HeParams.max_parties)"
            )
        return summed

    def _load(self, serialized: list[bytes] | CompactCiphertexts) -> list[Any]:
        return [_load_ciphertext(self._scratch, self._key, blob) for blob in self._reader.blobs(serialized)]


class SerializedChunkSum:
    """Aggregator side: the running sum of one chunk position, kept as SEAL serializes it
    between additions.

    Loaded, a sum is SEAL's polynomials in 64-bit words (two polynomials of three 24-bit residues
    per coefficient and ciphertext): about two and a half times its serialization, seven times a
    compact upload. Kept serialized, a round's running sum costs its final size in memory for the
    whole round, and the bytes that close the round are the ones already held (no second copy).
    Each change loads the sum into a ChunkAccumulator, changes it in place and serializes it
    again: exact (serialization is lossless), at the CPU of one load and one save per chunk.
    A change that raises leaves the sum as it was.
    """

    def __init__(self, key: AggregatorKey) -> None:
        self._key = key
        self._sum: bytes | None = None
        self._parties = 0

    @property
    def parties(self) -> int:
        return self._parties

    def add(self, chunk: bytes) -> None:
        self._change(lambda accumulator: accumulator.add(chunk))

    def absorb(self, other: ChunkAccumulator) -> None:
        """Adds a chunk loaded into an accumulator of its own (which must not be used afterwards)."""
        self._change(lambda accumulator: accumulator.absorb(other))

    def subtract(self, chunk: bytes) -> None:
        """Takes a chunk added before out again: the bytes are then exactly the earlier ones."""
        self._change(lambda accumulator: accumulator.subtract(chunk))

    def result(self) -> bytes:
        if self._sum is None:
            raise HeFormatError("no chunk has been added")
        return self._sum

    def _change(self, change: Callable[[ChunkAccumulator], None]) -> None:
        accumulator = ChunkAccumulator(self._key)
        if self._sum is not None:
            accumulator.add(self._sum)
        change(accumulator)
        self._sum = accumulator.result() if accumulator.parties else None
        self._parties = accumulator.parties


def _load_ciphertext(scratch: SealBytes, key: HospitalKey | AggregatorKey, blob: bytes) -> Any:
    """A SEAL ciphertext of this key's context, of two polynomials in coefficient form (what the
    codec makes), or HeFormatError; SEAL checks the rest (parameters, every coefficient below q)."""
    ciphertext = sealapi.Ciphertext()
    try:
        scratch.load_into(ciphertext, key.seal_context, blob)
    except Exception as error:  # SEAL raises several types for malformed ciphertexts
        raise HeFormatError(f"chunk holds an invalid ciphertext: {error}") from error
    if ciphertext.size() != 2 or ciphertext.is_ntt_form():
        raise HeFormatError("chunk holds a ciphertext of unexpected size or form")
    return ciphertext


def add_chunks(key: AggregatorKey, a: bytes, b: bytes) -> bytes:
    """Aggregator side: the encrypted slot-wise sum of two chunks at the same position."""
    accumulator = ChunkAccumulator(key)
    accumulator.add(a)
    accumulator.add(b)
    return accumulator.result()


class UpdateDecryptor:
    """Hospital side: decrypts aggregated chunks into a weighted average or into sums."""

    def __init__(self, key: HospitalKey) -> None:
        if not isinstance(key, HospitalKey):
            raise HeKeyError("decrypting needs the hospital key (with the secret key)")
        self._key = key
        self._params = key.params
        self._encoder = sealapi.BatchEncoder(key.seal_context)
        self._decryptor = sealapi.Decryptor(key.seal_context, key.secret_key)
        self._scratch = SealBytes()
        self._reader = _CompactReader(key)

    def decrypt_average(
        self,
        chunks: Sequence[bytes],
        n_values: int,
        min_parties: int = 1,
        correction: np.ndarray | None = None,
    ) -> tuple[np.ndarray, int]:
        """(sum_k w_k v_k / sum_k w_k, sum_k w_k) of the hospitals summed into chunks; refuses
        (HeFormatError) a sum of fewer than min_parties hospitals. `correction` (secure
        aggregation: the masks left in the sum, fibemrss.he.secagg) is subtracted modulo the
        plain modulus before decoding."""
        slots, _ = self._decrypt_slots(chunks, n_values, ChunkKind.WEIGHTED_UPDATE, min_parties)
        if correction is not None:
            slots = remove_mask(slots, correction, self._params.plain_modulus)
        integers = unpack_slots(slots, self._params, n_values + 1)
        total_weight = int(integers[0])
        if total_weight < 1:
            raise HeFormatError("decrypted total weight is not positive: the chunks are corrupt")
        scale = 2.0**self._params.frac_bits * total_weight
        return integers[1:].astype(np.float64) / scale, total_weight

    def decrypt_slots(self, chunks: Sequence[bytes], n_values: int) -> np.ndarray:
        """The raw slots of a weighted update or its sum (each holds params.values_per_slot
        integers, the weight first), centered modulo t: what anyone holding the key sees of a
        ciphertext. Under pairwise masking an individual upload, or a sum missing a cohort member,
        gives values uniform modulo the plain modulus. `unpack_slots` reads the integers."""
        headers = unpack_header(chunks[0]) if chunks else None
        if headers is None:
            raise HeFormatError("no chunk given")
        slots, _ = self._decrypt_slots(chunks, n_values, headers.kind, 1)
        return slots

    def decrypt_integers(self, chunks: Sequence[bytes], n_values: int) -> np.ndarray:
        """The integers of a weighted update (weight first) or of sums, unpacked from unmasked slots."""
        headers = unpack_header(chunks[0]) if chunks else None
        if headers is None:
            raise HeFormatError("no chunk given")
        slots, _ = self._decrypt_slots(chunks, n_values, headers.kind, 1)
        return unpack_slots(slots, self._params, integer_count(headers.kind, n_values))

    def chunk_slots(self, chunk: bytes) -> np.ndarray:
        header, serialized = unpack_chunk(chunk)
        if header.key_id != self._key.key_id:
            raise HeKeyError("chunk was encrypted under another key ceremony than this hospital key")
        return np.concatenate([self._decrypt_one(blob) for blob in self._reader.blobs(serialized)])

    def decrypt_sums(self, chunks: Sequence[bytes], n_values: int) -> np.ndarray:
        """Slot-wise sums over the hospitals summed into chunks, at the frac_bits they were encrypted with."""
        slots, header = self._decrypt_slots(chunks, n_values, ChunkKind.SUMS, 1)
        return unpack_slots(slots, self._params, n_values).astype(np.float64) / 2.0**header.frac_bits

    def _decrypt_slots(
        self, chunks: Sequence[bytes], n_values: int, kind: ChunkKind, min_parties: int
    ) -> tuple[np.ndarray, ChunkHeader]:
        """The slots of the vector (exactly slot_count of them, padding cut), centered modulo t."""
        headers = [unpack_header(chunk) for chunk in chunks]
        layout = ciphertexts_per_chunk_layout(self._params, integer_count(kind, n_values))
        if len(chunks) != len(layout):
            raise HeFormatError(f"expected {len(layout)} chunks for {n_values} values, got {len(chunks)}")
        by_index: dict[int, bytes] = {}
        for header, chunk in zip(headers, chunks, strict=True):
            if header.key_id != self._key.key_id:
                raise HeKeyError("chunks were encrypted under another key ceremony than this hospital key")
            if header.stream() != headers[0].stream():
                raise HeFormatError("chunks disagree on kind, frac_bits, n_values or chunk count")
            if header.parties != headers[0].parties:
                raise HeFormatError("chunks sum different numbers of parties: some uploads are missing")
            if header.kind is not kind or header.n_values != n_values:
                raise HeFormatError(
                    f"chunks hold {header.kind.name} of {header.n_values} values, not {kind.name}"
                )
            if header.n_ciphertexts != layout[header.chunk_index] or header.chunk_index in by_index:
                raise HeFormatError(f"chunk {header.chunk_index} is duplicated or has the wrong size")
            by_index[header.chunk_index] = chunk
        if headers[0].parties < min_parties:
            raise HeFormatError(
                f"the sum holds {headers[0].parties} contributors, fewer than the minimum {min_parties}: "
                "refusing to decrypt it"
            )
        if headers[0].parties > self._params.max_parties:
            raise HeOverflowError(
                f"chunks sum {headers[0].parties} parties, beyond {self._params.max_parties}"
            )
        decoded: list[np.ndarray] = []
        for chunk_index in range(len(layout)):
            _, serialized = unpack_chunk(by_index[chunk_index])
            decoded.extend(self._decrypt_one(blob) for blob in self._reader.blobs(serialized))
        return np.concatenate(decoded)[: slot_count(kind, n_values, self._params)], headers[0]

    def _decrypt_one(self, blob: bytes) -> np.ndarray:
        ciphertext = _load_ciphertext(self._scratch, self._key, blob)
        plain = sealapi.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        # decode_int64 maps [0, t) to the centered range (-t/2, t/2], which is how negatives come back.
        return np.asarray(self._encoder.decode_int64(plain), dtype=np.int64)


class UpdateCodec:
    """Both directions under one hospital key: what a hospital agent needs of the codec."""

    def __init__(self, key: HospitalKey) -> None:
        self._encryptor = UpdateEncryptor(key)
        self._decryptor = UpdateDecryptor(key)
        self._aggregator_key = key.aggregator_key()

    @property
    def params(self) -> HeParams:
        return self._encryptor.params

    def encrypt(self, values: np.ndarray, weight: int, mask: np.ndarray | None = None) -> list[bytes]:
        return self._encryptor.encrypt(values, weight, mask)

    def decrypt_average(
        self,
        chunks: Sequence[bytes],
        n_values: int,
        min_parties: int = 1,
        correction: np.ndarray | None = None,
    ) -> tuple[np.ndarray, int]:
        return self._decryptor.decrypt_average(chunks, n_values, min_parties, correction)

    def decrypt_slots(self, chunks: Sequence[bytes], n_values: int) -> np.ndarray:
        return self._decryptor.decrypt_slots(chunks, n_values)

    def chunk_slots(self, chunk: bytes) -> np.ndarray:
        """The raw slots of one chunk (its ciphertexts decrypted end to end), to compare two sums."""
        return self._decryptor.chunk_slots(chunk)

    def add(self, parts: Sequence[bytes]) -> bytes:
        """The encrypted sum of chunks at one position (what the aggregator should have served)."""
        accumulator = ChunkAccumulator(self._aggregator_key)
        for part in parts:
            accumulator.add(part)
        return accumulator.result()
