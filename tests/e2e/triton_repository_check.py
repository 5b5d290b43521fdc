"""Lists the models an inference service serves with NVIDIA's tritonclient and infers each one.

Runs inside its own virtualenv (scripts/triton_venv.sh), importing nothing from this project.
usage: triton_repository_check.py URL ROWS.json   (ROWS: {model: [rows of floats]})
Prints {"index": [...], "probability": {model: [...]}} as JSON. With mutual TLS, the environment
names the files (TRITON_TLS_CA, TRITON_TLS_CERT, TRITON_TLS_KEY) and the server's certificate name
(TRITON_SERVER_NAME).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> int:
    url, rows_path = sys.argv[1:3]
    rows = json.load(open(rows_path))
    if os.environ.get("TRITON_TLS_CA"):
        client = grpcclient.InferenceServerClient(
            url=url,
            ssl=True,
            root_certificates=os.environ["TRITON_TLS_CA"],
            private_key=os.environ["TRITON_TLS_KEY"],
            certificate_chain=os.environ["TRITON_TLS_CERT"],
            channel_args=[("grpc.ssl_target_name_override", os.environ["TRITON_SERVER_NAME"])],
        )
    else:
        client = grpcclient.InferenceServerClient(url=url)
    index = client.get_model_repository_index(as_json=True).get("models", [])
    probability = {}
    for model in rows:
        x = np.asarray(rows[model], dtype=np.float32)
        tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("probability")])
        probability[model] = result.as_numpy("probability").tolist()
    print(json.dumps({"index": index, "probability": probability}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
