"""Every numeric input of every inference API, table-driven, against the real service process
(gRPC and HTTPS with client certificates on loopback): a NaN, an infinity or a value outside what
the feature allows is refused naming the field (INVALID_ARGUMENT with a BadRequest field
violation, HTTP 400 naming the REST field, or for CDS Hooks a card naming the request field and
giving no risk); a value at its range's limit is accepted. The checks are
`services/inference/core/input_limits.py`; docs/inference.md "Input limits"."""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.api.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fibemrss.domain.feature_encoding import encode, input_names
from fibemrss.domain.feature_extraction import extract
from fibemrss.domain.records import LOINC
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.channels import open_channel
from fibemrss.platform.status_mapping import field_violations
from fibemrss.serde.records import record_from_proto
from fibemrss.tools.bench.inference_bench import sample_patient
from tests.e2e.conftest import InferenceHttps
from tests.e2e.test_cds_hooks import REQUEST, SERVICE, observation, quantity

pytestmark = pytest.mark.e2e

TASK = HEART_DISEASE_V1
MODEL = TASK.name
COLUMNS = input_names(TASK)
DIM = len(COLUMNS)
CHOL = COLUMNS.index("cholesterol")
CHOL_MISSING = COLUMNS.index("cholesterol_missing")
SEX_MALE, SEX_FEMALE = COLUMNS.index("sex=male"), COLUMNS.index("sex=female")
ROW = 1  # the refused value sits in the second row of a two-row tensor
INDEX = ROW * DIM + CHOL


def with_cholesterol(value: float, unit: str = "mg/dL") -> emr_pb2.PatientRecord:
    patient = sample_patient()
    patient.observations.add(code=emr_pb2.Code(system=LOINC, code="2093-3"), value=value, unit=unit)
    return patient


CHOL_FIELD = f"observations[{len(sample_patient().observations)}]"

# (what, patient change, the field refused, or None when accepted)
PATIENTS: list[tuple[str, Callable[[], emr_pb2.PatientRecord], str | None]] = [
    ("NaN", lambda: with_cholesterol(math.nan), f"{CHOL_FIELD}.value"),
    ("+inf", lambda: with_cholesterol(math.inf), f"{CHOL_FIELD}.value"),
    ("-inf", lambda: with_cholesterol(-math.inf), f"{CHOL_FIELD}.value"),
    ("above the range", lambda: with_cholesterol(1000.5), f"{CHOL_FIELD}.value"),
    ("below the range", lambda: with_cholesterol(49.5), f"{CHOL_FIELD}.value"),
    ("above the range in mmol/L", lambda: with_cholesterol(30.0, "mmol/L"), f"{CHOL_FIELD}.value"),
    ("a unit that does not convert", lambda: with_cholesterol(200.0, "kg"), f"{CHOL_FIELD}.unit"),
    ("the upper limit", lambda: with_cholesterol(1000.0), None),
    ("the lower limit", lambda: with_cholesterol(50.0), None),
    ("no unit: the feature's", lambda: with_cholesterol(240.0, ""), None),
    ("age NaN", lambda: _changed(age_years=math.nan), "age_years"),
    ("age -inf", lambda: _changed(age_years=-math.inf), "age_years"),
    ("age 131", lambda: _changed(age_years=131.0), "age_years"),
    ("age 130", lambda: _changed(age_years=130.0), None),
    ("age 0", lambda: _changed(age_years=0.0), None),
    ("born in the future", lambda: _changed(birth_date="2999-01-01"), "birth_date"),
    ("an unread code, +inf", lambda: _unread(math.inf), f"{CHOL_FIELD}.value"),
    ("an unread code, implausible but finite", lambda: _unread(1e300), None),
]


def _changed(**fields: Any) -> emr_pb2.PatientRecord:
    patient = sample_patient()
    if "birth_date" in fields:
        patient.ClearField("age_years")
    for name, value in fields.items():
        setattr(patient, name, value)
    return patient


def _unread(value: float) -> emr_pb2.PatientRecord:
    patient = sample_patient()
    patient.observations.add(code=emr_pb2.Code(system=LOINC, code="8867-4"), value=value, unit="/min")
    return patient


def diagnosis_stub(inference_https: InferenceHttps) -> tuple[grpc.Channel, Any]:
    channel = open_channel(inference_https.grpc, inference_https.tls("ehr@h"))
    return channel, inference_pb2_grpc.DiagnosisServiceStub(channel)


def refused_fields(call: Callable[[], Any]) -> list[str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    violations = field_violations(err.value)
    assert violations and all(description for _, description in violations)
    return [f for f, _ in violations]


@pytest.mark.parametrize(("what", "patient", "field"), PATIENTS, ids=[p[0] for p in PATIENTS])
def test_diagnose_and_diagnose_batch(
    inference_https: InferenceHttps,
    what: str,
    patient: Callable[[], emr_pb2.PatientRecord],
    field: str | None,
) -> None:
    channel, stub = diagnosis_stub(inference_https)
    with channel:
        one = inference_pb2.DiagnoseRequest(patient=patient())
        batch = inference_pb2.DiagnoseBatchRequest(patients=[sample_patient(), patient(), sample_patient()])
        if field is None:
            assert 0.0 <= stub.Diagnose(one, timeout=10).probability <= 1.0
            assert len(stub.DiagnoseBatch(batch, timeout=10).references) == 3
        else:
            assert f"patient.{field}" in refused_fields(lambda: stub.Diagnose(one, timeout=10))
            assert f"patients[1].{field}" in refused_fields(lambda: stub.DiagnoseBatch(batch, timeout=10))


def test_diagnose_scores_a_value_in_the_features_unit(inference_https: InferenceHttps) -> None:
    """6.2 mmol/L of cholesterol is 239.754 mg/dL (the gateway's conversion): the same answer,
    where the model used to read 6.2 as mg/dL (now an implausible one, refused)."""
    channel, stub = diagnosis_stub(inference_https)
    with channel:
        molar = stub.Diagnose(
            inference_pb2.DiagnoseRequest(patient=with_cholesterol(6.2, "mmol/L")), timeout=10
        )
        mass = stub.Diagnose(inference_pb2.DiagnoseRequest(patient=with_cholesterol(239.754)), timeout=10)
        high = stub.Diagnose(inference_pb2.DiagnoseRequest(patient=with_cholesterol(600.0)), timeout=10)
    assert molar.probability == pytest.approx(mass.probability, abs=1e-9)
    assert high.probability != pytest.approx(mass.probability, abs=1e-6)  # cholesterol does count


def test_a_batch_of_junk_names_at_most_ten_fields_and_says_there_are_more(
    inference_https: InferenceHttps,
) -> None:
    channel, stub = diagnosis_stub(inference_https)
    with channel:
        batch = inference_pb2.DiagnoseBatchRequest(patients=[with_cholesterol(math.inf)] * 50)
        violations = _violations(lambda: stub.DiagnoseBatch(batch, timeout=10))
        tensor = infer_request(np.full((100, DIM), np.nan, np.float32), raw=False)
        infer = _violations(
            lambda: kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(tensor, timeout=10)
        )
    assert len(violations) == 11 and violations[0][0] == f"patients[0].{CHOL_FIELD}.value"
    assert violations[-1][0] == "patients" and "more values are refused" in violations[-1][1]
    assert len(infer) == 11 and infer[9][0] == "inputs[0].contents.fp32_contents[9]"
    assert infer[-1] == ("inputs[0].contents.fp32_contents", violations[-1][1])


def _violations(call: Callable[[], Any]) -> list[tuple[str, str]]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return field_violations(err.value)


# -- KServe v2: encoded rows ------------------------------------------------------------------------
def encoded(inference_https: InferenceHttps, cholesterol: float = 240.0) -> np.ndarray:
    """Two encoded rows of the sample patient under the newest version's statistics, the second
    (ROW) with this cholesterol."""
    stats = inference_https.versions[-1].model.stats
    values = extract(TASK, record_from_proto(sample_patient()))[0]
    at = [f.name for f in TASK.features].index("cholesterol")
    rows = [list(values), list(values)]
    rows[0][at], rows[ROW][at] = 240.0, cholesterol
    return encode(TASK, stats, rows).astype(np.float32)


def _at(column: int, value: float) -> Callable[[np.ndarray], None]:
    def change(x: np.ndarray) -> None:
        x[ROW, column] = value

    return change


def _set(*pairs: tuple[int, float]) -> Callable[[np.ndarray], None]:
    def change(x: np.ndarray) -> None:
        for column, value in pairs:
            x[ROW, column] = value

    return change


# (what, cholesterol encoded, a change to the rows, the flat index refused or None when accepted)
TENSORS: list[tuple[str, float, Callable[[np.ndarray], None], int | None]] = [
    ("NaN", 240.0, _at(CHOL, math.nan), INDEX),
    ("+inf", 240.0, _at(CHOL, math.inf), INDEX),
    ("-inf", 240.0, _at(CHOL, -math.inf), INDEX),
    ("the z-score of 1001 mg/dL", 1001.0, lambda x: None, ROW * DIM + CHOL),
    ("the z-score of 49 mg/dL", 49.0, lambda x: None, ROW * DIM + CHOL),
    ("the z-score of 1000 mg/dL (the limit)", 1000.0, lambda x: None, None),
    ("the z-score of 50 mg/dL (the limit)", 50.0, lambda x: None, None),
    ("a missing indicator of 0.5", 240.0, _at(CHOL_MISSING, 0.5), ROW * DIM + CHOL_MISSING),
    ("missing, with a value", 240.0, _at(CHOL_MISSING, 1.0), ROW * DIM + CHOL),
    ("a one-hot column of -1", 240.0, _at(SEX_FEMALE, -1.0), ROW * DIM + SEX_FEMALE),
    ("two one-hot columns set", 240.0, _set((SEX_MALE, 1.0), (SEX_FEMALE, 1.0)), ROW * DIM + SEX_MALE),
    ("missing, encoded as the protocol says", 240.0, _set((CHOL, 0.0), (CHOL_MISSING, 1.0)), None),
]


def infer_request(x: np.ndarray, raw: bool) -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="features", datatype="FP32", shape=x.shape)
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize(("what", "cholesterol", "change", "index"), TENSORS, ids=[t[0] for t in TENSORS])
def test_model_infer_over_grpc(
    inference_https: InferenceHttps,
    raw: bool,
    what: str,
    cholesterol: float,
    change: Callable[[np.ndarray], None],
    index: int | None,
) -> None:
    x = encoded(inference_https, cholesterol)
    change(x)
    with open_channel(inference_https.grpc, inference_https.tls("ehr@h")) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        if index is None:
            answer = stub.ModelInfer(infer_request(x, raw), timeout=10)
            assert np.isfinite(np.frombuffer(answer.raw_output_contents[0], "<f4")).all()
            return
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(infer_request(x, raw), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    field = "raw_input_contents[0]" if raw else f"inputs[0].contents.fp32_contents[{index}]"
    assert violations[0][0] == field, violations
    assert (
        f"element {index} (row {ROW}, column {index - ROW * DIM} {COLUMNS[index - ROW * DIM]})"
        in violations[0][1]
    )


def test_a_typed_value_beyond_fp32_is_refused(inference_https: InferenceHttps) -> None:
    """fp32_contents holds floats, but a client's 1e39 arrives as inf: refused, not scored."""
    request = infer_request(encoded(inference_https), raw=False)
    request.inputs[0].contents.fp32_contents[INDEX] = 1e39
    with open_channel(inference_https.grpc, inference_https.tls("ehr@h")) as channel:
        fields = refused_fields(
            lambda: kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        )
    assert fields == [f"inputs[0].contents.fp32_contents[{INDEX}]"]


def rest_body(x: np.ndarray, binary: bool) -> tuple[bytes, dict[str, str]]:
    tensor: dict[str, Any] = {"name": "features", "datatype": "FP32", "shape": list(x.shape)}
    if not binary:
        tensor["data"] = x.astype(float).ravel().tolist()
        return json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"}
    blob = x.astype("<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(blob)}
    head = json.dumps({"inputs": [tensor]}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(("what", "cholesterol", "change", "index"), TENSORS, ids=[t[0] for t in TENSORS])
def test_model_infer_over_rest(
    inference_https: InferenceHttps,
    binary: bool,
    what: str,
    cholesterol: float,
    change: Callable[[np.ndarray], None],
    index: int | None,
) -> None:
    x = encoded(inference_https, cholesterol)
    change(x)
    body, headers = rest_body(x, binary)  # JSON: NaN and Infinity as Python writes them
    with inference_https.client() as client:
        r = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    if index is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    field = "inputs[0].data (binary)" if binary else f"inputs[0].data[{index}]"
    assert f"{field}: element {index} (row {ROW}," in r.json()["error"]


def test_rest_json_numbers_beyond_a_double_are_refused(inference_https: InferenceHttps) -> None:
    """1e400 parses as inf and a 400-digit integer does not fit a double: both named, not 500."""
    x = encoded(inference_https)
    for junk in ("1e400", "-1e400", "9" * 400):
        data = [str(v) for v in x.astype(float).ravel().tolist()]
        data[INDEX] = junk
        tensor = (
            f'{{"name": "features", "datatype": "FP32", "shape": [2, {DIM}], "data": [{",".join(data)}]}}'
        )
        body = '{"inputs": [' + tensor + "]}"
        with inference_https.client() as client:
            r = client.post(f"/v2/models/{MODEL}/infer", content=body.encode())
        assert r.status_code == 400, (junk[:8], r.text)
        assert "inputs[0].data" in r.json()["error"]


# -- CDS Hooks: the prefetch's Observation values ---------------------------------------------------
CDS_CHOL = "prefetch.observations.entry[1].resource.valueQuantity"


def cds_request(chol: dict[str, Any] | None = None, birth_date: str | None = None) -> dict[str, Any]:
    request = copy.deepcopy(REQUEST)
    request["hookInstance"] = str(uuid.uuid4())
    if chol is not None:
        request["prefetch"]["observations"]["entry"][1] = observation("chol", LOINC, "2093-3", **chol)
    if birth_date is not None:
        request["prefetch"]["patient"]["birthDate"] = birth_date
    return request


# (what, request, the request field refused or None when a risk is given)
CDS: list[tuple[str, dict[str, Any], str | None]] = [
    ("NaN", cds_request(quantity(math.nan, "mg/dL")), f"{CDS_CHOL}.value"),
    ("+inf", cds_request(quantity(math.inf, "mg/dL")), f"{CDS_CHOL}.value"),
    ("-inf", cds_request(quantity(-math.inf, "mg/dL")), f"{CDS_CHOL}.value"),
    ("above the range", cds_request(quantity(1000.5, "mg/dL")), f"{CDS_CHOL}.value"),
    ("below the range in mmol/L", cds_request(quantity(1.2, "mmol/L")), f"{CDS_CHOL}.value"),
    ("a unit that does not convert", cds_request(quantity(200, "kg")), CDS_CHOL),
    ("the upper limit", cds_request(quantity(1000, "mg/dL")), None),
    ("the lower limit", cds_request(quantity(50, "mg/dL")), None),
    (
        "a component's value",
        cds_request(
            {
                "component": [
                    {"code": {"coding": [{"system": LOINC, "code": "2093-3"}]}, **quantity(math.inf, "mg/dL")}
                ]
            }
        ),
        "prefetch.observations.entry[1].resource.component[0].valueQuantity.value",
    ),
    ("born in the future", cds_request(birth_date="2999-01-01"), "prefetch.patient.birthDate"),
    ("born 200 years ago", cds_request(birth_date="1826-01-01"), "prefetch.patient.birthDate"),
]


@pytest.mark.parametrize(("what", "request_", "field"), CDS, ids=[c[0] for c in CDS])
def test_cds_hooks_prefetch_values(
    inference_https: InferenceHttps, what: str, request_: dict[str, Any], field: str | None
) -> None:
    with inference_https.client() as client:
        r = client.post(f"/cds-services/{SERVICE}", content=json.dumps(request_).encode())
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    if field is None:
        assert "risk reference:" in card["summary"] and card["suggestions"], card
        return
    # Refused: no risk, no RiskAssessment to record, and the refused field named for the clinician.
    assert "no risk reference" in card["summary"] and "suggestions" not in card, card
    assert card["indicator"] == "warning"
    assert f"- {field}: " in card["detail"], card["detail"]
