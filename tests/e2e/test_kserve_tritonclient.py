"""The Open Inference Protocol API, checked by a real third-party client (NVIDIA tritonclient).

tritonclient runs in its own virtualenv (scripts/triton_venv.sh, cached under var/), because it
needs protobuf < 7 and its own `inference` protos; this test drives it as a subprocess and
compares what it saw with the model's own numpy forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment
from google.protobuf import json_format

from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fibemrss.domain.feature_encoding import input_dim, input_names
from fibemrss.domain.model_params import forward_logits, sigmoid, unflatten
from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.bench.inference_bench import (
    inference_process,
    publish,
    sample_encoded_rows,
    sample_model_version,
    sample_patient,
)
from fibemrss.tools.commands.diagnose import add_parser
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TASK = HEART_DISEASE_V1
MODEL = TASK.name


def expected(mv: ModelVersion, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    layers = unflatten(np.asarray(mv.model.params.tolist()), [tuple(s) for s in mv.model.shapes])  # type: ignore[misc]
    logits = forward_logits(layers, x)
    return sigmoid(logits), logits


@pytest.fixture(scope="module")
def service(postgres_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list]]:
    from fibemrss.db.admin import ensure_database
    from fibemrss.db.migrate import migrate

    url = ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
    migrate(url, "hospital")
    versions = [sample_model_version(TASK, 1, seed=1), sample_model_version(TASK, 2, seed=2)]
    for mv in versions:
        publish(url, mv)
    with inference_process(url, tmp_path_factory.mktemp("inference")) as proc:
        yield proc.address, versions


def test_tritonclient_sees_health_metadata_and_the_models_own_outputs(
    service: tuple[str, list], triton_python: str, tmp_path: Path
) -> None:
    address, (v1, v2) = service
    x = sample_encoded_rows(TASK, v2.model.stats, 5, seed=7)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps(x.tolist()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [triton_python, str(ROOT / "tests" / "e2e" / "triton_client_check.py"), address, MODEL, str(inputs)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # nothing of this project on its import path
        env=env,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)

    assert seen["server_live"] and seen["server_ready"] and seen["model_ready"]
    assert seen["model_ready_v1"] and not seen["model_ready_v999"] and not seen["unknown_model_ready"]
    assert seen["server_metadata"]["name"] == "fibemrss-inference"

    meta = seen["model_metadata"]
    assert meta["name"] == MODEL and "2" in meta["versions"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("features", "FP32", [-1, input_dim(TASK)])
    ]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
        ("probability", "FP32"),
        ("logit", "FP32"),
    ]
    # tritonclient's proto predates the Open Inference Protocol's `properties` (field 6) and
    # drops it; test_model_metadata_documents_the_input_layout reads it with our stubs.

    for key, mv in (("newest", v2), ("pinned_v1", v1)):
        got = seen[key]
        assert got["model_version"] == str(mv.version) and got["id"] == "check-1"
        assert got["probability_shape"] == [5, 1]
        p, logit = expected(mv, x)
        np.testing.assert_allclose(np.asarray(got["probability"])[:, 0], p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got["logit"])[:, 0], logit, rtol=1e-5, atol=1e-5)

    assert "INVALID_ARGUMENT" in seen["wrong_datatype"]["status"]
    assert "INVALID_ARGUMENT" in seen["wrong_shape"]["status"]
    assert "NOT_FOUND" in seen["unknown_model"]["status"]


def test_model_metadata_documents_the_input_layout(service: tuple[str, list]) -> None:
    address, (_, v2) = service
    with grpc.insecure_channel(address) as channel:
        meta = kserve_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            kserve.ModelMetadataRequest(name=MODEL), timeout=10
        )
    assert json.loads(meta.properties["input_columns"]) == input_names(TASK)
    assert json.loads(meta.properties["feature_statistics"]) == v2.model.stats.to_json()
    assert meta.properties["model_version"] == "2"


def _infer_request(x: np.ndarray, raw: bool = True) -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="features", datatype="FP32", shape=x.shape)
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def test_typed_contents_give_the_same_result_as_raw(service: tuple[str, list]) -> None:
    address, (_, v2) = service
    x = sample_encoded_rows(TASK, v2.model.stats, 3, seed=3)
    with grpc.insecure_channel(address) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        raw = stub.ModelInfer(_infer_request(x, raw=True), timeout=10)
        typed = stub.ModelInfer(_infer_request(x, raw=False), timeout=10)
    assert raw.raw_output_contents == typed.raw_output_contents
    np.testing.assert_allclose(
        np.frombuffer(typed.raw_output_contents[0], "<f4"), expected(v2, x)[0], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "inputs[0].datatype"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 3), "inputs[0].shape"),
        (lambda r: setattr(r.inputs[0], "name", "x"), "inputs[0].name"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 8), "raw_input_contents[0]"),
        (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "inputs[0].contents"),
        (lambda r: r.outputs.add(name="risk"), "outputs[0].name"),
        (lambda r: setattr(r, "model_version", "latest"), "model_version"),
        (
            lambda r: r.raw_input_contents.__setitem__(0, np.full(input_dim(TASK), np.nan, "<f4").tobytes()),
            "raw_input_contents[0]",
        ),
    ],
)
def test_a_mismatched_tensor_is_invalid_argument_naming_the_field(
    service: tuple[str, list], mutate: Callable[[kserve.ModelInferRequest], None], field: str
) -> None:
    address, _ = service
    request = _infer_request(np.zeros((1, input_dim(TASK)), dtype=np.float32))
    mutate(request)
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in field_violations(err.value)]


def test_model_ready_is_false_until_a_version_is_published(
    fresh_database: Callable[[str], str], tmp_path: Path
) -> None:
    url = fresh_database("hospital")
    with inference_process(url, tmp_path, {"FIBEMRSS_MODEL_POLL_SECONDS": "0.1"}) as proc:
        with grpc.insecure_channel(proc.address) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(kserve.ServerLiveRequest(), timeout=10).live
            assert not stub.ServerReady(kserve.ServerReadyRequest(), timeout=10).ready
            assert not stub.ModelReady(kserve.ModelReadyRequest(name=MODEL), timeout=10).ready
            publish(url, sample_model_version(TASK, 1))
            wait_until(
                lambda: stub.ModelReady(kserve.ModelReadyRequest(name=MODEL), timeout=10).ready,
                20,
                "the published version picked up",
                interval=0.05,
            )
            assert stub.ServerReady(kserve.ServerReadyRequest(), timeout=10).ready
            assert stub.ModelReady(kserve.ModelReadyRequest(name=MODEL, version="1"), timeout=10).ready


def test_diagnose_cli_prints_the_reference(
    service: tuple[str, list], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = service
    patient = tmp_path / "patient.json"
    patient.write_text(json_format.MessageToJson(sample_patient()))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["diagnose", "--inference", address, "--patient", str(patient), "--json"])
    assert args.func(args) == 0
    ref = json.loads(capsys.readouterr().out)
    assert ref["model_version"] == 2 and 0.0 <= ref["probability"] <= 1.0
    assert ref["model_kind"] == "global" and "base_model_version" not in ref
    assert ref["imputed_features"] == ["cholesterol"]

    args = parser.parse_args(
        ["diagnose", "--inference", address, "--patient", str(patient), "--model-version", "1"]
    )
    assert args.func(args) == 0
    assert "version 1" in capsys.readouterr().out

    args = parser.parse_args(
        ["diagnose", "--inference", address, "--patient", str(patient), "--fhir", "--fhir-patient", "p7"]
    )
    assert args.func(args) == 0
    assessment = RiskAssessment.model_validate_json(capsys.readouterr().out)
    assert assessment.subject.reference == "Patient/p7"
    assert assessment.method.coding[0].display == "heart-disease-v1 global version 2"
    assert 0.0 <= float(assessment.prediction[0].probabilityDecimal) <= 1.0
