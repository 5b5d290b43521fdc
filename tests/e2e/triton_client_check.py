"""Talks to the inference service with NVIDIA's tritonclient and prints what it saw as JSON.

Runs inside its own virtualenv (scripts/triton_venv.sh): tritonclient brings protobuf < 7 and
its own `inference` protos, so it imports nothing from this project.
usage: triton_client_check.py URL MODEL INPUTS.json   (INPUTS: a list of rows of floats)
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, **kw: Any) -> dict[str, Any]:
    tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput("probability"), grpcclient.InferRequestedOutput("logit")]
    result = client.infer(model, [tensor], outputs=outputs, request_id="check-1", **kw)
    response = result.get_response()
    return {
        "model_version": response.model_version,
        "id": response.id,
        "probability": result.as_numpy("probability").tolist(),
        "logit": result.as_numpy("logit").tolist(),
        "probability_shape": list(result.as_numpy("probability").shape),
    }


def error_of(call: Any) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def main() -> int:
    url, model, inputs_path = sys.argv[1:4]
    x = np.asarray(json.load(open(inputs_path)), dtype=np.float32)
    client = grpcclient.InferenceServerClient(url=url)
    metadata = client.get_model_metadata(model, as_json=True)
    wrong_dtype = grpcclient.InferInput("features", list(x.shape), "FP64")
    wrong_dtype.set_data_from_numpy(x.astype(np.float64))
    wrong_shape = grpcclient.InferInput("features", [1, x.shape[1] + 1], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, x.shape[1] + 1), dtype=np.float32))
    out = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "model_ready_v1": client.is_model_ready(model, "1"),
        "model_ready_v999": client.is_model_ready(model, "999"),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": metadata,
        "newest": infer(client, model, x),
        "pinned_v1": infer(client, model, x, model_version="1"),
        "wrong_datatype": error_of(lambda: client.infer(model, [wrong_dtype])),
        "wrong_shape": error_of(lambda: client.infer(model, [wrong_shape])),
        "unknown_model": error_of(lambda: client.infer("no-such-model", [wrong_shape])),
    }
    client.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
