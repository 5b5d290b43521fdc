"""The aggregator's running sums (services/aggregator/core/running_sums.py) with real HE: each
checked chunk goes into the round's sum as it streams in, an upload that does not commit comes
out again bit for bit, a round that closes while an upload is committing waits for it, one that
closes while an upload still streams takes that upload out, and anything that does not cover
exactly the round's uploads sends the round to the database path (None). Every test runs with the
sums loaded (a small round's) and kept serialized (a large round's: CiphertextAdder.new_sum)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from fibemrss.he.codec import ChunkAccumulator, SerializedChunkSum, UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.params import DEFAULT_PARAMS
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.running_sums import RunningSums, Upload

# Three chunk positions: a refused upload can stop in the middle of its stream.
N = 2 * DEFAULT_PARAMS.slots_per_chunk * DEFAULT_PARAMS.values_per_slot + 50


class SerializedSums(CiphertextAdder):
    """The adder as it is for a round too large to keep its sums loaded (whatever this one's size)."""

    def new_sum(self, chunk_count: int) -> SerializedChunkSum:  # type: ignore[override]
        return SerializedChunkSum(self._key)


@pytest.fixture(scope="module", params=["loaded", "serialized"])
def keys(request: pytest.FixtureRequest) -> tuple[HospitalKey, CiphertextAdder]:
    hospital, aggregator = generate_keys()
    adder = CiphertextAdder if request.param == "loaded" else SerializedSums
    return load_hospital_key(hospital), adder(load_aggregator_key(aggregator))


def test_a_small_rounds_sums_stay_loaded_and_a_large_rounds_serialized(keys) -> None:  # type: ignore[no-untyped-def]
    _, adder = keys
    plain = CiphertextAdder(adder._key)  # noqa: SLF001 - the same key
    assert isinstance(plain.new_sum(3), ChunkAccumulator)  # 3 chunks: about 19 MB loaded
    assert isinstance(plain.new_sum(39), SerializedChunkSum)  # 10M parameters: about 240 MB loaded


@pytest.fixture(scope="module")
def uploads(keys) -> dict[str, list[bytes]]:  # type: ignore[no-untyped-def]
    key, _ = keys
    rng = np.random.default_rng(7)
    encryptor = UpdateEncryptor(key)
    return {h: encryptor.encrypt(rng.normal(0.0, 1.0, N), w) for h, w in (("a", 2), ("b", 5), ("c", 11))}


def stream(sums: RunningSums, adder: CiphertextAdder, upload: Upload, chunks: list[bytes]) -> None:
    """What the coordinator does with each chunk as it arrives: check it, then add it."""
    check = adder.upload_check(len(chunks), None)
    for i, chunk in enumerate(chunks):
        loaded = check.add(i, chunk)
        assert loaded is not None
        sums.add(upload, i, chunk, loaded)
    check.finish()


def accepted(
    sums: RunningSums, adder: CiphertextAdder, hospital: str, chunks: list[bytes], number: int = 0
) -> None:
    upload = sums.begin("t", number, hospital)
    stream(sums, adder, upload, chunks)
    sums.committing(upload)
    sums.commit(upload)


def expected_sum(adder: CiphertextAdder, *uploads: list[bytes]) -> list[bytes]:
    """The sum computed apart, position by position (addition modulo q: any order, same bytes)."""
    return [adder.add(parts) for parts in zip(*uploads, strict=True)]


def begin_with_first_chunk(
    sums: RunningSums, adder: CiphertextAdder, hospital: str, chunk: bytes
) -> tuple[Any, Any]:
    """An upload of three chunks begun by `hospital`, its first chunk checked and added."""
    handle = sums.begin("t", 0, hospital)
    check = adder.upload_check(3, None)
    loaded = check.add(0, chunk)
    assert loaded is not None
    sums.add(handle, 0, chunk, loaded)
    return handle, check


def test_an_upload_refused_mid_stream_or_at_commit_leaves_the_sum_bit_for_bit(keys, uploads) -> None:  # type: ignore[no-untyped-def]
    key, adder = keys
    sums = RunningSums(adder.new_sum, settle_seconds=5)
    accepted(sums, adder, "a", uploads["a"])
    # c's second chunk is corrupt: its first one was already added, and comes out again.
    refused, check = begin_with_first_chunk(sums, adder, "c", uploads["c"][0])
    corrupt = uploads["c"][1][:40] + b"\xff\xff" + uploads["c"][1][42:]
    assert check.add(1, corrupt) is None
    assert check.add(2, uploads["c"][2]) is None  # fine, but the upload is already refused
    sums.withdraw(refused)
    # b streams whole, then its transaction does not commit.
    rolled_back = sums.begin("t", 0, "b")
    stream(sums, adder, rolled_back, uploads["b"])
    sums.committing(rolled_back)
    sums.withdraw(rolled_back)
    again = adder.upload_check(3, None).add(0, uploads["b"][0])
    assert again is not None
    sums.add(rolled_back, 0, uploads["b"][0], again)  # a withdrawn upload adds nothing any more
    taken = sums.take("t", 0, frozenset("a"), 3)
    assert taken is not None
    assert [acc.result() for acc in taken] == expected_sum(adder, uploads["a"])
    average, weight = UpdateDecryptor(key).decrypt_average([acc.result() for acc in taken], N)
    assert weight == 2


def test_an_upload_still_streaming_when_the_round_closes_is_taken_out(keys, uploads) -> None:  # type: ignore[no-untyped-def]
    _, adder = keys
    sums = RunningSums(adder.new_sum, settle_seconds=5)
    accepted(sums, adder, "a", uploads["a"])
    accepted(sums, adder, "b", uploads["b"])
    late, check = begin_with_first_chunk(sums, adder, "c", uploads["c"][0])
    taken = sums.take("t", 0, frozenset("ab"), 3)  # the round aggregates: c can no longer commit
    assert taken is not None
    before = [acc.result() for acc in taken]
    assert before == expected_sum(adder, uploads["a"], uploads["b"])
    # c's later chunks and its refusal touch nothing, neither the taken sum nor a new one.
    loaded = check.add(1, uploads["c"][1])
    assert loaded is not None
    sums.add(late, 1, uploads["c"][1], loaded)
    sums.withdraw(late)
    assert [acc.result() for acc in taken] == before
    assert sums.take("t", 0, frozenset("ab"), 3) is None


def test_take_waits_for_a_committing_upload(keys, uploads) -> None:  # type: ignore[no-untyped-def]
    key, adder = keys
    sums = RunningSums(adder.new_sum, settle_seconds=10)
    accepted(sums, adder, "a", uploads["a"])
    upload = sums.begin("t", 0, "b")
    stream(sums, adder, upload, uploads["b"])
    sums.committing(upload)  # b's transaction commits after the round starts closing
    taken: list[object] = []
    closing = threading.Thread(target=lambda: taken.append(sums.take("t", 0, frozenset("ab"), 3)))
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # waiting for b, not summing without it
    sums.commit(upload)
    closing.join(5)
    [accumulators] = taken
    assert accumulators is not None
    _, weight = UpdateDecryptor(key).decrypt_average([acc.result() for acc in accumulators], N)  # type: ignore[attr-defined]
    assert weight == 7


def test_what_the_running_sum_does_not_cover_goes_to_the_database(keys, uploads) -> None:  # type: ignore[no-untyped-def]
    _, adder = keys
    sums = RunningSums(adder.new_sum, settle_seconds=0.2)
    accepted(sums, adder, "a", uploads["a"], number=1)
    # The round closed with an upload this process never added (a restart): the database sums it.
    assert sums.take("t", 1, frozenset("ab"), 3) is None
    committing = sums.begin("t", 2, "a")
    sums.committing(committing)  # never settles within settle_seconds
    assert sums.take("t", 2, frozenset(), 0) is None
    # A sum that refuses a chunk (another layout) is broken: the database path fails the round.
    accepted(sums, adder, "a", uploads["a"], number=3)
    other = UpdateEncryptor(keys[0]).encrypt(np.ones(N + 1), 1)
    accepted(sums, adder, "b", other, number=3)
    assert sums.take("t", 3, frozenset("ab"), 3) is None
    # A new federation of the task drops its sums, and an upload still streaming into them.
    streaming = sums.begin("t", 4, "a")
    accepted(sums, adder, "b", uploads["b"], number=4)
    sums.forget("t")
    stream(sums, adder, streaming, uploads["a"])
    sums.committing(streaming)
    sums.commit(streaming)
    assert sums.take("t", 4, frozenset("ab"), 3) is None
