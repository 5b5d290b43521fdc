"""KServe v2 over REST (HTTPS with client certificates), checked by tritonclient.http, against gRPC.

tritonclient runs in its own virtualenv (scripts/triton_venv.sh, as for the gRPC check); its
answers must equal those of the same service's gRPC KServe API and the model's numpy forward pass.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fibemrss.domain.feature_encoding import input_dim
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.channels import open_channel
from fibemrss.tools.bench.inference_bench import sample_encoded_rows
from tests.e2e.conftest import InferenceHttps
from tests.e2e.test_kserve_tritonclient import expected

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TASK = HEART_DISEASE_V1
MODEL = TASK.name


def grpc_infer(
    inference_https: InferenceHttps, x: np.ndarray, version: str = ""
) -> kserve.ModelInferResponse:
    request = kserve.ModelInferRequest(model_name=MODEL, model_version=version, id="check-1")
    request.inputs.add(name="features", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    with open_channel(inference_https.grpc, inference_https.tls("ehr@h")) as channel:
        return kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)


def test_tritonclient_http_sees_what_grpc_answers(
    inference_https: InferenceHttps,
    triton_python: str,
    tmp_path: Path,
) -> None:
    v1, v2 = inference_https.versions
    x = sample_encoded_rows(TASK, v2.model.stats, 4, seed=11)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps(x.tolist()))
    t = inference_https.tls("ehr@h")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [
            triton_python,
            str(ROOT / "tests" / "e2e" / "triton_http_check.py"),
            inference_https.http.removeprefix("https://"),
            MODEL,
            str(inputs),
            t.ca,
            t.cert,
            t.key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["server_live"] and seen["server_ready"] and seen["model_ready"] and seen["model_ready_v1"]
    assert not seen["model_ready_v999"] and not seen["unknown_model_ready"]
    assert seen["server_metadata"]["name"] == "fibemrss-inference"
    meta = seen["model_metadata"]
    assert meta["name"] == MODEL and sorted(meta["versions"]) == ["1", "2"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, input_dim(TASK)]}]

    for key, mv, version in (("newest_binary", v2, ""), ("newest_json", v2, ""), ("pinned_v1", v1, "1")):
        got = seen[key]
        assert got["model_version"] == str(mv.version) and got["id"] == "check-1", key
        assert got["probability_shape"] == [4, 1]
        over_grpc = grpc_infer(inference_https, x, version)
        grpc_p = np.frombuffer(over_grpc.raw_output_contents[0], "<f4")
        grpc_logit = np.frombuffer(over_grpc.raw_output_contents[1], "<f4")
        # Binary data carries the very float32 bytes; JSON carries the float32 value as a double.
        np.testing.assert_array_equal(np.asarray(got["probability"], dtype=np.float32)[:, 0], grpc_p)
        np.testing.assert_array_equal(np.asarray(got["logit"], dtype=np.float32)[:, 0], grpc_logit)
        np.testing.assert_allclose(grpc_p, expected(mv, x)[0], rtol=1e-6, atol=1e-7)

    assert (
        seen["wrong_datatype"]["status"] == "400"
        and "inputs[0].datatype" in seen["wrong_datatype"]["message"]
    )
    assert seen["wrong_shape"]["status"] == "400" and "inputs[0].shape" in seen["wrong_shape"]["message"]
    assert seen["unknown_model"]["status"] == "404"


def test_json_errors_name_the_rest_field(inference_https: InferenceHttps) -> None:
    with inference_https.client() as client:
        body = {
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, input_dim(TASK)], "data": [1.0]}]
        }
        r = client.post(f"/v2/models/{MODEL}/infer", json=body)
        assert r.status_code == 400 and "inputs[0].data" in r.json()["error"]
        r = client.post(f"/v2/models/{MODEL}/versions/latest/infer", json=body)
        assert r.status_code == 400 and "versions/{version}" in r.json()["error"]
        r = client.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
        assert r.status_code == 400 and "body" in r.json()["error"]
        r = client.get("/v2/models/no-such-model")
        assert r.status_code == 404 and "no-such-model" in r.json()["error"]


def test_another_hospitals_certificate_is_refused(inference_https: InferenceHttps) -> None:
    with inference_https.client("ehr@other") as client:
        r = client.get("/v2/health/ready")
    assert r.status_code == 403 and "ehr@other" in r.json()["error"]


def test_without_a_client_certificate_there_is_no_connection(inference_https: InferenceHttps) -> None:
    no_certificate = ssl.create_default_context(cafile=inference_https.tls("ehr@h").ca)
    with httpx.Client(base_url=inference_https.http, verify=no_certificate, timeout=10) as client:
        with pytest.raises(httpx.HTTPError):
            client.get("/v2/health/live")
