"""Bounds on what a hospital can inject: every hospital holds the secret key and can encrypt any
weight or value, so each agent checks the decrypted aggregate before it publishes a model.

The agents' real protocol and the real HE codec; the aggregator is the protocol tests' fake, which
adds real ciphertexts, with a hostile hospital's crafted upload added into chosen rounds.
"""

from __future__ import annotations

import threading

import numpy as np

from fibemrss.domain.feature_encoding import input_dim
from fibemrss.domain.torch_models import parameter_count
from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import UpdateCodec, UpdateEncryptor
from fibemrss.he.keys import AggregatorKey, HospitalKey
from services.hospital_agent.core.aggregate_bounds import AggregateBounds
from services.hospital_agent.core.protocol import Participation
from tests.unit.test_agent_protocol import (
    TASK,
    FakeAggregator,
    FakeGateway,
    FakeModelStore,
    keys,  # noqa: F401 - the module fixture
    participation,
    run_in_thread,
    synthetic_examples,
)


def crafted(key: HospitalKey, n_values: int, weight_slot: int, value_slot: int) -> list[bytes]:
    """An upload no honest encryptor makes: raw integers (weight first), past every bound it checks."""
    slots = np.full(n_values + 1, value_slot, dtype=np.int64)
    slots[0] = weight_slot
    encryptor = UpdateEncryptor(key)
    return encryptor._encrypt_slots(slots, ChunkKind.WEIGHTED_UPDATE, key.params.frac_bits, n_values, None)


def test_out_of_bound_aggregates_are_rejected_by_every_hospital_and_the_last_good_model_stays(
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    hospital_key, aggregator_key = keys
    n = parameter_count(TASK.model, input_dim(TASK))
    hostile = {
        # A weight no hospital may have (2^24 examples, the codec's bound is 2^10), values zero; a
        # digit holds at most 2^25, beyond it an integer spills into its neighbour as noise.
        2: crafted(hospital_key, n, weight_slot=2**24, value_slot=0),
        # A weight of 1 with every value 10^5 (the codec's bound is 8).
        3: crafted(hospital_key, n, weight_slot=1, value_slot=10**5 * 2**hospital_key.params.frac_bits),
    }
    agg = FakeAggregator(aggregator_key, rounds=4, failing=set(), hostile=hostile)
    stores = {h: FakeModelStore() for h in ("a", "b")}
    agents = {
        h: participation(h, agg.view(h), stores[h], hospital_key, seed=seed)[0]
        for h, seed in (("a", 1), ("b", 2))
    }
    threads = [run_in_thread(p, threading.Event()) for p in agents.values()]
    for t in threads:
        t.join(timeout=180)
    for h, p in agents.items():
        assert p.progress.done and p.progress.error == "", h
        assert [w.split(":")[0] for w in p.progress.warnings] == ["round 2", "round 3"]
        assert (
            "total weight" in p.progress.warnings[0] and "beyond the codec's bound" in p.progress.warnings[1]
        )
        # Rounds 2 and 3 published nothing; round 4 builds on round 1's model.
        assert sorted(stores[h].versions) == [1, 4]
    for version in (1, 4):
        np.testing.assert_array_equal(
            stores["a"].versions[version].model.params, stores["b"].versions[version].model.params
        )
        assert np.isfinite(stores["a"].versions[version].model.params).all()


def test_an_agent_caps_its_weight_at_the_codecs_maximum_and_says_so(
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    hospital_key, aggregator_key = keys
    agg = FakeAggregator(aggregator_key, rounds=1, failing=set())
    bounds = AggregateBounds(max_weight=10, max_abs_value=hospital_key.params.max_abs_value)
    agents = [
        Participation(
            h,
            TASK,
            FakeGateway(synthetic_examples(seed)),
            agg.view(h),
            UpdateCodec(hospital_key),
            FakeModelStore(),
            retry_delay=lambda _: 0.01,
            bounds=bounds,
        )
        for h, seed in (("a", 1), ("b", 2))
    ]
    threads = [run_in_thread(p, threading.Event()) for p in agents]
    for t in threads:
        t.join(timeout=120)
    for p in agents:
        assert p.progress.done and p.progress.error == ""
        assert p.progress.train_examples > 10
        assert p.progress.warnings == [
            f"weight capped at 10 (the codec's maximum) for {p.progress.train_examples} training examples"
        ]
