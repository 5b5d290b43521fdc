"""The podman objects of one run: sites, their networks and pods, and how to remove them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fibemrss.tools.paths import REPO_ROOT

ROOT = REPO_ROOT
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
GRPC, METRICS, HEALTH = 50051, 9464, 8081

# Addresses: site i (central 0, hospitals 1..4) owns 198.18.(4i).0/22; the site network is
# 198.18.(4i).0/24, a hospital's uplink to the aggregator 198.18.(4i+2).0/24. Inside each:
#   .5 postgresql  .10 aggregator or emr-gateway  .11 hospital-agent  .12 inference
HOST_OCTET = {"postgresql": 5, "aggregator": 10, "emr-gateway": 10, "hospital-agent": 11, "inference": 12}

# When the run started: every figure of seconds is counted from here.
T0 = time.monotonic()


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
                # Init containers (the `migrate` one) mount the same volumes.
                for c in [*pod.get("initContainers", []), *pod["containers"]]:
                    for m in c.get("volumeMounts", []):
                        if m["name"] == old:
                            m["name"] = v["name"]
        # Kubernetes publishes nothing on the node for a containerPort without hostPort; podman 4.3
        # publishes each containerPort on the host. The ports are documentation only: drop them.
        for c in pod["containers"]:
            c.pop("ports", None)
        # The ConfigMaps the pod reads: its environment's, and those it mounts (the revocation list).
        wanted = {
            e["configMapRef"]["name"]
            for c in [*pod.get("initContainers", []), *pod["containers"]]
            for e in c.get("envFrom", [])
            if "configMapRef" in e
        } | {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
        configmaps = [d for d in site.docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] in wanted]
        args = ["kube", "play", "--log-driver", "k8s-file"]
        for net, ip in self.networks_of(site, kind):
            args += ["--network", f"{net.name}:ip={ip}"]
        # podman 4.3's kube play removes an init container while it still runs ("cannot remove
        # container ... as it is running"): each init container (the chart's `migrate`) runs here
        # first as a pod of its own, to completion, as the kubelet would run it before the others.
        for init in pod.pop("initContainers", []):
            self._run_to_completion(site, kind, pod, init, configmaps, args)
        path = self.work / "manifests" / f"{site.service(kind)}.yaml"
        path.write_text(yaml.safe_dump_all([*configmaps, deployment]))
        self.pods.append(site.pod(kind))
        podman(*args, str(path))

    def _run_to_completion(
        self,
        site: Site,
        kind: str,
        pod: dict[str, Any],
        init: dict[str, Any],
        configmaps: list[dict[str, Any]],
        play_args: list[str],
    ) -> None:
        name = f"{site.service(kind)}-{init['name']}"
        once = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                **{k: v for k, v in pod.items() if k not in ("containers", "initContainers")},
                "containers": [init],
                "restartPolicy": "Never",
            },
        }
        path = self.work / "manifests" / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all([*configmaps, once]))
        self.pods.append(name)
        podman(*play_args, str(path))
        container = f"{name}-{init['name']}"
        code = podman("wait", container, timeout=300).strip()
        if code != "0":
            tail = run("podman", "logs", "--tail", "20", container, check=False)
            raise RuntimeError(f"init container {init['name']} of {site.service(kind)} exited {code}: {tail}")
        log(f"{site.service(kind)}: init container {init['name']} ran to completion")
        run("podman", "pod", "rm", "--force", "--time", "0", name, check=False, timeout=120)
        self.pods.remove(name)

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



def wait_until(what: str, ok: Any, timeout: float, every: float = 1.0) -> float:
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


def restart_count(container: str) -> int:
    return int(podman("inspect", container, "--format", "{{.RestartCount}}").strip() or 0)




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



def image_sizes() -> dict[str, dict[str, int]]:
    out = {}
    for name in [f"localhost/fibemrss-{s}:{TAG}" for s in SERVICE_IMAGES] + [PG_IMAGE]:
        size = int(podman("image", "inspect", name, "--format", "{{.Size}}").strip())
        out[name.split("/")[-1].split(":")[0]] = {"bytes": size}
    return out

