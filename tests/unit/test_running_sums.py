"""The aggregator's running sums (services/aggregator/core/running_sums.py) with real HE: a
committed upload's own sums are added in, a round that closes while an upload is between its
commit and its fold waits for it, and anything that does not cover exactly the round's uploads
sends the round to the database path (None)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.running_sums import RunningSums


@pytest.fixture(scope="module")
def keys() -> tuple[HospitalKey, CiphertextAdder]:
    hospital, aggregator = generate_keys()
    return load_hospital_key(hospital), CiphertextAdder(load_aggregator_key(aggregator))


def _checked(adder: CiphertextAdder, chunks: list[bytes]) -> dict[int, object]:
    check = adder.upload_check(len(chunks), None)
    for i, chunk in enumerate(chunks):
        assert check.add(i, chunk)
    check.finish()
    return dict(check.sums)


def test_take_waits_for_a_committed_upload_still_being_added(keys) -> None:  # type: ignore[no-untyped-def]
    key, adder = keys
    sums = RunningSums(adder.new_accumulator, settle_seconds=10)
    a = UpdateEncryptor(key).encrypt(np.full(5, 1.0), 2)
    b = UpdateEncryptor(key).encrypt(np.full(5, 4.0), 1)
    sums.reserve("t", 0)
    sums.fold("t", 0, "a", _checked(adder, a))  # type: ignore[arg-type]
    sums.reserve("t", 0)  # b committed; its fold comes after the round starts closing
    taken: list[object] = []
    closing = threading.Thread(target=lambda: taken.append(sums.take("t", 0, frozenset("ab"), len(a))))
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # waiting for b, not summing without it
    sums.fold("t", 0, "b", _checked(adder, b))  # type: ignore[arg-type]
    closing.join(5)
    [accumulators] = taken
    assert accumulators is not None
    average, weight = UpdateDecryptor(key).decrypt_average([acc.result() for acc in accumulators], 5)  # type: ignore[attr-defined]
    assert weight == 3
    np.testing.assert_allclose(average, np.full(5, 2.0), atol=key.params.average_error_bound)


def test_a_released_or_missing_upload_sends_the_round_to_the_database(keys) -> None:  # type: ignore[no-untyped-def]
    key, adder = keys
    sums = RunningSums(adder.new_accumulator, settle_seconds=0.2)
    a = UpdateEncryptor(key).encrypt(np.full(5, 1.0), 2)
    sums.reserve("t", 0)
    sums.fold("t", 0, "a", _checked(adder, a))  # type: ignore[arg-type]
    sums.reserve("t", 0)
    sums.release("t", 0)  # b's transaction rolled back: nothing of it in the sum
    assert sums.take("t", 0, frozenset("a"), len(a)) is not None
    sums.reserve("t", 1)
    sums.fold("t", 1, "a", _checked(adder, a))  # type: ignore[arg-type]
    # The round closed with an upload this process never added (a restart): the database sums it.
    assert sums.take("t", 1, frozenset("ab"), len(a)) is None
    sums.reserve("t", 2)  # never settles within settle_seconds
    assert sums.take("t", 2, frozenset(), 0) is None
