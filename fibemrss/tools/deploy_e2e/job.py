"""The demo's job against the pods, from the host over mutual TLS: the demo's ingest, the study
client's proposal and approvals, the federation, a pod of each kind killed on the way, the final
models compared in each hospital's own database, and a diagnosis reference."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.domain.tasks import get_task
from fibemrss.platform.channels import open_channel
from fibemrss.serde.records import record_to_proto
from fibemrss.tools.demo import GIVE_UP_AFTER_FAILURES, held_out_patient, ingest_all
from fibemrss.tools.deploy_e2e.sites import (
    GRPC,
    HEALTH,
    T0,
    TASK,
    Deployment,
    Site,
    log,
    podman,
    restart_count,
)
from fibemrss.tools.local_cluster import tls_for
from fibemrss.tools.study_review import document_of, propose_and_approve


def endpoints_of(dep: Deployment, pki: Path) -> dict[str, Any]:
    """The pods as an endpoints document, the shape `fibemrss up` writes, so the demo's and the
    study client's own code talk to them: each pod's address on its site network (what the node
    reaches), and every identity's certificate from the run's key ceremony. Each client pins the
    server's identity (`gateway@<h>`) as everywhere else."""
    identities = [p.stem for p in pki.glob("*@*.crt")]
    return {
        "aggregator": f"{dep.address(dep.central, 'aggregator')}:{GRPC}",
        "hospitals": {
            site.name: {
                "gateway": f"{dep.address(site, 'emr-gateway')}:{GRPC}",
                "agent": f"{dep.address(site, 'hospital-agent')}:{GRPC}",
                "inference": f"{dep.address(site, 'inference')}:{GRPC}",
            }
            for site in dep.hospitals
        },
        "tls": {
            "ca": str(pki / "ca.crt"),
            "certs": {i: {"cert": str(pki / f"{i}.crt"), "key": str(pki / f"{i}.key")} for i in identities},
        },
    }


def healthy(address: str) -> bool:
    """The plaintext health port, as the kubelet's gRPC probe asks it."""
    with grpc.insecure_channel(f"{address}:{HEALTH}") as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False


def postgres_ready(dep: Deployment, site: Site) -> bool:
    c = site.container("postgresql")
    return (
        subprocess.run(
            ["podman", "exec", c, "pg_isready", "-q", "-h", "127.0.0.1"], capture_output=True
        ).returncode
        == 0
    )


def ingest(dep: Deployment, pki: Path, per_hospital: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """The demo's ingest (each hospital's CSV through its own gateway as `ingest@<h>`), and the
    first hospital's first held-out patient (the demo's), for the diagnosis at the end."""
    summary = ingest_all(endpoints_of(dep, pki), per_hospital, quiet=False)
    first = dep.hospitals[0].name
    return summary, held_out_patient(first, per_hospital[first])


def start_federation(dep: Deployment, pki: Path, rounds: int) -> None:
    """The one place the harness starts the federation (as operator@central), after the study
    client's proposal and approvals (`propose_and_approve`, as `fibemrss study
    propose|review|approve` and the demo do); the federation is pinned to the proposal's hash."""
    endpoints = endpoints_of(dep, pki)
    digest, decisions = propose_and_approve(
        endpoints, [h.name for h in dep.hospitals], document_of(get_task(TASK)), tls_for,
        reason="approved by the deploy harness's operator",
    )
    for h, decision in decisions.items():
        log(f"  {h}: {TASK} {digest[:19]}... reviewed and approved ({decision.study_hash[:19]}...)")
    with open_channel(
        endpoints["aggregator"], tls_for(endpoints, "operator@central"), "aggregator@central"
    ) as ch:
        federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
            fpb.StartFederationRequest(
                task=TASK,
                rounds=rounds,
                # Secure aggregation: a round closes without a hospital whose agent is killed in
                # it (recovered from the others' shares; nobody uploads twice), 10 s after the rest.
                quorum=max(len(dep.hospitals) - 1, 3),
                grace_seconds=10.0,
                deadline_seconds=120.0,
                hospitals=[h.name for h in dep.hospitals],
                # As the task's study document says (fibemrss study show heart-disease-v1).
                pairwise_masking=True,
                min_contributors=3,
                study_hash=digest,
            ),
            timeout=30,
        )


def agent_statuses(dep: Deployment, pki: Path) -> dict[str, Any]:
    """Each reachable agent's status; an agent being restarted is simply absent."""
    out = {}
    for site in dep.hospitals:
        with open_channel(
            f"{dep.address(site, 'hospital-agent')}:{GRPC}",
            tls_for(endpoints_of(dep, pki), f"operator@{site.name}"),
            f"agent@{site.name}",
        ) as ch:
            try:
                out[site.name] = (
                    federation_pb2_grpc.HospitalAgentServiceStub(ch)
                    .GetAgentStatus(fpb.GetAgentStatusRequest(task=TASK), timeout=5)
                    .status
                )
            except grpc.RpcError:
                pass
    return out


@dataclass
class Kill:
    after_round: int
    site: Site
    kind: str
    restarts_before: int = 0
    done: bool = False
    back_in: float | None = None


def kill(dep: Deployment, k: Kill) -> None:
    """SIGKILL of the container's process, as a crash. (`podman kill` sends the same signal, but
    podman 4.3 then marks the container stopped by the user and its restart policy never acts;
    the kubelet restarts a container however it died.)"""
    c = k.site.container(k.kind)
    k.restarts_before = restart_count(c)
    pid = int(podman("inspect", c, "--format", "{{.State.Pid}}").strip())
    os.kill(pid, signal.SIGKILL)
    k.done = True
    log(f"killed {c} (SIGKILL to its process {pid}), after round {k.after_round}")


def came_back(dep: Deployment, k: Kill) -> bool:
    c = k.site.container(k.kind)
    if restart_count(c) <= k.restarts_before:
        return False
    if k.kind == "postgresql":
        return postgres_ready(dep, k.site)
    return healthy(dep.address(k.site, k.kind))


def run_federation(
    dep: Deployment, pki: Path, rounds: int, kills: list[Kill], timeout: float
) -> list[dict[str, Any]]:
    reported: list[dict[str, Any]] = []
    end = time.monotonic() + timeout
    killed_at: dict[int, float] = {}
    seen: dict[str, dict[int, tuple[int, int]]] = {}
    while True:
        statuses = agent_statuses(dep, pki)
        for h, st in statuses.items():
            # An agent retries every failure (capped backoff) and says so; only a run of them is fatal.
            if st.error and st.consecutive_failures >= GIVE_UP_AFTER_FAILURES:
                raise RuntimeError(f"agent of {h} keeps failing: {st.error}")
        # Evaluations accumulate here: an agent keeps its own in memory, so a restarted one
        # reports only the rounds after its restart.
        for h, st in statuses.items():
            for e in st.evaluations:
                seen.setdefault(h, {})[e.round] = (e.correct, e.total)
        if len(seen) == len(dep.hospitals):
            r = len(reported) + 1
            # Round r is complete when every hospital evaluated it, or when one never will (a
            # restarted agent that already evaluated a later round): then it pools the others.
            while r <= rounds and all(r in ev or max(ev) > r for ev in seen.values()):
                have = [ev[r] for ev in seen.values() if r in ev]
                correct, total = sum(c for c, _ in have), sum(t for _, t in have)
                if not have:  # a round every hospital skipped (failed): nothing to pool
                    reported.append({"round": r, "failed": True, "seconds": round(time.monotonic() - T0, 1)})
                    log(f"round {r:>3}  failed (no hospital published it)")
                    r += 1
                    continue
                reported.append(
                    {
                        "round": r,
                        "pooled_test_accuracy": correct / total,
                        "hospitals": len(have),
                        "seconds": round(time.monotonic() - T0, 1),
                    }
                )
                log(
                    f"round {r:>3}  pooled test accuracy {correct / total:.3f}  ({correct}/{total}"
                    + (f", {len(have)} of {len(seen)} hospitals" if len(have) < len(seen) else "")
                    + ")"
                )
                r += 1
            if (
                len(reported) == rounds
                and len(statuses) == len(dep.hospitals)
                and all(st.done for st in statuses.values())
            ):
                if reported[-1].get("hospitals") != len(dep.hospitals):
                    raise AssertionError("the final round was not evaluated at every hospital")
                return reported
        for i, k in enumerate(kills):
            # One kill at a time: the next waits until the previous pod is back (two at once,
            # a hospital's PostgreSQL and an agent, once left the federation stuck: see the report).
            if (
                not k.done
                and len(reported) >= k.after_round
                and len(reported) < rounds
                and all(x.back_in is not None for x in kills[:i])
            ):
                kill(dep, k)
                killed_at[i] = time.monotonic()
            if k.done and k.back_in is None and came_back(dep, k):
                k.back_in = round(time.monotonic() - killed_at[i], 1)
                log(f"{k.site.container(k.kind)} is back by its restart policy in {k.back_in} s")
        if time.monotonic() > end:
            raise TimeoutError(f"the federation did not finish in {timeout:.0f} s ({len(reported)} rounds)")
        time.sleep(0.2)


def final_models(dep: Deployment) -> dict[str, dict[str, Any]]:
    """The newest published global model at each hospital (a personalized version after the last
    round is each hospital's own, by design), read in its own database pod: its version and
    round, an md5 of its parameters, and an md5 of the whole model (parameters, the global
    standardization statistics, input names, shapes, threshold: nothing per hospital is in it;
    the local test metrics are stored beside it, not in it)."""
    out = {}
    for site in dep.hospitals:
        row = podman(
            "exec",
            site.container("postgresql"),
            "psql",
            "-h",
            "/tmp",
            "-U",
            "fibemrss",
            "-d",
            "fibemrss",
            "-tA",
            "-F",
            " ",
            "-c",
            "SELECT version, federated_round, md5((model_json->'params')::text), md5(model_json::text) "
            f"FROM model_versions WHERE task='{TASK}' AND kind='global' ORDER BY version DESC LIMIT 1",
        ).split()
        out[site.name] = {
            "version": int(row[0]),
            "federated_round": int(row[1]),
            "params_md5": row[2],
            "md5": row[3],
        }
    return out


def check_same_model(models: dict[str, dict[str, Any]], rounds: int) -> None:
    """Every hospital's newest model is the last round's, with the same parameters (and the same
    model around them)."""
    for what in ("version", "federated_round", "params_md5", "md5"):
        if len({m[what] for m in models.values()}) != 1:
            raise AssertionError(f"the hospitals' final models differ in {what}: {models}")
    if any(m["federated_round"] != rounds for m in models.values()):
        raise AssertionError(f"the final models are not of round {rounds}: {models}")


def diagnose(dep: Deployment, pki: Path, patient: Any, final_version: int) -> dict[str, Any]:
    site = dep.hospitals[0]
    with open_channel(
        f"{dep.address(site, 'inference')}:{GRPC}",
        tls_for(endpoints_of(dep, pki), f"ehr@{site.name}"),
        f"inference@{site.name}",
    ) as ch:
        stub = inference_pb2_grpc.DiagnosisServiceStub(ch)
        end = time.monotonic() + 60
        while True:
            try:
                r = stub.Diagnose(
                    inference_pb2.DiagnoseRequest(task=TASK, patient=record_to_proto(patient)), timeout=20
                )
            except grpc.RpcError as exc:
                # UNAVAILABLE is the retryable code (a peer or database that just restarted).
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                    raise
                time.sleep(0.5)
                continue
            if r.model_version >= final_version or time.monotonic() > end:
                break
            time.sleep(0.5)
    return {
        "hospital": site.name,
        "probability": round(r.probability, 4),
        "label": r.label,
        "risk_band": r.risk_band,
        "model_version": r.model_version,
        "federated_round": r.federated_round,
    }

