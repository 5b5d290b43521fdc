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
from fibemrss.he.chunk_format import unpack_header

PRECISION = 1e-5
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


def test_round_trip_of_one_hospital_keeps_values_and_weight(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor
) -> None:
    values = np.random.default_rng(1).uniform(-128.0, 128.0, 5000)  # two ciphertexts, negatives included
    chunks = encryptor.encrypt(values, weight=37)
    average, total_weight = decryptor.decrypt_average(chunks, values.size)
    assert total_weight == 37
    assert np.abs(average - values).max() <= DEFAULT_PARAMS.average_error_bound < PRECISION


def test_sum_of_three_hospitals_is_their_weighted_average(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    rng = np.random.default_rng(2)
    # More values than one chunk holds, so several chunk positions are added pairwise.
    n_values = DEFAULT_PARAMS.slots_per_chunk + 100
    updates = [rng.normal(0.0, 0.5, n_values).astype(np.float32) for _ in range(3)]
    weights = [1, 250, 40_000]
    uploads = [encryptor.encrypt(update, weight) for update, weight in zip(updates, weights, strict=True)]
    assert len(uploads[0]) == 2
    summed = [
        add_chunks(aggregator_key, add_chunks(aggregator_key, a, b), c)
        for a, b, c in zip(*uploads, strict=True)
    ]
    average, total_weight = decryptor.decrypt_average(summed, n_values)
    expected = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)
    assert total_weight == sum(weights)
    assert np.abs(average - expected).max() < PRECISION


bounded_value = st.floats(-DEFAULT_PARAMS.max_abs_value, DEFAULT_PARAMS.max_abs_value, allow_nan=False)
hospital_update = st.tuples(
    st.lists(bounded_value, min_size=3, max_size=3), st.integers(1, DEFAULT_PARAMS.max_weight)
)


@settings(max_examples=30, deadline=None)
@given(hospitals=st.lists(hospital_update, min_size=1, max_size=4))
def test_any_bounded_updates_average_within_the_error_bound(
    hospitals: list[tuple[list[float], int]],
    encryptor: UpdateEncryptor,
    decryptor: UpdateDecryptor,
    aggregator_key: AggregatorKey,
) -> None:
    uploads = [encryptor.encrypt(np.array(values), weight) for values, weight in hospitals]
    average, total_weight = decryptor.decrypt_average(sum_uploads(aggregator_key, uploads), 3)
    weights = [weight for _, weight in hospitals]
    expected = np.average([values for values, _ in hospitals], axis=0, weights=weights)
    assert total_weight == sum(weights)
    assert np.abs(average - expected).max() <= DEFAULT_PARAMS.average_error_bound + 1e-9


def test_every_chunk_stays_under_4_mib(encryptor: UpdateEncryptor, aggregator_key: AggregatorKey) -> None:
    values = np.zeros(DEFAULT_PARAMS.slots_per_chunk * 2)
    upload = encryptor.encrypt(values, weight=1)
    aggregate = sum_uploads(aggregator_key, [upload, upload])
    assert max(map(len, upload)) < MAX_CHUNK_BYTES
    assert max(map(len, aggregate)) < MAX_CHUNK_BYTES
    # Seeded symmetric ciphertexts: about 8 bytes per parameter, about twice float32.
    assert sum(map(len, upload)) / values.size < 10


def test_largest_values_and_weights_of_64_hospitals_decrypt_exactly(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    bound = DEFAULT_PARAMS.max_abs_value
    values = np.array([bound, -bound, 0.0, 2.0**-16, bound - 2.0**-16, -1.0])
    weight = DEFAULT_PARAMS.max_weight
    uploads = [encryptor.encrypt(values, weight) for _ in range(DEFAULT_PARAMS.max_parties)]
    summed = sum_uploads(aggregator_key, uploads)
    average, total_weight = decryptor.decrypt_average(summed, values.size)
    assert total_weight == DEFAULT_PARAMS.max_parties * weight
    assert np.abs(average - values).max() < PRECISION
    assert unpack_header(summed[0]).parties == DEFAULT_PARAMS.max_parties
    with pytest.raises(HeOverflowError, match="64"):
        add_chunks(aggregator_key, summed[0], uploads[0][0])


def test_one_beyond_the_bounds_is_refused_before_encryption(encryptor: UpdateEncryptor) -> None:
    with pytest.raises(HeOverflowError, match="128"):
        encryptor.encrypt(np.array([0.0, np.nextafter(128.0, np.inf)]), weight=1)
    with pytest.raises(HeOverflowError, match="128"):
        encryptor.encrypt(np.array([-128.5]), weight=1)
    with pytest.raises(HeOverflowError, match="65536"):
        encryptor.encrypt(np.array([1.0]), weight=DEFAULT_PARAMS.max_weight + 1)
    with pytest.raises(HeOverflowError):
        encryptor.encrypt(np.array([np.nan]), weight=1)
    with pytest.raises(ValueError):
        encryptor.encrypt(np.array([1.0]), weight=0)
    with pytest.raises(HeOverflowError):
        encryptor.encrypt_sums(np.array([DEFAULT_PARAMS.max_abs_sum_value(8) * 1.01]))


def test_sums_of_squares_of_clinical_values_are_representable(
    encryptor: UpdateEncryptor, decryptor: UpdateDecryptor, aggregator_key: AggregatorKey
) -> None:
    rng = np.random.default_rng(3)
    cholesterol = [rng.uniform(100.0, 600.0, 300) for _ in range(3)]
    statistics = [np.array([c.size, c.sum(), np.square(c).sum(), -c.sum()]) for c in cholesterol]
    uploads = [encryptor.encrypt_sums(row) for row in statistics]
    summed = sum_uploads(aggregator_key, uploads)
    totals = decryptor.decrypt_sums(summed, 4)
    expected = np.sum(statistics, axis=0)
    assert totals[0] == 900
    assert np.abs(totals - expected).max() <= 3 * 2.0**-9


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
