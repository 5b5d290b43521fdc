"""Federations of different studies at once on one aggregator (real gRPC, PostgreSQL and HE).

A hospital in several studies talks to one aggregator for all of them (docs/studies.md, "Several
studies at one hospital"). The coordinator keys every round by task; these tests show what that
must give: each federation closes its rounds on its own quorum with its own sum (the same
hospital's uploads to two studies never mix), a stalled, refused or failed round of one study
leaves the other's rounds closing at once, and each federation's status and history is its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import generate_keys, load_hospital_key
from fibemrss.he.params import DEFAULT_PARAMS
from tests.integration.test_aggregator_rounds import Aggregator, start_aggregator

HEART, HYPERTENSION = "heart-test", "hypertension-test"
# The two studies differ in their model's size, hospitals, quorum and deadline.
SIZES = {HEART: 12, HYPERTENSION: 5}
HOSPITALS = {HEART: ["a", "b", "c"], HYPERTENSION: ["a", "b", "c", "d"]}


@pytest.fixture
def aggregator(fresh_database, keys) -> Iterator[Aggregator]:
    agg = start_aggregator(fresh_database("aggregator"), load_hospital_key(keys[0]), keys[1])
    yield agg
    agg.stop()


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keys()


def start(agg: Aggregator, task: str, quorum: int, deadline: float, rounds: int = 4) -> None:
    agg.stub.StartFederation(
        pb.StartFederationRequest(
            task=task,
            rounds=rounds,
            quorum=quorum,
            grace_seconds=0.0,
            deadline_seconds=deadline,
            hospitals=HOSPITALS[task],
            min_contributors=min(quorum, 3),
        )
    )


def submit(agg: Aggregator, task: str, hospital: str, number: int, values: np.ndarray, weight: int) -> None:
    chunks = UpdateEncryptor(agg.key).encrypt(values, weight)
    agg.stub.SubmitUpdate(
        iter(
            pb.SubmitUpdateRequest(
                task=task, round=number, hospital=hospital, total_chunks=len(chunks), index=i, ciphertext=c
            )
            for i, c in enumerate(chunks)
        ),
        timeout=30,
    )


def wait_round(agg: Aggregator, task: str, number: int, seconds: float = 10) -> pb.RoundInfo:
    return agg.stub.GetRound(
        pb.GetRoundRequest(task=task, wait_for_round=number, wait_seconds=seconds), timeout=seconds + 10
    ).round


def decrypt(agg: Aggregator, task: str, number: int) -> tuple[np.ndarray, int]:
    chunks = [
        c.ciphertext for c in agg.stub.FetchAggregate(pb.FetchAggregateRequest(task=task, round=number))
    ]
    return UpdateDecryptor(agg.key).decrypt_average(chunks, SIZES[task])


def history(agg: Aggregator, task: str) -> list[pb.RoundInfo]:
    return list(agg.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=task)).status.history)


def test_two_studies_close_their_own_rounds_with_their_own_sums(aggregator: Aggregator) -> None:
    start(aggregator, HEART, quorum=3, deadline=30)
    start(aggregator, HYPERTENSION, quorum=4, deadline=30)
    rng = np.random.default_rng(25)
    vectors = {(t, h): rng.normal(size=SIZES[t]) for t in SIZES for h in HOSPITALS[t]}
    weights = {
        (t, h): 10 + 7 * i + (50 if t == HYPERTENSION else 0)
        for t in SIZES
        for i, h in enumerate(HOSPITALS[t])
    }
    # Interleaved: the same hospital uploads to both studies' round 0 in turn.
    for h in ["a", "b", "c", "d"]:
        for task in (HEART, HYPERTENSION):
            if h in HOSPITALS[task]:
                submit(aggregator, task, h, 0, vectors[task, h], weights[task, h])
    for task in (HEART, HYPERTENSION):
        info = wait_round(aggregator, task, 1)
        assert (info.task, info.round, info.base_round) == (task, 1, 0)
        average, total = decrypt(aggregator, task, 0)
        members = HOSPITALS[task]
        assert total == sum(weights[task, h] for h in members)
        expected = sum(vectors[task, h] * weights[task, h] for h in members) / total
        # Exact up to the codec's stated rounding: each party rounds w*v*2^frac_bits once.
        np.testing.assert_allclose(
            average, expected, rtol=0, atol=DEFAULT_PARAMS.average_error(len(members), total) * (1 + 1e-9)
        )
        assert [r.state for r in history(aggregator, task)][:1] == [pb.ROUND_STATE_CLOSED]


def test_a_stalled_round_of_one_study_does_not_hold_back_the_other(aggregator: Aggregator) -> None:
    # The hypertension round waits for a fourth hospital that never comes (deadline 4 s); the heart
    # study's rounds close at quorum meanwhile, each as soon as its third upload is in.
    start(aggregator, HYPERTENSION, quorum=4, deadline=4.0, rounds=2)
    start(aggregator, HEART, quorum=3, deadline=30, rounds=4)
    for h in ("a", "b", "c"):
        submit(aggregator, HYPERTENSION, h, 0, np.ones(SIZES[HYPERTENSION]), 2)
    stalled_since = time.monotonic()
    closed_at = []
    for number in range(3):
        for h in HOSPITALS[HEART]:
            submit(aggregator, HEART, h, number, np.full(SIZES[HEART], float(number)), 3)
        began = time.monotonic()
        assert wait_round(aggregator, HEART, number + 1).round == number + 1
        closed_at.append(time.monotonic() - began)
    # Three heart rounds closed while the hypertension round was still open, well inside its
    # deadline: none of them waited for it.
    assert time.monotonic() - stalled_since < 4.0
    assert max(closed_at) < 2.0, closed_at
    status = aggregator.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=HYPERTENSION)).status
    assert status.current.round == 0 and sorted(status.current.submitted) == ["a", "b", "c"]
    # The stalled round fails at its own deadline, and only its own federation records it.
    assert wait_round(aggregator, HYPERTENSION, 1).round == 1
    failed = history(aggregator, HYPERTENSION)[0]
    assert failed.state == pb.ROUND_STATE_FAILED and "deadline" in failed.failure
    assert all(r.state == pb.ROUND_STATE_CLOSED for r in history(aggregator, HEART)[:3])
    average, total = decrypt(aggregator, HEART, 2)
    assert total == 9
    np.testing.assert_allclose(average, np.full(SIZES[HEART], 2.0), atol=1e-4)


def test_an_upload_refused_in_one_study_leaves_the_other_untouched(aggregator: Aggregator) -> None:
    start(aggregator, HEART, quorum=3, deadline=30)
    start(aggregator, HYPERTENSION, quorum=4, deadline=30)
    submit(aggregator, HEART, "a", 0, np.ones(SIZES[HEART]), 1)
    # A junk upload and one from a hospital outside the study: refused, naming the problem.
    with pytest.raises(grpc.RpcError) as junk:
        aggregator.stub.SubmitUpdate(
            iter(
                [
                    pb.SubmitUpdateRequest(
                        task=HYPERTENSION, round=0, hospital="a", total_chunks=1, ciphertext=b"x"
                    )
                ]
            )
        )
    assert junk.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as outsider:
        submit(aggregator, HEART, "d", 0, np.ones(SIZES[HEART]), 1)
    assert outsider.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The other study's hospitals go on; the heart round closes with its three honest uploads.
    for h in ("b", "c"):
        submit(aggregator, HEART, h, 0, np.ones(SIZES[HEART]), 1)
    assert wait_round(aggregator, HEART, 1).round == 1
    assert decrypt(aggregator, HEART, 0)[1] == 3
    status = aggregator.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=HYPERTENSION)).status
    assert status.current.round == 0 and list(status.current.submitted) == []


def _run_federation(agg: Aggregator, values: dict[str, float]) -> None:
    """Rounds 0 and 1 of HEART, each with every hospital's `values` (weight 1)."""
    for number in (0, 1):
        for h in HOSPITALS[HEART]:
            submit(agg, HEART, h, number, np.full(SIZES[HEART], values[h]), 1)
        info = wait_round(agg, HEART, number + 1)
        assert info.round == number + 1 or info.federation_done, info


def test_a_finished_study_runs_again_as_a_new_federation_and_the_old_history_stays(
    aggregator: Aggregator,
) -> None:
    start(aggregator, HEART, quorum=3, deadline=30, rounds=1)
    first = aggregator.stub.GetRound(pb.GetRoundRequest(task=HEART)).round.federation_id
    # Running: started again with the same settings it is the same federation; with others, refused.
    start(aggregator, HEART, quorum=3, deadline=30, rounds=1)
    assert aggregator.stub.GetRound(pb.GetRoundRequest(task=HEART)).round.federation_id == first
    with pytest.raises(grpc.RpcError) as running:
        start(aggregator, HEART, quorum=3, deadline=30, rounds=2)
    assert running.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    _run_federation(aggregator, {"a": 1.0, "b": 2.0, "c": 3.0})
    done = aggregator.stub.GetRound(pb.GetRoundRequest(task=HEART)).round
    assert done.federation_done and done.federation_id == first

    # Finished: the study runs again (other settings allowed: the next season's training).
    start(aggregator, HEART, quorum=3, deadline=30, rounds=2)
    status = aggregator.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=HEART)).status
    second = status.current.federation_id
    assert second != first and len(second) == 16
    assert (status.rounds, status.current.round, status.current.federation_done) == (2, 0, False)
    assert [(r.round, r.state) for r in status.history] == [(0, pb.ROUND_STATE_OPEN)]
    # The old federation's history and sums stay readable under its archived name.
    archived = f"{HEART}@{first.hex()}"
    old = aggregator.stub.GetFederationStatus(pb.GetFederationStatusRequest(task=archived)).status
    assert [(r.round, r.state) for r in old.history] == [
        (0, pb.ROUND_STATE_CLOSED),
        (1, pb.ROUND_STATE_CLOSED),
    ]
    assert old.current.federation_done and old.current.federation_id == first

    def average(task: str, number: int) -> tuple[np.ndarray, int]:
        chunks = [
            c.ciphertext
            for c in aggregator.stub.FetchAggregate(pb.FetchAggregateRequest(task=task, round=number))
        ]
        return UpdateDecryptor(aggregator.key).decrypt_average(chunks, SIZES[HEART])

    # The new federation's rounds are summed afresh: round 0 of the new federation holds only its
    # own uploads (none of the old round 0), and it completes too.
    for number in (0, 1):
        for h in HOSPITALS[HEART]:
            submit(aggregator, HEART, h, number, np.full(SIZES[HEART], 1.5 * (number + 1)), 1)
        wait_round(aggregator, HEART, number + 1)
        values, total = average(HEART, number)
        assert total == 3
        np.testing.assert_allclose(values, np.full(SIZES[HEART], 1.5 * (number + 1)), atol=1e-4)
    for h in HOSPITALS[HEART]:
        submit(aggregator, HEART, h, 2, np.full(SIZES[HEART], 5.0), 1)
    final = wait_round(aggregator, HEART, 3)
    assert final.federation_done and final.federation_id == second and final.round == 2
    values, total = average(archived, 1)
    assert total == 3
    np.testing.assert_allclose(values, np.full(SIZES[HEART], 2.0), atol=1e-4)
