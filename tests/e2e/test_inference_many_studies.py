"""One inference service serving two studies of different models and data at once.

`FIBEMRSS_STUDIES=heart-disease-v1,hypertension-synthea-v1,approved`: each study is its own KServe
v2 model (REST and gRPC, its own metadata and versions) listed by the repository index, its own
Diagnose target (a call without `task` is INVALID_ARGUMENT listing both) and its own CDS Hooks
service in discovery, with the prefetch its features need; a patient-view call with an ordinary
FHIR patient (a Synthea bundle) gets a real risk card from the hypertension study. A study
approved at the hospital while the service runs is served without a restart, and retired again
when the approval is withdrawn. tritonclient (its own virtualenv) lists and infers both models.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from fibemrss.api.inference.v1 import inference_pb2 as ipb
from fibemrss.api.inference.v1 import inference_pb2_grpc
from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fibemrss.db.pool import Database
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.model_params import forward_logits, sigmoid, unflatten
from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.tasks import get_task
from fibemrss.platform.channels import open_channel
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.bench.inference_bench import (
    inference_process,
    publish,
    sample_encoded_rows,
    sample_model_version,
    sample_patient,
)
from tests.conftest import shared_file
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
HEART = get_task("heart-disease-v1")
HYPERTENSION = get_task("hypertension-synthea-v1")
LATER = get_task("heart-disease-noninvasive-v1")  # approved while the service runs


@dataclass
class Served:
    grpc: str
    http: str
    url: str
    versions: dict[str, ModelVersion]


@pytest.fixture(scope="module")
def served(postgres_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from fibemrss.db.admin import ensure_database
    from fibemrss.db.migrate import migrate

    url = ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
    migrate(url, "hospital")
    versions = {
        HEART.name: sample_model_version(HEART, 3, seed=1),
        HYPERTENSION.name: sample_model_version(HYPERTENSION, 2, seed=5),
    }
    for mv in versions.values():
        publish(url, mv)
    env = {
        "FIBEMRSS_TASK": "",
        "FIBEMRSS_STUDIES": f"{HEART.name},{HYPERTENSION.name},approved",
        "FIBEMRSS_HTTP_PLAINTEXT_LISTEN": "127.0.0.1:0",
        "FIBEMRSS_MODEL_POLL_SECONDS": "0.2",
    }
    with inference_process(url, tmp_path_factory.mktemp("inference"), env) as proc:
        yield Served(proc.address, proc.edges["kserve_http"], url, versions)


def expected(mv: ModelVersion, x: np.ndarray) -> np.ndarray:
    assert mv.model.shapes is not None
    layers = unflatten(np.asarray(mv.model.params), [tuple(s) for s in mv.model.shapes])
    return sigmoid(forward_logits(layers, x))


def test_each_study_is_its_own_kserve_model_over_grpc_and_rest(served: Served) -> None:
    stub = kserve_grpc.GRPCInferenceServiceStub(open_channel(served.grpc))
    # The service loads each study's model just after it starts listening.
    index = wait_until(
        lambda: (
            (i := stub.RepositoryIndex(kserve.RepositoryIndexRequest(ready=True), timeout=10)).models[1:]
            and i
        ),
        timeout=10,
        what="both studies' models loaded",
    )
    assert {(m.name, m.version, m.state) for m in index.models} == {
        (HEART.name, "3", "READY"),
        (HYPERTENSION.name, "2", "READY"),
    }
    with httpx.Client(base_url=served.http, timeout=30) as http:
        rest_index = http.post("/v2/repository/index", json={})
        assert rest_index.status_code == 200
        assert sorted((m["name"], m["state"]) for m in rest_index.json()) == sorted(
            (m.name, m.state) for m in index.models
        )
        for task in (HEART, HYPERTENSION):
            mv = served.versions[task.name]
            meta = stub.ModelMetadata(kserve.ModelMetadataRequest(name=task.name), timeout=10)
            assert meta.name == task.name and list(meta.versions) == [str(mv.version)]
            assert json.loads(meta.properties["input_columns"]) == list(mv.model.input_names)
            assert meta.properties["study"] == task.name
            assert http.get(f"/v2/models/{task.name}").json()["inputs"][0]["shape"] == [
                -1,
                mv.model.input_dim,
            ]
            x = sample_encoded_rows(task, mv.model.stats, 4, seed=11)
            request = kserve.ModelInferRequest(model_name=task.name, id="both")
            tensor = request.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
            tensor.contents.fp32_contents.extend(x.ravel().tolist())
            answer = stub.ModelInfer(request, timeout=10)
            assert answer.model_name == task.name and answer.model_version == str(mv.version)
            probability = [o.name for o in answer.outputs].index("probability")
            got = np.frombuffer(answer.raw_output_contents[probability], dtype="<f4")
            np.testing.assert_allclose(got, expected(mv, x.astype(np.float64)).ravel(), atol=1e-4)
            rest = http.post(
                f"/v2/models/{task.name}/infer",
                json={
                    "inputs": [
                        {"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}
                    ]
                },
            )
            assert rest.status_code == 200 and rest.json()["model_name"] == task.name
        # A model's tensors are its own: the heart study's rows are refused by the other model.
        x = sample_encoded_rows(HEART, served.versions[HEART.name].model.stats, 1)
        wrong = http.post(
            f"/v2/models/{HYPERTENSION.name}/infer",
            json={
                "inputs": [
                    {"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}
                ]
            },
        )
        assert wrong.status_code == 400 and "shape" in wrong.text
        unknown = http.get("/v2/models/no-such-study")
        assert unknown.status_code == 404 and HYPERTENSION.name in unknown.json()["error"]


def test_diagnose_names_the_study_and_asks_which_when_several_are_served(served: Served) -> None:
    stub = inference_pb2_grpc.DiagnosisServiceStub(open_channel(served.grpc))
    patient = sample_patient()
    with pytest.raises(grpc.RpcError) as which:
        stub.Diagnose(ipb.DiagnoseRequest(patient=patient), timeout=10)
    assert which.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, reason)] = field_violations(which.value)
    assert field == "task" and HEART.name in reason and HYPERTENSION.name in reason
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Diagnose(ipb.DiagnoseRequest(task="no-such-study", patient=patient), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    for task in (HEART, HYPERTENSION):
        answer = stub.Diagnose(ipb.DiagnoseRequest(task=task.name, patient=patient), timeout=10)
        assert answer.model_name == task.name
        assert answer.model_version == served.versions[task.name].version


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def synthea_prefetch() -> tuple[str, dict[str, Any]]:
    """A Synthea adult's Patient, vital-sign Observations and Conditions, as an EHR would prefetch
    them for the hypertension service."""
    folder = shared_file("fhir_r4")
    codes = {"8480-6", "8462-4", "8867-4", "39156-5", "85354-9"}
    for path in sorted(folder.glob("*.json")):
        bundle = json.loads(path.read_text())
        resources = [e["resource"] for e in bundle.get("entry", [])]
        patient = next(r for r in resources if r["resourceType"] == "Patient")
        if patient.get("birthDate", "2100") > "2000-01-01":
            continue
        observations = [
            r
            for r in resources
            if r["resourceType"] == "Observation"
            and any(c.get("code") in codes for c in r.get("code", {}).get("coding", []))
        ][-8:]
        if not observations:
            continue
        conditions = [r for r in resources if r["resourceType"] == "Condition"]
        # A FHIR server's search answers reference the patient by id (the bundle by urn:uuid).
        for r in observations + conditions:
            r["subject"] = {"reference": f"Patient/{patient['id']}"}
        return patient["id"], {
            "patient": patient,
            "observations": searchset(observations),
            "conditions": searchset(conditions),
        }
    pytest.skip("no adult Synthea bundle with vital signs in the shared data")


def test_cds_discovery_lists_one_service_per_study_and_a_fhir_patient_gets_a_real_card(
    served: Served,
) -> None:
    with httpx.Client(base_url=served.http, timeout=30) as http:
        services = {s["id"]: s for s in http.get("/cds-services").json()["services"]}
        assert set(services) == {f"{HEART.name}-risk", f"{HYPERTENSION.name}-risk"}
        hypertension = services[f"{HYPERTENSION.name}-risk"]
        assert "8480-6" in hypertension["prefetch"]["observations"]
        assert "73595000" in hypertension["prefetch"]["conditions"]  # the stress condition feature
        assert "conditions" not in services[f"{HEART.name}-risk"]["prefetch"]
        patient_id, prefetch = synthea_prefetch()
        request = {
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": patient_id, "userId": "Practitioner/1"},
            "prefetch": prefetch,
        }
        answer = http.post(f"/cds-services/{HYPERTENSION.name}-risk", json=request)
        assert answer.status_code == 200, answer.text
        [card] = answer.json()["cards"]
        assert card["summary"].startswith(f"{HYPERTENSION.name} risk reference"), card
        assessment = card["suggestions"][0]["actions"][0]["resource"]
        RiskAssessment.model_validate(assessment)
        assert assessment["method"]["coding"][0]["code"] == HYPERTENSION.name
        assert assessment["prediction"][0]["outcome"]["text"].startswith(HYPERTENSION.name)
        # The same patient asked of the heart study is answered by that study's own service.
        heart = http.post(f"/cds-services/{HEART.name}-risk", json=request).json()["cards"][0]
        assert heart["source"]["label"].startswith(f"FIBEMRSS {HEART.name}")


def test_a_study_approved_while_running_is_served_and_retired_without_a_restart(served: Served) -> None:
    stub = kserve_grpc.GRPCInferenceServiceStub(open_channel(served.grpc))

    def index() -> dict[str, str]:
        return {
            m.name: m.state for m in stub.RepositoryIndex(kserve.RepositoryIndexRequest(), timeout=10).models
        }

    assert LATER.name not in index()
    db = Database(served.url)
    try:
        store = StudyStore(db)
        store.record_decision(LATER, "approved", "", 300, "operator@h")
        wait_until(
            lambda: index().get(LATER.name) == "UNAVAILABLE", timeout=15, what="the approved study listed"
        )
        publish(served.url, sample_model_version(LATER, 1, seed=9))
        wait_until(lambda: index().get(LATER.name) == "READY", timeout=15, what="its first model served")
        with httpx.Client(base_url=served.http, timeout=30) as http:
            ids = [s["id"] for s in http.get("/cds-services").json()["services"]]
            assert f"{LATER.name}-risk" in ids
        store.record_decision(LATER, "refused", "withdrawn by the ethics board", None, "operator@h")
        wait_until(lambda: LATER.name not in index(), timeout=15, what="the withdrawn study retired")
        # The two studies named in the configuration stay served throughout.
        assert index() == {HEART.name: "READY", HYPERTENSION.name: "READY"}
    finally:
        db.close()


def test_tritonclient_lists_and_infers_both_models(
    served: Served, triton_python: str, tmp_path: Path
) -> None:
    rows = {}
    for task in (HEART, HYPERTENSION):
        mv = served.versions[task.name]
        rows[task.name] = sample_encoded_rows(task, mv.model.stats, 3, seed=2).tolist()
    inputs = tmp_path / "rows.json"
    inputs.write_text(json.dumps(rows))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [triton_python, str(ROOT / "tests" / "e2e" / "triton_repository_check.py"), served.grpc, str(inputs)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout)
    assert {m["name"] for m in seen["index"] if m.get("state") == "READY"} >= {HEART.name, HYPERTENSION.name}
    for task in (HEART, HYPERTENSION):
        mv = served.versions[task.name]
        want = expected(mv, np.asarray(rows[task.name], dtype=np.float32).astype(np.float64)).ravel()
        np.testing.assert_allclose(np.ravel(seen["probability"][task.name]), want, atol=1e-4)
