"""Generated requests for the four inference APIs (Diagnose and DiagnoseBatch, KServe v2 ModelInfer
over gRPC, KServe v2 over REST, CDS Hooks), against a real inference service process with its gRPC
and HTTPS edges behind mutual TLS: never UNKNOWN, INTERNAL or an HTTP 5xx; every refusal of input
names a field (a BadRequest field violation, `<field>: <reason>` in a 400's error, a refused CDS
card naming the request field); and no confident answer beside a value that is not finite.

Patients and tensors are mutated from valid ones (so the value checks are reached, not only the
first structural one) or generated whole; JSON bodies are mutated from valid requests by the seeded
fuzzer of `tests/hostile/fuzzing.py`. FIBEMRSS_FUZZ_EXAMPLES sets the examples per test (default 200,
so `make test` stays well under 90 s; the figures in docs/security.md were taken with 1000).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fibemrss.domain.records import LOINC, UCI_HEART
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.channels import open_channel
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.bench.inference_bench import sample_encoded_rows, sample_patient
from tests.e2e.conftest import InferenceHttps, inference_https  # noqa: F401 - the fixture
from tests.e2e.test_cds_hooks import REQUEST, SERVICE
from tests.hostile.fuzzing import Fuzz

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FIBEMRSS_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
TASK = HEART_DISEASE_V1
MODEL = TASK.name
DIM = 31

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324, 50.0, 1000.0, 1000.5, 130.0]),
)
texts = st.one_of(
    st.text(max_size=12), st.sampled_from(["", "1", "mg/dL", "mmol/L", "kg", "/min", "mm", "x\x00"])
)
CODES = [
    (LOINC, "2093-3"),
    (LOINC, "8480-6"),
    (LOINC, "8867-4"),
    (UCI_HEART, "thalach"),
    (UCI_HEART, "oldpeak"),
    (UCI_HEART, "ca"),
    (UCI_HEART, "cp"),
    ("", ""),
    ("urn:x", "y"),
]
# JSON nested deeper than Python's parser recurses (it raised RecursionError: a 500 before).
DEEP = [b"[" * 100_000, b'{"a":' * 50_000, b"[" * 5000 + b"1" + b"]" * 5000]
UNITS = ["", "mg/dL", "mmol/L", "mm[Hg]", "kPa", "/min", "/s", "mm", "1", "kg", "Cel", "[degF]", "%"]


@pytest.fixture(scope="module")
def channel(inference_https: InferenceHttps) -> Any:  # noqa: F811 - the imported fixture
    with open_channel(inference_https.grpc, inference_https.tls("ehr@h")) as opened:
        yield opened


@pytest.fixture(scope="module")
def http(inference_https: InferenceHttps) -> Any:  # noqa: F811 - the imported fixture
    with inference_https.client() as client:
        yield client


SEEN: Counter[str] = Counter()  # outcomes per API, printed at the end (`-s`)


@pytest.fixture(scope="module", autouse=True)
def report() -> Any:
    yield
    print("\ninference fuzz outcomes:", dict(sorted(SEEN.items())))


def _refused(call: Any, request: Any) -> grpc.RpcError | None:
    """None when the call answered; the error otherwise, after the checks every refusal passes."""
    api = getattr(call, "_method", b"").decode().rsplit("/", 1)[-1]
    try:
        call(request, timeout=20)
        SEEN[f"{api} OK"] += 1
    except grpc.RpcError as exc:
        SEEN[f"{api} {exc.code().name}"] += 1
        assert exc.code() not in FORBIDDEN, f"{exc.code().name}: {exc.details()} for {str(request)[:400]}"
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            violations = field_violations(exc)
            assert violations, f"INVALID_ARGUMENT naming no field: {exc.details()}"
            assert all(f and d for f, d in violations), violations
        return exc
    return None


# -- Diagnose, DiagnoseBatch ------------------------------------------------------------------------
@st.composite
def patients(draw: st.DrawFn) -> emr_pb2.PatientRecord:
    patient = sample_patient()
    if draw(st.booleans()):
        patient.ClearField("age_years")
        patient.birth_date = draw(st.sampled_from(["", "1960-02-01", "2999-01-01", "1800-01-01", "x"]))
    elif draw(st.booleans()):
        patient.age_years = draw(floats)
    if draw(st.booleans()):
        patient.sex = draw(st.sampled_from(["male", "female", "other", "", "x"]))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        system, code = draw(st.sampled_from(CODES))
        obs = patient.observations.add(code=emr_pb2.Code(system=system, code=code))
        if draw(st.booleans()):
            obs.value = draw(floats)
        obs.unit = draw(st.one_of(st.sampled_from(UNITS), texts))
        if draw(st.booleans()):
            obs.value_code.CopyFrom(emr_pb2.Code(system=UCI_HEART, code=draw(texts)))
    if patient.observations and draw(st.booleans()):  # an existing value changed in place
        at = draw(st.integers(min_value=0, max_value=len(patient.observations) - 1))
        patient.observations[at].value = draw(floats)
    return patient


def _all_finite(patient: emr_pb2.PatientRecord) -> bool:
    values = [o.value for o in patient.observations if o.HasField("value")]
    if patient.HasField("age_years"):
        values.append(patient.age_years)
    return all(math.isfinite(v) for v in values)


@SETTINGS
@given(
    patient=patients(), others=st.lists(patients(), max_size=2), version=st.sampled_from([0, 0, 1, 2, 9, -1])
)
def test_diagnose_and_batch(channel: grpc.Channel, patient: Any, others: list[Any], version: int) -> None:
    stub = inference_pb2_grpc.DiagnosisServiceStub(channel)
    request = inference_pb2.DiagnoseRequest(patient=patient, model_version=version)
    if _refused(stub.Diagnose, request) is None:
        assert _all_finite(patient), "a confident answer beside a value that is not finite"
    batch = inference_pb2.DiagnoseBatchRequest(patients=[patient, *others], model_version=version)
    if _refused(stub.DiagnoseBatch, batch) is None:
        assert all(_all_finite(p) for p in batch.patients)


# -- ModelInfer over gRPC ---------------------------------------------------------------------------
DATATYPES = ["FP32", "FP32", "FP32", "FP64", "FP16", "INT32", "INT64", "UINT8", "BOOL", "BYTES", "", "fp32"]
CONTENTS = [
    "fp32_contents",
    "fp64_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "bool_contents",
]


@st.composite
def tensors(draw: st.DrawFn) -> tuple[kserve.ModelInferRequest, np.ndarray | None]:
    """A request and, when it carries FP32 rows the service could read, those rows."""
    request = kserve.ModelInferRequest(
        model_name=MODEL if draw(st.integers(0, 9)) else draw(st.sampled_from(["", "other"])),
        model_version=draw(st.sampled_from(["", "", "", "", "1", "2", "99", "0", "-1", "x"])),
        id=draw(texts),
    )
    for name in draw(st.lists(st.sampled_from(["probability", "logit", "x"]), max_size=2)):
        request.outputs.add(name=name)
    rows = draw(st.integers(min_value=1, max_value=4))
    x = sample_encoded_rows(TASK, _stats(), rows, seed=draw(st.integers(min_value=0, max_value=99)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        with np.errstate(over="ignore"):  # a double beyond FP32 becomes an infinity, as on the wire
            x[draw(st.integers(0, rows - 1)), draw(st.integers(0, DIM - 1))] = draw(floats)
    shape = list(x.shape)
    if draw(st.integers(0, 4)) == 0:
        shape = draw(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3))
    tensor = request.inputs.add(
        name=draw(st.sampled_from(["features", "features", "features", "", "INPUT__0"])),
        datatype=draw(st.sampled_from(DATATYPES)),
        shape=shape,
    )
    how = draw(st.sampled_from(["raw", "raw", "typed", "typed", "other", "junk", "both"]))
    if how in ("raw", "both"):
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    if how in ("typed", "both"):
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    if how == "other":
        field = draw(st.sampled_from(CONTENTS))
        values = draw(st.lists(st.integers(0, 1) if field != "fp64_contents" else floats, max_size=DIM))
        if field == "bool_contents":
            values = [bool(v) for v in values]
        elif field in ("fp32_contents", "fp64_contents"):
            values = [float(v) for v in values]
        getattr(tensor.contents, field).extend(values)
    if how == "junk":
        blob = draw(st.binary(max_size=4 * DIM * 2))
        request.raw_input_contents.append(blob)
    if draw(st.integers(0, 9)) == 0:
        request.inputs.add(name="features", datatype="FP32", shape=[1, DIM])
    readable = how in ("raw", "typed") and len(request.inputs) == 1 and shape == list(x.shape)
    return request, x if readable else None


_STATS: list[Any] = []


def _stats() -> Any:
    from fibemrss.tools.bench.inference_bench import sample_model_version

    if not _STATS:
        _STATS.append(sample_model_version(TASK).model.stats)
    return _STATS[0]


@SETTINGS
@given(case=tensors())
def test_model_infer_over_grpc(channel: grpc.Channel, case: tuple[Any, np.ndarray | None]) -> None:
    request, x = case
    if _refused(kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request) is None:
        assert x is not None and np.isfinite(x).all(), "a confident answer beside a non-finite input"


# -- KServe v2 over REST ----------------------------------------------------------------------------
NAMED = re.compile(r": [^:;]+: ")  # "<message>: <field>: <reason>" (platform/http_server.json_error)


def _check_http(r: httpx.Response, what: str) -> None:
    SEEN[f"{r.request.url.path.split('/')[1]} {r.status_code}"] += 1
    assert r.status_code < 500, f"{r.status_code} {r.text[:300]} for {what[:300]}"
    if r.status_code == 400:
        error = r.json()["error"]
        assert NAMED.search(error), f"a 400 naming no field: {error}"


def _rest_doc(x: np.ndarray) -> dict[str, Any]:
    return {
        "id": "f",
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.astype(float).ravel().tolist(),
            }
        ],
    }


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    mutations=st.integers(min_value=0, max_value=3),
    values=st.lists(st.tuples(st.integers(0, DIM * 2 - 1), floats), max_size=3),
    binary=st.booleans(),
    junk=st.one_of(st.none(), st.binary(max_size=200), st.sampled_from(DEEP)),
)
def test_kserve_rest(
    http: httpx.Client, seed: int, mutations: int, values: list[Any], binary: bool, junk: bytes | None
) -> None:
    fuzz = Fuzz(seed)
    x = sample_encoded_rows(TASK, _stats(), 2, seed=seed % 100)
    for at, value in values:
        with np.errstate(over="ignore"):
            x.reshape(-1)[at] = value
    headers: dict[str, str] = {}
    if junk is not None:
        body = junk
    elif binary:
        blob = x.astype("<f4").tobytes()
        doc = _rest_doc(x)
        del doc["inputs"][0]["data"]
        doc["inputs"][0]["parameters"] = {"binary_data_size": len(blob)}
        doc = fuzz.mutate_json(doc, mutations)
        head = json.dumps(doc).encode()
        if fuzz.rng.random() < 0.3:
            blob = fuzz.mutate_bytes(blob)
        body = head + blob
        headers["Inference-Header-Content-Length"] = str(
            fuzz.rng.choice([len(head), len(head), 0, len(head) + 3, -1])
        )
    else:
        body = json.dumps(fuzz.mutate_json(_rest_doc(x), mutations)).encode()  # NaN as Python writes it
    version = fuzz.rng.choice(["", "", "/versions/1", "/versions/x", "/versions/99"])
    r = http.post(f"/v2/models/{MODEL}{version}/infer", content=body, headers=headers)
    _check_http(r, repr(body[:200]))
    if r.status_code == 200 and junk is None and mutations == 0:
        assert np.isfinite(x).all(), "a confident answer beside a non-finite input"


# -- CDS Hooks --------------------------------------------------------------------------------------
def _prefetch_values(request: Any, left_out: set[int]) -> list[Any]:
    """Every valueQuantity.value of the prefetch's Observations (and their components), but those
    of the entries the card says were not used (an Observation the reader could not attribute to
    the patient: the model never read its value)."""
    out: list[Any] = []
    try:
        entries = request["prefetch"]["observations"]["entry"]
    except (KeyError, TypeError):
        return out
    for j, e in enumerate(entries if isinstance(entries, list) else []):
        if j in left_out:
            continue
        resource = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(resource, dict):
            continue
        components = resource.get("component")
        parts = [resource, *(components if isinstance(components, list) else [])]
        for part in parts:
            quantity = part.get("valueQuantity") if isinstance(part, dict) else None
            if isinstance(quantity, dict) and "value" in quantity:
                out.append(quantity["value"])
    return out


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    mutations=st.integers(min_value=0, max_value=4),
    value=st.one_of(st.none(), floats),
    birth=st.sampled_from([None, "2999-01-01", "1700-01-01", "1960-02-30", "1960"]),
    junk=st.one_of(st.none(), st.binary(max_size=120), st.sampled_from(DEEP)),
)
def test_cds_hooks(
    http: httpx.Client, seed: int, mutations: int, value: float | None, birth: str | None, junk: bytes | None
) -> None:
    fuzz = Fuzz(seed)
    request = copy.deepcopy(REQUEST)
    if value is not None:
        entry = fuzz.rng.randrange(len(request["prefetch"]["observations"]["entry"]))
        request["prefetch"]["observations"]["entry"][entry]["resource"]["valueQuantity"] = {
            "value": value,
            "unit": fuzz.rng.choice(UNITS),
        }
    if birth is not None:
        request["prefetch"]["patient"]["birthDate"] = birth
    request = fuzz.mutate_json(request, mutations)
    body = junk if junk is not None else json.dumps(request).encode()
    r = http.post(f"/cds-services/{SERVICE}", content=body, headers={"Content-Type": "application/json"})
    _check_http(r, repr(body[:200]))
    if r.status_code != 200:
        return
    (card,) = r.json()["cards"]
    SEEN[
        "cds card: "
        + (
            "refused"
            if "Refused:" in card.get("detail", "")
            else "risk"
            if card.get("suggestions")
            else "missing"
        )
    ] += 1
    if "Refused:" in card.get("detail", ""):
        lines = [line for line in card["detail"].splitlines()[1:] if line]
        assert lines and all(line.startswith("- prefetch") for line in lines), card["detail"]
        assert "suggestions" not in card
    if card.get("suggestions"):  # a risk: every value it read was a finite number
        not_used = "".join(line for line in card["detail"].splitlines() if line.startswith("Not used:"))
        left_out = {int(j) for j in re.findall(r"prefetch\.observations\.entry\[(\d+)\]", not_used)}
        values = _prefetch_values(request, left_out)
        assert all(not isinstance(v, float) or math.isfinite(v) for v in values), values
