"""Pairwise masks on top of the HE codec: the cohort's sum is exact, no upload decrypts to its
update, not with the shared key, not with two of four hospitals colluding."""

from __future__ import annotations

import numpy as np
import pytest

from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import ChunkAccumulator, UpdateDecryptor, UpdateEncryptor, slot_count, unpack_slots
from fibemrss.he.errors import HeFormatError, HeKeyError
from fibemrss.he.keys import AggregatorKey, HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.masking import (
    MaskContext,
    MaskKeyPair,
    cohort_mask,
    expand_mask,
    pairwise_seed,
    round_key_seed,
)
from fibemrss.he.params import DEFAULT_PARAMS

T = DEFAULT_PARAMS.plain_modulus
CONTEXT = MaskContext(federation_id=b"f" * 16, task="t", round=3, attempt=1)
NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def keys() -> tuple[HospitalKey, AggregatorKey]:
    hospital, aggregator = generate_keys()
    return load_hospital_key(hospital), load_aggregator_key(aggregator)


def key_pairs(context: MaskContext = CONTEXT) -> dict[str, MaskKeyPair]:
    return {n: MaskKeyPair(round_key_seed(n.encode() * 32, context)) for n in NAMES}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]))


def masked_uploads(
    hospital_key: HospitalKey, updates: dict[str, np.ndarray], weights: dict[str, int]
) -> tuple[dict[str, list[bytes]], dict[str, MaskKeyPair]]:
    pairs = key_pairs()
    public = {n: p.public_key for n, p in pairs.items()}
    encryptor = UpdateEncryptor(hospital_key)
    n_slots = slot_count(ChunkKind.WEIGHTED_UPDATE, next(iter(updates.values())).size)
    uploads = {
        n: encryptor.encrypt(updates[n], weights[n], cohort_mask(pairs[n], n, public, CONTEXT, n_slots, T))
        for n in updates
    }
    return uploads, pairs


def add_all(aggregator_key: AggregatorKey, uploads: list[list[bytes]]) -> list[bytes]:
    out = []
    for i in range(len(uploads[0])):
        acc = ChunkAccumulator(aggregator_key)
        for u in uploads:
            acc.add(u[i])
        out.append(acc.result())
    return out


def test_masks_are_uniform_deterministic_and_cancel_over_the_cohort() -> None:
    pairs = key_pairs()
    public = {n: p.public_key for n, p in pairs.items()}
    masks = [cohort_mask(pairs[n], n, public, CONTEXT, 5000, T) for n in NAMES]
    assert not np.any(sum(m for m in masks) % T)
    assert not np.any(sum(m for m in masks[:3]) % T == 0)  # a sum missing one member stays masked
    np.testing.assert_array_equal(masks[0], cohort_mask(pairs["a"], "a", public, CONTEXT, 5000, T))
    # Each pair agrees on its seed; another attempt of the same round gives unrelated masks.
    assert pairwise_seed(pairs["a"], "a", "b", public["b"], CONTEXT) == pairwise_seed(
        pairs["b"], "b", "a", public["a"], CONTEXT
    )
    retry = MaskContext(CONTEXT.federation_id, CONTEXT.task, CONTEXT.round, attempt=2)
    assert correlation(masks[0], cohort_mask(pairs["a"], "a", public, retry, 5000, T)) < 0.05
    one = expand_mask(b"k" * 32, 200_000, T)
    assert one.min() >= 0 and one.max() < T
    # Uniform on [0, t): mean t/2 and each of 16 bins near 1/16 of the draws.
    assert abs(one.mean() / T - 0.5) < 0.005
    counts = np.bincount((one * 16 // T).astype(np.int64), minlength=16)
    assert np.all(np.abs(counts / one.size - 1 / 16) < 0.004)


def test_a_cohort_member_refuses_a_key_list_with_a_foreign_key_in_its_place() -> None:
    pairs = key_pairs()
    public = {n: p.public_key for n, p in pairs.items()}
    public["a"] = pairs["b"].public_key
    with pytest.raises(HeKeyError, match="not this hospital's key"):
        cohort_mask(pairs["a"], "a", public, CONTEXT, 10, T)
    with pytest.raises(HeKeyError, match="32 bytes"):
        pairs["a"].shared_secret(b"short")


def test_one_key_and_every_upload_decrypt_no_update_while_the_sum_is_exact_over_1m_parameters(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    hospital_key, aggregator_key = keys
    rng = np.random.default_rng(7)
    n = 1_000_000
    updates = {name: rng.uniform(-1, 1, n) for name in NAMES}
    weights = {"a": 303, "b": 294, "c": 123, "d": 200}
    uploads, pairs = masked_uploads(hospital_key, updates, weights)
    decryptor = UpdateDecryptor(hospital_key)

    # The aggregator's store plus the shared secret key: each upload decrypts to noise.
    def integers(slots: np.ndarray) -> np.ndarray:  # the weight, then the values, two a slot
        return unpack_slots(slots, hospital_key.params, n + 1)

    for name in NAMES:
        seen = integers(decryptor.decrypt_slots(uploads[name], n))
        assert correlation(seen[1:], updates[name]) < 0.01
        assert seen[0] != weights[name]
    # Two hospitals colluding (a, b) remove every mask they share with c; c's pairwise mask with
    # the honest d still hides its update.
    public = {k: p.public_key for k, p in pairs.items()}
    n_slots = slot_count(ChunkKind.WEIGHTED_UPDATE, n, hospital_key.params)
    seen_c = decryptor.decrypt_slots(uploads["c"], n)

    def unmask_c(colluders: str) -> np.ndarray:
        known = np.zeros(n_slots, dtype=np.int64)
        for colluder in colluders:
            m = expand_mask(pairwise_seed(pairs[colluder], colluder, "c", public["c"], CONTEXT), n_slots, T)
            known = (known + (m if colluder < "c" else -m)) % T  # c added the negation of this term
        unmasked = (seen_c.astype(np.int64) % T + known) % T
        return integers(np.where(unmasked > T // 2, unmasked - T, unmasked))

    assert correlation(unmask_c("ab")[1:], updates["c"]) < 0.01
    # The attack itself is right: with d's seed too (no honest peer left) c's update comes out.
    everyone = unmask_c("abd")
    assert everyone[0] == weights["c"] and correlation(everyone[1:], updates["c"]) > 0.999
    # A sum that misses one member (a, b, c without d) is still masked.
    partial = add_all(aggregator_key, [uploads[k] for k in ("a", "b", "c")])
    assert (
        correlation(integers(decryptor.decrypt_slots(partial, n))[1:], sum(updates[k] for k in "abc")) < 0.01
    )

    # The whole cohort's sum is the weighted average, exact to the codec's precision.
    total = add_all(aggregator_key, [uploads[k] for k in NAMES])
    average, total_weight = decryptor.decrypt_average(total, n, min_parties=3)
    expected = sum(weights[k] * updates[k] for k in NAMES) / sum(weights.values())
    assert total_weight == sum(weights.values())
    assert np.max(np.abs(average - expected)) <= hospital_key.params.average_error(4, total_weight)
    # Colluders a and b, knowing their own updates, learn c + d together but neither alone.


def test_agents_refuse_to_decrypt_a_sum_of_fewer_contributors_than_the_minimum(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    hospital_key, aggregator_key = keys
    encryptor = UpdateEncryptor(hospital_key)
    two = add_all(aggregator_key, [encryptor.encrypt(np.ones(10), 5), encryptor.encrypt(np.zeros(10), 5)])
    with pytest.raises(HeFormatError, match="fewer than the minimum 3"):
        UpdateDecryptor(hospital_key).decrypt_average(two, 10, min_parties=3)
    average, _ = UpdateDecryptor(hospital_key).decrypt_average(two, 10, min_parties=2)
    np.testing.assert_allclose(average, 0.5, atol=hospital_key.params.average_error(2, 10))
