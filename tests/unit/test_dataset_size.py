"""Dataset sizes cannot be recovered from round sums: the weight is a noised, quantized count
drawn once per federation, and differencing rounds with and without a hospital yields only it."""

from __future__ import annotations

import numpy as np

from fibemrss.domain.dataset_size import discrete_laplace, federation_weight
from fibemrss.he.codec import ChunkAccumulator, UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import generate_keys, load_aggregator_key, load_hospital_key

COUNTS = {"cleveland": 242, "hungary": 235, "switzerland": 98, "va": 160}
SCALE, QUANTUM = 8.0, 8


def weight(hospital: str, federation_id: bytes, count: int | None = None) -> int:
    return federation_weight(
        COUNTS[hospital] if count is None else count,
        hospital.encode() * 4,  # the hospital's own secret
        federation_id,
        "heart-disease-v1",
        "noised",
        SCALE,
        QUANTUM,
        2**16,
    )


def test_differencing_rounds_with_and_without_a_hospital_does_not_give_its_count() -> None:
    hospital_key_bytes, aggregator_key_bytes = generate_keys()
    key, agg = load_hospital_key(hospital_key_bytes), load_aggregator_key(aggregator_key_bytes)
    encryptor, decryptor = UpdateEncryptor(key), UpdateDecryptor(key)
    federation = b"\x01" * 16

    def total_weight(hospitals: list[str]) -> int:
        acc = ChunkAccumulator(agg)
        for h in hospitals:
            (chunk,) = encryptor.encrypt(np.zeros(8), weight(h, federation))
            acc.add(chunk)
        return decryptor.decrypt_average([acc.result()], 8)[1]

    # The attacker (any hospital) sees the total weight of a round with the four and of a round
    # without Switzerland, and subtracts.
    everyone = total_weight(list(COUNTS))
    without = total_weight(["cleveland", "hungary", "va"])
    recovered = everyone - without
    assert recovered == weight("switzerland", federation)  # all it learns: the one fixed draw
    # More rounds of the same federation give the same draw again: nothing to average away.
    assert total_weight(list(COUNTS)) - total_weight(["cleveland", "hungary", "va"]) == recovered
    assert recovered % QUANTUM == 0

    # Over many federations the draw misses the true count: rarely exact, off by ~ scale.
    errors = np.array(
        [weight("switzerland", i.to_bytes(16, "big")) - COUNTS["switzerland"] for i in range(2000)]
    )
    assert np.mean(errors == 0) < 0.1
    assert 6 < np.std(errors) < 16  # discrete Laplace of scale 8 (sd 11.3) plus rounding to 8
    assert abs(np.mean(errors)) < 1.5
    # Counts one patient apart are nearly indistinguishable: the draws' distributions overlap.
    shifted = np.array(
        [weight("switzerland", i.to_bytes(16, "big"), COUNTS["switzerland"] + 1) for i in range(2000)]
    )
    assert abs(np.mean(shifted) - np.mean(errors + COUNTS["switzerland"])) < 2.0


def test_the_weight_is_fixed_per_federation_and_exact_counts_are_still_available() -> None:
    federation = b"\x02" * 16
    assert weight("va", federation) == weight("va", federation)  # a restarted agent draws the same
    assert weight("va", federation) != weight("va", b"\x03" * 16) or weight("va", b"\x04" * 16) != weight(
        "va", federation
    )
    assert federation_weight(160, b"s", federation, "t", "examples", SCALE, QUANTUM, 2**16) == 160
    assert federation_weight(5, b"s", federation, "t", "noised", SCALE, QUANTUM, 2**16) >= QUANTUM
    draws = np.array([discrete_laplace(i.to_bytes(4, "big"), SCALE) for i in range(4000)])
    expected_var = 2 * np.exp(-1 / SCALE) / (1 - np.exp(-1 / SCALE)) ** 2
    assert abs(np.var(draws) / expected_var - 1) < 0.15
