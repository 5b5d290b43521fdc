"""The HE codec with real TenSEAL/SEAL: exactness at the documented bounds, key roles, chunk sizes."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibemrss.he import (
    DEFAULT_PARAMS,
    AggregatorKey,
    ChunkAccumulator,
    HeFormatError,
    HeKeyError,
    HeOverflowError,
    HospitalKey,
    UpdateDecryptor,
    UpdateEncryptor,
    add_chunks,
    generate_keys,
    load_aggregator_key,
    load_hospital_key,
    write_key_files,
)
from fibemrss.he.chunk_format import ChunkKind, unpack_header
from fibemrss.he.codec import SerializedChunkSum, slot_count
from fibemrss.he.masking import MaskContext, MaskKeyPair, cohort_mask, round_key_seed
from fibemrss.he.params import HeParams

MAX_CHUNK_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def key_bytes() -> tuple[bytes, bytes]:
    return generate_keys()


@pytest.fixture(scope="module")
def hospital_key(key_bytes: tuple[bytes, bytes]) -> HospitalKey:
    return load_hospital_key(key_bytes[0])


@pytest.fixture(scope="module")
def aggregator_key(key_bytes: tuple[bytes, bytes]) -> AggregatorKey:
    return load_aggregator_key(key_bytes[1])


@pytest.fixture(scope="module")
def encryptor(hospital_key: HospitalKey) -> UpdateEncryptor:
    return UpdateEncryptor(hospital_key)


@pytest.fixture(scope="module")
def decryptor(hospital_key: HospitalKey) -> UpdateDecryptor:
    return UpdateDecryptor(hospital_key)


def sum_uploads(key: AggregatorKey, uploads: list[list[bytes]]) -> list[bytes]:
    """What the aggregator does: chunk i of every hospital into one running sum."""
    summed: list[bytes] = []
    for chunk_index in range(len(uploads[0])):
        accumulator = ChunkAccumulator(key)
        for upload in uploads:
            accumulator.add(upload[chunk_index])
        summed.append(accumulator.result())
    return summed


def exact_integers(values: np.ndarray, weight: int) -> np.ndarray:
    """What one hospital's slots must carry: its weight, then round(w * v * 2^frac_bits)."""
    return np.concatenate([[weight], np.rint(values * (weight * 2.0**DEFAULT_PARAMS.frac_bits))]).astype(
        np.int64
    )


def test_round_trip_of_one_hospital_keeps_values_and_weight(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor
) -> None:
    bound = DEFAULT_PARAMS.max_abs_value
    values = np.random.default_rng(1).uniform(-bound, bound, 9000)  # two ciphertexts, negatives included
    chunks = encryptor.encrypt(values, weight=37)
    assert unpack_header(chunks[0]).compact
    average, total_weight = decryptor.decrypt_average(chunks, values.size)
    assert total_weight == 37
    assert np.abs(average - values).max() <= DEFAULT_PARAMS.average_error(1, 37)
    assert np.array_equal(decryptor.decrypt_integers(chunks, values.size), exact_integers(values, 37))


def test_sum_of_three_hospitals_is_their_weighted_average(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    rng = np.random.default_rng(2)
    # More values than one chunk holds, so several chunk positions are added pairwise.
    n_values = DEFAULT_PARAMS.slots_per_chunk * DEFAULT_PARAMS.values_per_slot + 100
    updates = [rng.normal(0.0, 0.5, n_values).astype(np.float32) for _ in range(3)]
    weights = [1, 250, DEFAULT_PARAMS.max_weight]
    uploads = [encryptor.encrypt(update, weight) for update, weight in zip(updates, weights, strict=True)]
    assert len(uploads[0]) == 2
    summed = [
        add_chunks(aggregator_key, add_chunks(aggregator_key, a, b), c)
        for a, b, c in zip(*uploads, strict=True)
    ]
    average, total_weight = decryptor.decrypt_average(summed, n_values)
    expected = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)
    assert total_weight == sum(weights)
    assert np.abs(average - expected).max() <= DEFAULT_PARAMS.average_error(3, sum(weights))
    exact = sum(exact_integers(u.astype(np.float64), w) for u, w in zip(updates, weights, strict=True))
    assert np.array_equal(decryptor.decrypt_integers(summed, n_values), exact)


def test_a_chunk_added_then_subtracted_leaves_the_previous_sum_byte_for_byte(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    rng = np.random.default_rng(3)
    a, b, c = (encryptor.encrypt(rng.normal(0.0, 1.0, 700), weight) for weight in (3, 5, 7))
    accumulator = ChunkAccumulator(aggregator_key)
    accumulator.add(a[0])
    accumulator.add(b[0])
    before = accumulator.result()
    accumulator.add(c[0])
    assert accumulator.parties == 3 and accumulator.result() != before
    accumulator.subtract(c[0])
    assert accumulator.parties == 2
    assert accumulator.result() == before  # ciphertexts and header (its parties) bit for bit
    _, weight = decryptor.decrypt_average([accumulator.result()], 700)
    assert weight == 8
    # Down to nothing: empty again, as before the first chunk; and a sum moved in whole.
    accumulator.subtract(b[0])
    accumulator.subtract(a[0])
    assert accumulator.parties == 0
    with pytest.raises(HeFormatError):
        accumulator.result()
    other = ChunkAccumulator(aggregator_key)
    other.add(b[0])
    accumulator.add(a[0])
    accumulator.absorb(other)
    assert accumulator.result() == before and other.parties == 0
    # The same kept serialized between changes (the aggregator's running sums): the same bytes.
    kept = SerializedChunkSum(aggregator_key)
    for chunk in (a[0], b[0], c[0]):
        loaded = ChunkAccumulator(aggregator_key)
        loaded.add(chunk)
        kept.absorb(loaded)
    kept.subtract(c[0])
    assert kept.parties == 2 and kept.result() == before
    with pytest.raises(HeFormatError):
        kept.subtract(add_chunks(aggregator_key, add_chunks(aggregator_key, a[0], b[0]), c[0]))
    assert kept.result() == before  # a refused change leaves it as it was


def test_subtracting_a_chunk_the_sum_cannot_hold_is_refused(
    encryptor: UpdateEncryptor, aggregator_key: AggregatorKey
) -> None:
    ours = encryptor.encrypt(np.ones(3), weight=1)[0]
    accumulator = ChunkAccumulator(aggregator_key)
    with pytest.raises(HeFormatError):
        accumulator.subtract(ours)  # nothing added yet
    accumulator.add(ours)
    with pytest.raises(HeFormatError):
        accumulator.subtract(encryptor.encrypt(np.ones(4), weight=1)[0])  # another layout
    with pytest.raises(HeFormatError):
        accumulator.subtract(add_chunks(aggregator_key, ours, ours))  # two parties out of one
    assert accumulator.parties == 1


bounded_value = st.floats(-DEFAULT_PARAMS.max_abs_value, DEFAULT_PARAMS.max_abs_value, allow_nan=False)
hospital_update = st.tuples(
    st.lists(bounded_value, min_size=5, max_size=5), st.integers(1, DEFAULT_PARAMS.max_weight)
)


@settings(max_examples=30, deadline=None)
@given(hospitals=st.lists(hospital_update, min_size=1, max_size=5))
def test_any_bounded_updates_sum_exactly_and_average_within_the_error_bound(
    hospitals: list[tuple[list[float], int]],
    encryptor: UpdateEncryptor,
    decryptor: UpdateDecryptor,
    aggregator_key: AggregatorKey,
) -> None:
    uploads = [encryptor.encrypt(np.array(values), weight) for values, weight in hospitals]
    summed = sum_uploads(aggregator_key, uploads)
    average, total_weight = decryptor.decrypt_average(summed, 5)
    weights = [weight for _, weight in hospitals]
    expected = np.average([values for values, _ in hospitals], axis=0, weights=weights)
    assert total_weight == sum(weights)
    assert (
        np.abs(average - expected).max() <= DEFAULT_PARAMS.average_error(len(hospitals), sum(weights)) + 1e-12
    )
    # Every integer of the sum, both digits of every slot, is the exact sum of the parties' integers.
    exact = sum(exact_integers(np.array(values), weight) for values, weight in hospitals)
    assert np.array_equal(decryptor.decrypt_integers(summed, 5), exact)


def test_every_chunk_stays_under_4_mib_and_an_upload_under_float32(
    encryptor: UpdateEncryptor, aggregator_key: AggregatorKey
) -> None:
    values = np.zeros(DEFAULT_PARAMS.slots_per_chunk * DEFAULT_PARAMS.values_per_slot * 2)
    upload = encryptor.encrypt(values, weight=1)
    aggregate = sum_uploads(aggregator_key, [upload, upload])
    assert max(map(len, upload)) < MAX_CHUNK_BYTES
    assert max(map(len, aggregate)) < MAX_CHUNK_BYTES
    # Two values a slot, c0 in 60 bits, c1 a seed: under 4 bytes (float32) per parameter.
    assert sum(map(len, upload)) / values.size < 4


def test_largest_values_and_weights_of_max_parties_hospitals_decrypt_exactly(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    bound = DEFAULT_PARAMS.max_abs_value
    step = 2.0**-DEFAULT_PARAMS.frac_bits
    values = np.array([bound, -bound, 0.0, step, bound - step, -1.0, -bound])
    weight = DEFAULT_PARAMS.max_weight
    # The same upload max_parties (128) times: its rounding of c0 and its noise add up fully aligned (the worst case).
    upload = encryptor.encrypt(values, weight)
    summed = sum_uploads(aggregator_key, [upload] * DEFAULT_PARAMS.max_parties)
    average, total_weight = decryptor.decrypt_average(summed, values.size)
    assert total_weight == DEFAULT_PARAMS.max_parties * weight
    assert np.array_equal(average, values)
    exact = DEFAULT_PARAMS.max_parties * exact_integers(values, weight)
    assert np.array_equal(decryptor.decrypt_integers(summed, values.size), exact)
    assert np.abs(exact).max() == (DEFAULT_PARAMS.digit_base - 1) // 2  # the digit is full, not beyond
    assert unpack_header(summed[0]).parties == DEFAULT_PARAMS.max_parties
    with pytest.raises(HeOverflowError, match=str(DEFAULT_PARAMS.max_parties)):
        add_chunks(aggregator_key, summed[0], upload[0])


def test_max_parties_masked_hospitals_at_the_bounds_sum_exactly(
    hospital_key: HospitalKey, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    bound, weight = DEFAULT_PARAMS.max_abs_value, DEFAULT_PARAMS.max_weight
    n = DEFAULT_PARAMS.max_parties
    names = [f"h{i:02d}" for i in range(n)]
    context = MaskContext(b"\x07" * 16, "codec-bounds", 1, 1)
    pairs = {name: MaskKeyPair(round_key_seed(name.encode() * 4, context)) for name in names}
    public = {name: pair.public_key for name, pair in pairs.items()}
    values = [np.array([bound, -bound, bound, -bound, bound]) * (1 if i % 2 else -1) for i in range(n)]
    weights = [weight - (i % 3) for i in range(n)]
    slots = slot_count(ChunkKind.WEIGHTED_UPDATE, 5, DEFAULT_PARAMS)
    encryptor = UpdateEncryptor(hospital_key)
    uploads = []
    for name, update, w in zip(names, values, weights, strict=True):
        mask = cohort_mask(pairs[name], name, public, context, slots, DEFAULT_PARAMS.plain_modulus)
        uploads.append(encryptor.encrypt(update, w, mask))
    # One masked upload alone is noise: its weight digit is not the weight.
    assert decryptor.decrypt_integers(uploads[0], 5)[0] != weights[0]
    summed = sum_uploads(aggregator_key, uploads)
    exact = sum(exact_integers(u, w) for u, w in zip(values, weights, strict=True))
    assert np.array_equal(decryptor.decrypt_integers(summed, 5), exact)
    average, total_weight = decryptor.decrypt_average(summed, 5)
    assert total_weight == sum(weights)
    expected = np.average(np.stack(values), axis=0, weights=weights)
    assert np.abs(average - expected).max() <= DEFAULT_PARAMS.average_error(n, total_weight)


def test_one_beyond_the_bounds_is_refused_before_encryption(encryptor: UpdateEncryptor) -> None:
    bound = DEFAULT_PARAMS.max_abs_value
    with pytest.raises(HeOverflowError, match=f"{bound:g}"):
        encryptor.encrypt(np.array([0.0, np.nextafter(bound, np.inf)]), weight=1)
    with pytest.raises(HeOverflowError, match=f"{bound:g}"):
        encryptor.encrypt(np.array([-bound - 0.5]), weight=1)
    with pytest.raises(HeOverflowError, match=str(DEFAULT_PARAMS.max_weight)):
        encryptor.encrypt(np.array([1.0]), weight=DEFAULT_PARAMS.max_weight + 1)
    with pytest.raises(HeOverflowError):
        encryptor.encrypt(np.array([np.nan]), weight=1)
    with pytest.raises(ValueError):
        encryptor.encrypt(np.array([1.0]), weight=0)
    with pytest.raises(HeOverflowError):
        encryptor.encrypt_sums(np.array([DEFAULT_PARAMS.max_abs_sum_value(8) * 1.01]))


def test_the_parameters_refuse_a_party_bound_the_digit_cannot_hold() -> None:
    with pytest.raises(ValueError, match="per-party bound"):
        HeParams(max_weight=2 * DEFAULT_PARAMS.max_weight)
    with pytest.raises(ValueError, match="per-party bound"):
        HeParams(max_parties=2 * DEFAULT_PARAMS.max_parties)
    with pytest.raises(HeKeyError, match="q / \\(2t\\)"):
        generate_keys(HeParams(c0_dropped_bits=DEFAULT_PARAMS.c0_dropped_bits + 1))


def test_federated_sums_are_exact(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    rng = np.random.default_rng(3)
    cholesterol = [rng.uniform(100.0, 600.0, 3) / 100 for _ in range(3)]
    statistics = [np.array([c.size, c.sum(), np.square(c).sum(), -c.sum(), 0.0]) for c in cholesterol]
    uploads = [encryptor.encrypt_sums(row) for row in statistics]
    summed = sum_uploads(aggregator_key, uploads)
    totals = decryptor.decrypt_sums(summed, 5)
    expected = np.sum(statistics, axis=0)
    assert totals[0] == 9
    assert np.abs(totals - expected).max() <= 3 * 2.0**-9
    counts = [encryptor.encrypt_sums(np.array([DEFAULT_PARAMS.max_abs_sum_value(0)] * 3), 0)] * 64
    assert np.array_equal(
        decryptor.decrypt_sums(sum_uploads(aggregator_key, counts), 3),
        [64 * DEFAULT_PARAMS.max_abs_sum_value(0)] * 3,
    )


def test_a_chunk_of_the_earlier_format_is_refused_by_its_version(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    chunk = bytearray(encryptor.encrypt(np.ones(3), weight=1)[0])
    chunk[4] = 1  # the version byte of the codec of one value per slot
    with pytest.raises(HeFormatError, match="version 1 is not supported"):
        ChunkAccumulator(aggregator_key).add(bytes(chunk))
    with pytest.raises(HeFormatError, match="version 1 is not supported"):
        decryptor.decrypt_average([bytes(chunk)], 3)


def test_a_tampered_compact_chunk_is_refused(
    encryptor: UpdateEncryptor, aggregator_key: AggregatorKey
) -> None:
    chunk = encryptor.encrypt(np.ones(3), weight=1)[0]
    for bad in (chunk[:-1], chunk + b"\0", chunk[:40] + b"\xff\xff" + chunk[42:]):
        with pytest.raises(HeFormatError):
            ChunkAccumulator(aggregator_key).add(bad)


def test_a_key_file_of_the_earlier_codec_keeps_one_value_per_slot() -> None:
    legacy = DEFAULT_PARAMS.to_json_dict()
    for field in ("values_per_slot", "c0_dropped_bits"):
        del legacy[field]
    legacy.update(
        coeff_mod_bit_sizes=[60],
        plain_modulus=140_737_488_273_409,
        frac_bits=16,
        max_weight=2**16,
        max_abs_value=128.0,
        max_parties=64,
    )
    params = HeParams.from_json_dict(legacy)
    assert (params.values_per_slot, params.c0_dropped_bits) == (1, 0)
    key = load_hospital_key(generate_keys(params)[0])
    values = np.array([128.0, -128.0, 0.5])
    upload = UpdateEncryptor(key).encrypt(values, 2**16)
    average, weight = UpdateDecryptor(key).decrypt_average(upload, 3)
    assert weight == 2**16 and np.array_equal(average, values)


def test_aggregator_key_refuses_a_key_holding_the_secret_key(key_bytes: tuple[bytes, bytes]) -> None:
    with pytest.raises(HeKeyError, match="secret key"):
        load_aggregator_key(key_bytes[0])


def test_hospital_key_refuses_a_key_without_the_secret_key(key_bytes: tuple[bytes, bytes]) -> None:
    with pytest.raises(HeKeyError, match="no secret key"):
        load_hospital_key(key_bytes[1])


@pytest.mark.parametrize("garbage", [b"", b"garbage", bytes(range(256)) * 4])
def test_garbage_is_refused_with_a_key_error(garbage: bytes) -> None:
    with pytest.raises(HeKeyError):
        load_hospital_key(garbage)
    with pytest.raises(HeKeyError):
        load_aggregator_key(garbage)


def test_truncated_or_corrupt_hospital_key_is_refused(key_bytes: tuple[bytes, bytes]) -> None:
    hospital_bytes = key_bytes[0]
    with pytest.raises(HeKeyError):
        load_hospital_key(hospital_bytes[:-10])
    corrupt = bytearray(hospital_bytes)
    corrupt[-200:] = b"\xff" * 200  # coefficients beyond the modulus
    with pytest.raises(HeKeyError):
        load_hospital_key(bytes(corrupt))


def test_aggregator_key_cannot_decrypt(aggregator_key: AggregatorKey, encryptor: UpdateEncryptor) -> None:
    assert not hasattr(aggregator_key, "secret_key")
    with pytest.raises(HeKeyError):
        UpdateDecryptor(aggregator_key)  # type: ignore[arg-type]
    with pytest.raises(HeKeyError):
        UpdateEncryptor(aggregator_key)  # type: ignore[arg-type]


def test_chunks_of_another_key_ceremony_or_layout_are_refused(
    encryptor: UpdateEncryptor, aggregator_key: AggregatorKey
) -> None:
    other_encryptor = UpdateEncryptor(load_hospital_key(generate_keys()[0]))
    ours = encryptor.encrypt(np.ones(3), weight=1)[0]
    with pytest.raises(HeKeyError):
        add_chunks(aggregator_key, ours, other_encryptor.encrypt(np.ones(3), weight=1)[0])
    with pytest.raises(HeFormatError):
        add_chunks(aggregator_key, ours, encryptor.encrypt(np.ones(4), weight=1)[0])
    with pytest.raises(HeFormatError):
        add_chunks(aggregator_key, ours, encryptor.encrypt_sums(np.ones(3))[0])
    with pytest.raises(HeFormatError):
        add_chunks(aggregator_key, ours, ours[:-5])


def test_key_files_are_private_and_load_back(tmp_path: Path) -> None:
    hospital_path, aggregator_path = write_key_files(tmp_path / "keys")
    for path in (hospital_path, aggregator_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    hospital_key = load_hospital_key(hospital_path.read_bytes())
    aggregator_key = load_aggregator_key(aggregator_path.read_bytes())
    assert hospital_key.key_id == aggregator_key.key_id
    assert hospital_key.params == aggregator_key.params == DEFAULT_PARAMS
    with pytest.raises(FileExistsError):
        write_key_files(tmp_path / "keys")
