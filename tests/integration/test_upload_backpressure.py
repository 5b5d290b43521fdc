"""Many hospitals uploading at once to an aggregator with a small database pool (issue 24): every
honest upload is accepted (queued for an upload slot and a connection, never refused as
UNAVAILABLE), the round closes, and its sum is the weighted average of all of them."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.pool import Database
from fibemrss.domain.errors import Unavailable
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.platform.capacity import CallLimits
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig
from fibemrss.platform.server import start_server
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.edges.grpc_servicer import AggregatorServicer

TASK = "backpressure"
HOSPITALS = [f"h{i:02d}" for i in range(40)]
POOL = 3


def test_a_pool_without_a_queue_refuses_a_second_caller(fresh_database) -> None:  # type: ignore[no-untyped-def]
    """What 16 hospitals met before (the aggregator's pool refused at once); with a wait, the
    second caller gets the connection once the first gives it back."""
    url = fresh_database("aggregator")
    at_once, queued = Database(url, max_connections=1), Database(url, max_connections=1, wait_seconds=10)
    try:
        with at_once.transaction(), pytest.raises(Unavailable, match="pool exhausted"), at_once.transaction():
            pass
        holding = threading.Event()

        def hold() -> None:
            with queued.transaction() as cur:
                holding.set()
                cur.execute("SELECT pg_sleep(0.3)")

        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait(5)
        with queued.transaction() as cur:  # waits for the holder instead of UNAVAILABLE
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        holder.join()
    finally:
        at_once.close()
        queued.close()


def test_forty_hospitals_uploading_at_once_with_three_connections_are_all_accepted(fresh_database) -> None:  # type: ignore[no-untyped-def]
    hospital_bytes, aggregator_bytes = generate_keys()
    key = load_hospital_key(hospital_bytes)
    db = Database(fresh_database("aggregator"), max_connections=POOL, wait_seconds=60)
    store = AggregatorStore(db)
    coordinator = Coordinator(
        store, CiphertextAdder(load_aggregator_key(aggregator_bytes)), tick_seconds=0.05, upload_slots=1
    )

    def register(server, registry):  # type: ignore[no-untyped-def]
        federation_pb2_grpc.add_AggregatorServiceServicer_to_server(
            AggregatorServicer(coordinator, store), server
        )
        return [pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name]

    # Without TLS every channel of this process is one caller (one peer): let it hold all 40 calls,
    # as 40 hospitals with their own certificates would.
    config = ServerConfig(
        "127.0.0.1:0", "127.0.0.1:0", None, None, limits=CallLimits(max_workers=64, per_identity=64)
    )
    running = start_server("aggregator-backpressure", register, config)
    coordinator.start()
    channels = [open_channel(running.address) for _ in HOSPITALS]
    try:
        stub = federation_pb2_grpc.AggregatorServiceStub(channels[0])
        stub.StartFederation(
            pb.StartFederationRequest(
                task=TASK, rounds=1, quorum=len(HOSPITALS), deadline_seconds=120, hospitals=HOSPITALS
            ),
            timeout=30,
        )
        rng = np.random.default_rng(24)
        values = {h: rng.normal(0, 0.1, 2_000) for h in HOSPITALS}
        weights = {h: int(w) for h, w in zip(HOSPITALS, rng.integers(1, 50, len(HOSPITALS)), strict=True)}
        uploads = {h: UpdateEncryptor(key).encrypt(values[h], weights[h]) for h in HOSPITALS}
        start = threading.Barrier(len(HOSPITALS))
        outcomes: dict[str, str] = {}

        def upload(hospital: str, channel: grpc.Channel) -> None:
            chunks = uploads[hospital]

            def requests() -> Iterator[pb.SubmitUpdateRequest]:
                for i, data in enumerate(chunks):
                    yield pb.SubmitUpdateRequest(
                        task=TASK,
                        round=0,
                        hospital=hospital,
                        total_chunks=len(chunks),
                        index=i,
                        ciphertext=data,
                    )

            start.wait()
            try:
                federation_pb2_grpc.AggregatorServiceStub(channel).SubmitUpdate(requests(), timeout=100)
                outcomes[hospital] = "accepted"
            except grpc.RpcError as exc:
                outcomes[hospital] = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]

        threads = [
            threading.Thread(target=upload, args=(h, c)) for h, c in zip(HOSPITALS, channels, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=110)
        refused = {h: o for h, o in outcomes.items() if o != "accepted"}
        assert refused == {} and len(outcomes) == len(HOSPITALS)
        closed = stub.GetRound(
            pb.GetRoundRequest(task=TASK, wait_for_round=1, wait_seconds=30), timeout=40
        ).round
        assert closed.round == 1  # round 0 closed
        served = [
            c.ciphertext
            for c in stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=0), timeout=30)
        ]
        average, total = UpdateDecryptor(key).decrypt_average(served, 2_000)
        assert total == sum(weights.values())
        expected = sum(weights[h] * values[h] for h in HOSPITALS) / total
        np.testing.assert_allclose(average, expected, atol=key.params.average_error_bound)
    finally:
        for channel in channels:
            channel.close()
        running.stop(grace=0)
        coordinator.stop()
        db.close()
