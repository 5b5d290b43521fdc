"""Stream floods: a certificate holder of the federation cannot occupy every worker thread.

A real aggregator process, mutual TLS over loopback, with small explicit limits so a flood is
cheap to produce: 8 workers, 4 calls in flight per identity, 2 health watches in all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from tests.hostile.conftest import Federation, RunningAggregator, StartAggregator
from tests.waiting import wait_until

LIMITS = {
    "FIBEMRSS_MAX_WORKERS": "8",
    "FIBEMRSS_MAX_CALLS_PER_IDENTITY": "4",
    "FIBEMRSS_MAX_WATCH_STREAMS": "2",
}


@pytest.fixture(scope="module")
def aggregator(start_aggregator: StartAggregator) -> RunningAggregator:
    return start_aggregator(**LIMITS)


def _probe(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


class Flood:
    """Opens `n` Watch streams on one channel and records how each one ended."""

    def __init__(self, channel: grpc.Channel, n: int) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        self.calls = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(n)]
        self.codes: list[grpc.StatusCode | None] = [None] * n
        self.threads = [threading.Thread(target=self._drain, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _drain(self, i: int) -> None:
        try:
            for _ in self.calls[i]:
                pass
            self.codes[i] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.codes[i] = exc.code()

    def settled(self, expected_refused: int, timeout: float = 20.0) -> None:
        wait_until(
            lambda: sum(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c in self.codes) >= expected_refused,
            timeout,
            f"{expected_refused} watches refused with RESOURCE_EXHAUSTED",
            interval=0.05,
        )

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        for t in self.threads:
            t.join(timeout=10)


@pytest.fixture
def operator_flood(aggregator: RunningAggregator, federation: Federation) -> Iterator[Flood]:
    channel = federation.channel(aggregator.address, "operator@a")
    flood = Flood(channel, 40)
    try:
        yield flood
    finally:
        flood.cancel()
        channel.close()


def test_a_watch_flood_from_an_operator_certificate_is_refused_and_honest_calls_are_answered(
    aggregator: RunningAggregator, federation: Federation, operator_flood: Flood
) -> None:
    # Of 40 watches only the global watch bound (2) stays open; the rest are refused, not queued.
    operator_flood.settled(expected_refused=38)
    assert operator_flood.codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 38
    assert operator_flood.codes.count(None) == 2  # still open
    with federation.channel(aggregator.address, "operator@central") as channel:
        stub = federation_pb2_grpc.AggregatorServiceStub(channel)
        started = stub.StartFederation(
            pb.StartFederationRequest(
                min_contributors=1, task="flood", rounds=1, quorum=1, hospitals=["a", "b"]
            ),
            timeout=10,
        )
        assert started.status.current.round == 0
    with federation.channel(aggregator.address, "agent@b") as channel:
        stub = federation_pb2_grpc.AggregatorServiceStub(channel)
        for _ in range(20):
            assert stub.GetRound(pb.GetRoundRequest(task="flood"), timeout=10).round.round == 0
        # Health Check stays open to everyone, watches or not.
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert _probe(aggregator.health_address) == health_pb2.HealthCheckResponse.SERVING


def test_one_identity_holds_at_most_its_share_and_a_saturated_server_says_not_serving(
    aggregator: RunningAggregator, federation: Federation
) -> None:
    with federation.channel(aggregator.address, "operator@central") as channel:
        federation_pb2_grpc.AggregatorServiceStub(channel).StartFederation(
            pb.StartFederationRequest(
                min_contributors=1, task="long-poll", rounds=1, quorum=1, hospitals=["a"]
            ),
            timeout=10,
        )
    # Long polls for a round that will not come: each holds a worker for up to 30 s.
    wait = pb.GetRoundRequest(task="long-poll", wait_for_round=5, wait_seconds=30)
    channels = {i: federation.channel(aggregator.address, i) for i in ("agent@a", "agent@b", "agent@c")}
    futures = []
    try:
        a = federation_pb2_grpc.AggregatorServiceStub(channels["agent@a"])
        futures += [a.GetRound.future(wait, timeout=60) for _ in range(6)]
        # agent@a got 4 workers; its fifth and sixth calls are refused at once.
        wait_until(lambda: sum(f.done() for f in futures) >= 2, 20, "two long polls refused at once")
        time.sleep(0.5)  # room for a wrongly refused seventh to show
        assert [_code(f) for f in futures if f.done()] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        b = federation_pb2_grpc.AggregatorServiceStub(channels["agent@b"])
        futures += [b.GetRound.future(wait, timeout=60) for _ in range(4)]
        wait_until(
            lambda: _probe(aggregator.health_address) == health_pb2.HealthCheckResponse.NOT_SERVING,
            20,
            "the aggregator's probe saying NOT_SERVING with every worker busy",
        )
        # Every worker is busy: a third caller is told so instead of waiting in silence.
        c = federation_pb2_grpc.AggregatorServiceStub(channels["agent@c"])
        with pytest.raises(grpc.RpcError) as info:
            c.GetRound(pb.GetRoundRequest(task="long-poll"), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for f in futures:
            f.cancel()
        for ch in channels.values():
            ch.close()
    wait_until(
        lambda: _probe(aggregator.health_address) == health_pb2.HealthCheckResponse.SERVING,
        20,
        "the aggregator's probe SERVING again once the polls ended",
    )


def test_the_probe_port_answers_check_only(aggregator: RunningAggregator) -> None:
    with grpc.insecure_channel(aggregator.health_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_stream_is_cancelled_at_its_lifetime_limit(
    start_aggregator: StartAggregator, federation: Federation
) -> None:
    short = start_aggregator(FIBEMRSS_MAX_STREAM_SECONDS="1")
    with federation.channel(short.address, "operator@a") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            for _ in watch:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED


def test_a_unary_call_is_cancelled_at_the_servers_deadline_whatever_its_client_asked(
    start_aggregator: StartAggregator, federation: Federation
) -> None:
    short = start_aggregator(FIBEMRSS_MAX_CALL_SECONDS="1")
    with federation.channel(short.address, "operator@central") as channel:
        federation_pb2_grpc.AggregatorServiceStub(channel).StartFederation(
            pb.StartFederationRequest(
                min_contributors=1, task="deadline", rounds=1, quorum=1, hospitals=["a"]
            ),
            timeout=10,
        )
    with federation.channel(short.address, "agent@a") as channel:
        stub = federation_pb2_grpc.AggregatorServiceStub(channel)
        # A long poll for a round that will not come, with a client deadline of a minute.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetRound(pb.GetRoundRequest(task="deadline", wait_for_round=5, wait_seconds=30), timeout=60)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - started < 10
        # Its worker and the caller's slot are free again: the same caller is answered at once.
        assert stub.GetRound(pb.GetRoundRequest(task="deadline"), timeout=10).round.round == 0
        wait_until(
            lambda: _probe(short.health_address) == health_pb2.HealthCheckResponse.SERVING,
            20,
            "the aggregator's probe SERVING again once the cancelled poll freed its worker",
        )


def _code(future: grpc.Future) -> grpc.StatusCode:
    try:
        future.result()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
