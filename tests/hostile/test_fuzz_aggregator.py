"""Generated requests for every aggregator RPC, against a real aggregator process over mutual TLS:
never UNKNOWN or INTERNAL, and a refused upload leaves nothing stored. The number of examples per
RPC is FIBEMRSS_FUZZ_EXAMPLES (default 30, so `make test` stays fast; `fibemrss`'s figures in
docs/security.md were taken with 2000)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.he.codec import UpdateEncryptor
from fibemrss.he.keys import load_hospital_key
from tests.hostile.conftest import Federation, RunningAggregator, StartAggregator

EXAMPLES = int(os.environ.get("FIBEMRSS_FUZZ_EXAMPLES", "30"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
names = st.one_of(st.text(max_size=12), st.sampled_from(["fuzz", "a", "b", "central", "\x00", "a@b", ""]))
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e308, math.nan, math.inf])
)
ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@pytest.fixture(scope="module")
def aggregator(start_aggregator: StartAggregator) -> RunningAggregator:
    return start_aggregator(FIBEMRSS_UPLOAD_IDLE_SECONDS="2")


@pytest.fixture(scope="module")
def stubs(
    aggregator: RunningAggregator, federation: Federation
) -> Iterator[dict[str, federation_pb2_grpc.AggregatorServiceStub]]:
    channels = {i: federation.channel(aggregator.address, i) for i in ("operator@central", "agent@a")}
    stubs = {i: federation_pb2_grpc.AggregatorServiceStub(c) for i, c in channels.items()}
    stubs["operator@central"].StartFederation(
        pb.StartFederationRequest(
            min_contributors=1,  # these runs test uploads and capacity, not collusion
            task="fuzz",
            rounds=3,
            quorum=2,
            deadline_seconds=600,
            hospitals=["a", "b"],
        ),
        timeout=10,
    )
    yield stubs
    for c in channels.values():
        c.close()


def _call(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, timeout=20)
    except grpc.RpcError as exc:
        assert exc.code() not in FORBIDDEN, exc.details()
        return None


@SETTINGS
@given(
    task=names,
    rounds=ints,
    quorum=ints,
    grace=numbers,
    deadline=numbers,
    hospitals=st.lists(names, max_size=5),
)
def test_start_federation(stubs, task, rounds, quorum, grace, deadline, hospitals) -> None:  # type: ignore[no-untyped-def]
    request = pb.StartFederationRequest(
        min_contributors=1,  # these runs test uploads and capacity, not collusion
        task=f"x{task}",
        rounds=rounds,
        quorum=quorum,
        grace_seconds=grace,
        deadline_seconds=deadline,
        hospitals=hospitals,
    )
    _call(stubs["operator@central"].StartFederation, request)


@SETTINGS
@given(task=names, wait=st.one_of(st.none(), ints), seconds=numbers, number=ints, hospital=names)
def test_reads(stubs, task, wait, seconds, number, hospital) -> None:  # type: ignore[no-untyped-def]
    agent = stubs["agent@a"]
    request = pb.GetRoundRequest(task=task, wait_seconds=min(seconds, 0.2) if seconds == seconds else seconds)
    if wait is not None:
        request.wait_for_round = wait
    _call(agent.GetRound, request)
    _call(agent.GetFederationStatus, pb.GetFederationStatusRequest(task=task))
    _call(
        lambda r, timeout: list(agent.FetchAggregate(r, timeout=timeout)),
        pb.FetchAggregateRequest(task=task, round=number, hospital=hospital),
    )


@pytest.fixture(scope="module")
def real_chunk(federation: Federation) -> bytes:
    key = load_hospital_key((federation.keys / "hospital.he").read_bytes())
    return UpdateEncryptor(key).encrypt(np.ones(4), 3)[0]


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(min_value=0, max_value=4),
    total=st.integers(min_value=-2, max_value=5),
    round_number=st.integers(min_value=-1, max_value=2),
)
def test_submit_update(stubs, real_chunk, data, n, total, round_number) -> None:  # type: ignore[no-untyped-def]
    """Random chunk streams (junk bytes, a real chunk cut or flipped) for hospital a: refused, or
    accepted whole; a refused one is not in the round afterwards."""
    chunks = []
    for _ in range(n):
        kind = data.draw(st.sampled_from(["junk", "real", "cut", "flip"]))
        if kind == "junk":
            body = data.draw(st.binary(max_size=64))
        elif kind == "real":
            body = real_chunk
        elif kind == "cut":
            body = real_chunk[: data.draw(st.integers(min_value=0, max_value=len(real_chunk)))]
        else:
            at = data.draw(st.integers(min_value=0, max_value=len(real_chunk) - 1))
            body = real_chunk[:at] + bytes([real_chunk[at] ^ 0xFF]) + real_chunk[at + 1 :]
        index = data.draw(st.integers(min_value=-1, max_value=4))
        chunks.append(pb.SubmitUpdateRequest(index=index, ciphertext=body))
    if chunks:
        chunks[0].task, chunks[0].round, chunks[0].hospital, chunks[0].total_chunks = (
            "fuzz",
            round_number,
            "a",
            total,
        )
    agent = stubs["agent@a"]
    response = _call(agent.SubmitUpdate, iter(chunks))
    status = agent.GetFederationStatus(pb.GetFederationStatusRequest(task="fuzz"), timeout=10).status
    accepted = any("a" in r.submitted for r in status.history)
    if response is None and not accepted:
        return
    # Something of a was accepted: it was whole, one real chunk for a 1-chunk round.
    assert accepted
