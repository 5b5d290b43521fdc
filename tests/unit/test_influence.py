"""The study's influence bounds and the validation gate (services/hospital_agent/core/influence.py):
an honest round always passes, through the real codec's rounding; what lies beyond is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.codec import ChunkAccumulator, UpdateCodec
from fibemrss.he.keys import generate_keys, load_aggregator_key, load_hospital_key
from services.hospital_agent.core.aggregate_bounds import AggregateRejected
from services.hospital_agent.core.influence import Best, check_influence, clip_update, gate
from services.hospital_agent.core.personalization import ValidationScore

TASK = dataclasses.replace(HEART_DISEASE_V1, max_weight=200, max_update_norm=0.5)


def test_clipped_honest_updates_pass_through_the_real_codec_and_a_step_beyond_is_refused() -> None:
    hospital, aggregator = generate_keys()
    codec, key = UpdateCodec(load_hospital_key(hospital)), load_aggregator_key(aggregator)
    rng = np.random.default_rng(7)
    base = rng.normal(0, 1, 300)
    # Four honest updates pointing the same way, each clipped to exactly the bound: the worst case.
    direction = rng.normal(0, 1, 300)
    updates = [clip_update(base, base + (3 + i) * direction, TASK.max_update_norm) for i in range(4)]
    assert all(norm > 0.5 for _, norm in updates)
    acc = ChunkAccumulator(key)
    for params, _ in updates:
        (chunk,) = codec.encrypt(params, 200)
        acc.add(chunk)
    average, total = codec.decrypt_average([acc.result()], 300)
    assert np.linalg.norm(average - base) == pytest.approx(0.5, abs=1e-3)
    check_influence(TASK, base, average, total, 4, codec.params.frac_bits)  # passes
    with pytest.raises(AggregateRejected, match="moves the global model"):
        check_influence(TASK, base, base + 1.01 * (average - base), total, 4, codec.params.frac_bits)
    with pytest.raises(AggregateRejected, match="total weight 801"):
        check_influence(TASK, base, average, 801, 4, codec.params.frac_bits)
    unbounded = dataclasses.replace(TASK, max_weight=None, max_update_norm=None)
    check_influence(unbounded, base, base + 100.0, 4 * 65_536, 4, codec.params.frac_bits)  # today's


def test_the_gate_refuses_only_a_model_worse_on_both_counts() -> None:
    best = Best(accuracy=0.80, log_loss=0.45)
    assert gate(ValidationScore(0.79, 0.60, 40), best, 0.02).accept  # within the tolerance
    assert gate(ValidationScore(0.75, 0.44, 40), best, 0.02).accept  # two rows down, log-loss better
    assert not gate(ValidationScore(0.75, 0.47, 40), best, 0.02).accept  # worse on both
    assert Best(0.80, 0.45).with_(ValidationScore(0.70, 0.40, 40)) == Best(0.80, 0.40)
