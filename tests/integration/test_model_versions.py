"""Model versions in a real hospital database: retiring one stops serving it; the newest rolls back;
a personalized version is served only when the hospital chose it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from fibemrss.api.inference.v1 import inference_pb2
from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.domain.errors import FailedPrecondition, NotFound
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.serde.records import record_from_proto
from fibemrss.tools.bench.inference_bench import sample_model_version, sample_patient
from services.inference.core.diagnosis import diagnose
from services.inference.core.fhir_reference import PrefetchRead, risk_card
from services.inference.core.model_cache import ModelCache
from services.inference.core.open_inference import OpenInference
from services.inference.edges.cds_hooks import reference_view
from services.inference.edges.diagnosis_grpc import DiagnosisServicer
from services.inference.edges.kserve_grpc import KServeServicer

TASK = HEART_DISEASE_V1.name


@pytest.fixture
def store(fresh_database):
    url = fresh_database("hospital")
    db = Database(url)
    store = ModelStore(db)
    for v in (1, 2, 3):
        assert store.publish(sample_model_version(version=v, seed=v), actor="agent@test")
    yield url, db, store
    db.close()


def test_retiring_the_newest_version_rolls_inference_back_and_a_pin_to_it_is_not_found(store) -> None:
    url, db, models = store
    cache = ModelCache(models, HEART_DISEASE_V1, poll_seconds=60)
    cache.refresh()
    assert cache.get().version == 3 and cache.get(1).version == 1
    assert cache.versions() == [3, 2, 1]
    models.retire(TASK, 3, actor="operator@test", reason="drifted on local validation")
    models.retire(TASK, 3, actor="operator@test", reason="again")  # a repeat changes nothing
    cache.refresh()
    assert cache.get().version == 2
    assert cache.versions() == [2, 1]
    with pytest.raises(NotFound, match="retired"):
        cache.get(3)
    with db.transaction() as cur:
        cur.execute("SELECT actor, purpose, subject FROM audit_log WHERE action='retire_model'")
        assert cur.fetchall() == [("operator@test", "drifted on local validation", f"{TASK}@3")]


def test_the_last_servable_version_cannot_be_retired(store) -> None:
    _, _, models = store
    models.retire(TASK, 1, actor="op", reason="r")
    models.retire(TASK, 2, actor="op", reason="r")
    with pytest.raises(FailedPrecondition):
        models.retire(TASK, 3, actor="op", reason="r")
    with pytest.raises(NotFound):
        models.retire(TASK, 9, actor="op", reason="r")
    assert models.servable_versions(TASK) == [3]


def test_models_cli_lists_and_retires(store) -> None:
    url, _, _ = store
    cli = [sys.executable, "-m", "fibemrss.tools.cli", "models"]
    retire = subprocess.run(
        [*cli, "retire", "--database-url", url, "--version", "2", "--reason", "bad calibration"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert retire.returncode == 0, retire.stderr
    listing = subprocess.run(
        [*cli, "list", "--database-url", url], capture_output=True, text=True, timeout=60
    )
    import json

    rows = {r["version"]: r for r in json.loads(listing.stdout)}
    assert rows[2]["retired"] and rows[2]["retire_reason"] == "bad calibration"
    assert rows[3]["retired"] is None and rows[1]["retired"] is None
    last = subprocess.run(
        [*cli, "retire", "--database-url", url, "--version", "7", "--reason", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert last.returncode == 1 and "Traceback" not in last.stderr and "version 7" in last.stderr


def test_the_chosen_model_is_served_and_every_reference_says_which_model_answered(fresh_database) -> None:
    """Two hospitals: one chose its personalized model (served), one kept the global model (its
    personalized version stands by: stored, pinnable, not served)."""
    patient = sample_patient()
    for chosen in ("personalized", "global"):
        db = Database(fresh_database("hospital"))
        try:
            models = ModelStore(db)
            assert models.publish(sample_model_version(version=15, seed=1), actor="agent@h")
            personalized = dataclasses.replace(
                sample_model_version(version=16, seed=2),
                federated_round=15,
                kind="personalized",
                base_version=15,
                standby=chosen == "global",
            )
            why = f"serves the {chosen} model: validation log-loss ..."
            assert models.publish(personalized, actor="agent@h", choice=why)
            assert not models.publish(personalized, actor="agent@h", choice=why)  # a restart: once
            served = 16 if chosen == "personalized" else 15
            assert models.latest_version(TASK) == served
            assert models.get(TASK).version == served
            cache = ModelCache(models, HEART_DISEASE_V1, poll_seconds=60)
            cache.refresh()
            assert cache.versions()[0] == served and sorted(cache.versions()) == [15, 16]
            assert cache.get(16).kind == "personalized" and cache.get(16).base_version == 15
            assert cache.get(15).kind == "global" and cache.get(15).base_version == 0

            # gRPC Diagnose's response, KServe v2's, and the CDS Hooks card each name the model.
            servicer = DiagnosisServicer(cache)
            ref = servicer.DiagnoseBatch(inference_pb2.DiagnoseBatchRequest(patients=[patient]), None)
            answer = ref.references[0]
            assert answer.model_version == served
            assert answer.model_kind == chosen
            assert answer.base_model_version == (15 if chosen == "personalized" else 0)
            pinned = servicer.DiagnoseBatch(
                inference_pb2.DiagnoseBatchRequest(patients=[patient], model_version=16), None
            ).references[0]
            assert (pinned.model_kind, pinned.base_model_version) == ("personalized", 15)
            kserve_request = kserve.ModelInferRequest(model_name=TASK)
            features = kserve_request.inputs.add(
                name="features", datatype="FP32", shape=[1, cache.get().input_dim]
            )
            features.contents.fp32_contents.extend([0.0] * cache.get().input_dim)
            kserve_response = KServeServicer(OpenInference(cache)).ModelInfer(kserve_request, None)
            assert kserve_response.model_version == str(served)
            assert kserve_response.parameters["model_kind"].string_param == chosen
            card = risk_card(
                reference_view(cache.get(), diagnose(cache.get(), record_from_proto(patient))), PrefetchRead()
            )
            expected = (
                "personalized version 16 (from global version 15)"
                if chosen == "personalized"
                else "global version 15"
            )
            assert card["source"]["label"] == f"FIBEMRSS {TASK} {expected}"
            with db.transaction() as cur:
                cur.execute("SELECT actor, purpose, subject FROM audit_log WHERE action='choose_model'")
                assert cur.fetchall() == [("agent@h", why, f"{TASK}@16")]
        finally:
            db.close()
