"""Talks to the inference service's KServe v2 REST edge with tritonclient.http, prints JSON of what it saw.

Runs inside its own virtualenv (scripts/triton_venv.sh), importing nothing from this project.
usage: triton_http_check.py HOST:PORT MODEL INPUTS.json CA CERT KEY
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def infer(
    client: httpclient.InferenceServerClient, model: str, x: np.ndarray, binary: bool, **kw: Any
) -> dict[str, Any]:
    tensor = httpclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("probability", binary_data=binary),
        httpclient.InferRequestedOutput("logit", binary_data=binary),
    ]
    result = client.infer(model, [tensor], outputs=outputs, request_id="check-1", **kw)
    response = result.get_response()
    return {
        "model_version": response["model_version"],
        "id": response.get("id", ""),
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
    url, model, inputs_path, ca, cert, key = sys.argv[1:7]
    x = np.asarray(json.load(open(inputs_path)), dtype=np.float32)
    client = httpclient.InferenceServerClient(
        url=url, ssl=True, ssl_options={"ca_certs": ca, "certfile": cert, "keyfile": key}
    )
    wrong_dtype = httpclient.InferInput("features", list(x.shape), "FP64")
    wrong_dtype.set_data_from_numpy(x.astype(np.float64))
    wrong_shape = httpclient.InferInput("features", [1, x.shape[1] + 1], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, x.shape[1] + 1), dtype=np.float32))
    out = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "model_ready_v1": client.is_model_ready(model, "1"),
        "model_ready_v999": client.is_model_ready(model, "999"),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata(model),
        "newest_binary": infer(client, model, x, binary=True),
        "newest_json": infer(client, model, x, binary=False),
        "pinned_v1": infer(client, model, x, binary=True, model_version="1"),
        "wrong_datatype": error_of(lambda: client.infer(model, [wrong_dtype])),
        "wrong_shape": error_of(lambda: client.infer(model, [wrong_shape])),
        "unknown_model": error_of(lambda: client.infer("no-such-model", [wrong_shape])),
    }
    client.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
