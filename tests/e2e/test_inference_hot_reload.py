"""Hot reload under load: new model versions published while clients call Diagnose and ModelInfer.

No request may fail, every answer must come whole from the version it names (never half of
one), each client only ever moves forward in versions, and a pinned old version stays servable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fibemrss.domain.model_params import forward_logits, sigmoid, unflatten
from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.tools.bench.inference_bench import (
    inference_process,
    publish,
    sample_encoded_rows,
    sample_model_version,
    sample_patient,
)

pytestmark = pytest.mark.e2e

TASK = HEART_DISEASE_V1
VERSIONS = 6


@dataclass
class ClientLog:
    versions: list[int] = field(default_factory=list)
    mismatches: int = 0
    failures: list[str] = field(default_factory=list)


def probability(mv: ModelVersion, x: np.ndarray) -> np.ndarray:
    layers = unflatten(np.asarray(mv.model.params.tolist()), [tuple(s) for s in mv.model.shapes])  # type: ignore[misc]
    return sigmoid(forward_logits(layers, x))


def test_new_versions_are_served_without_a_failed_request(
    fresh_database: Callable[[str], str], tmp_path: Path
) -> None:
    url = fresh_database("hospital")
    models = {v: sample_model_version(TASK, v, seed=v) for v in range(1, VERSIONS + 1)}
    publish(url, models[1])
    # Every version shares the sample statistics, so these rows are valid inputs of each.
    x = sample_encoded_rows(TASK, models[1].model.stats, 2, seed=5)
    infer_request = kserve.ModelInferRequest(model_name=TASK.name)
    infer_request.inputs.add(name="features", datatype="FP32", shape=x.shape)
    infer_request.raw_input_contents.append(x.tobytes())
    pinned_request = kserve.ModelInferRequest()
    pinned_request.CopyFrom(infer_request)
    pinned_request.model_version = "1"
    diagnose_request = inference_pb2.DiagnoseRequest(patient=sample_patient())
    stop = threading.Event()

    def infer_client(channel: grpc.Channel, request: kserve.ModelInferRequest, log: ClientLog) -> None:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            try:
                r = stub.ModelInfer(request, timeout=10)
            except grpc.RpcError as exc:
                log.failures.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                continue
            version = int(r.model_version)
            log.versions.append(version)
            got = np.frombuffer(r.raw_output_contents[0], "<f4")
            if not np.allclose(got, probability(models[version], x), rtol=1e-6, atol=1e-7):
                log.mismatches += 1

    def diagnose_client(channel: grpc.Channel, log: ClientLog) -> None:
        stub = inference_pb2_grpc.DiagnosisServiceStub(channel)
        while not stop.is_set():
            try:
                r = stub.Diagnose(diagnose_request, timeout=10)
            except grpc.RpcError as exc:
                log.failures.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                continue
            log.versions.append(r.model_version)

    with inference_process(url, tmp_path, {"FIBEMRSS_MODEL_POLL_SECONDS": "0.1"}) as service:
        channels = [grpc.insecure_channel(service.address) for _ in range(3)]
        logs = {name: ClientLog() for name in ("infer-a", "infer-b", "pinned-v1", "diagnose-a", "diagnose-b")}
        threads = [
            threading.Thread(target=infer_client, args=(channels[0], infer_request, logs["infer-a"])),
            threading.Thread(target=infer_client, args=(channels[1], infer_request, logs["infer-b"])),
            threading.Thread(target=infer_client, args=(channels[2], pinned_request, logs["pinned-v1"])),
            threading.Thread(target=diagnose_client, args=(channels[0], logs["diagnose-a"])),
            threading.Thread(target=diagnose_client, args=(channels[1], logs["diagnose-b"])),
        ]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            for v in range(2, VERSIONS + 1):
                assert publish(url, models[v])
                time.sleep(0.4)
            deadline = time.monotonic() + 20
            while not all(
                log.versions and log.versions[-1] == VERSIONS for n, log in logs.items() if n != "pinned-v1"
            ):
                assert time.monotonic() < deadline, "the newest version was not picked up"
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            for c in channels:
                c.close()
        log_tail = service.log_tail()

    for name, log in logs.items():
        assert not log.failures, f"{name}: {log.failures[:3]}\n{log_tail}"
        assert log.mismatches == 0, f"{name}: an answer did not match the version it named"
        assert log.versions == sorted(log.versions), f"{name} saw a version go backwards"
    assert set(logs["pinned-v1"].versions) == {1}
    served = set().union(*(set(log.versions) for n, log in logs.items() if n != "pinned-v1"))
    assert {1, VERSIONS} <= served and len(served) >= 3, served
    assert sum(len(log.versions) for log in logs.values()) > 100
