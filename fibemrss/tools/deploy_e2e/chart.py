"""Key ceremony, the chart rendered per site, and the pods played from it."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fibemrss.tools.deploy_e2e.job import healthy, postgres_ready
from fibemrss.tools.deploy_e2e.sites import (
    CHART,
    FIBEMRSS,
    GRPC,
    HELM,
    PG_IMAGE,
    ROOT,
    SERVICE_IMAGES,
    T0,
    TAG,
    Deployment,
    Site,
    deny_egress,
    log,
    run,
    wait_until,
)
from fibemrss.tools.local_cluster import demo_pseudonym_key


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
    # A stolen certificate: a second operator@<first hospital>, issued and then revoked at the CA
    # (`certs request`, `certs sign`, `certs revoke`), its key in `thief/`; every pod is given the
    # CA's list through the chart (`tls.revocationList`), and `check_revocation` calls with it.
    thief = dep.work / "thief"
    identity = f"operator@{dep.hospitals[0].name}"
    run(str(FIBEMRSS), "certs", "request", "--identity", identity, "--out", str(thief))
    run(
        str(FIBEMRSS), "certs", "sign", "--ca-dir", str(pki), "--csr", str(thief / f"{identity}.csr"),
        "--out", str(thief / f"{identity}.crt"),
    )  # fmt: skip
    run(str(FIBEMRSS), "certs", "revoke", "--ca-dir", str(pki), "--cert", str(thief / f"{identity}.crt"))
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
        # The key the agent seals its secrets under (it refuses to start off loopback without one).
        "agentSecretsKey": {"value": base64.b64encode(secrets.token_bytes(32)).decode()},
    }
    revocation_list = {"revocationList": {"crlPem": (pki / "crl.pem").read_text()}}
    if site.name == "central":
        v["tls"] = {"aggregator": tls("aggregator@central"), **revocation_list}
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
            **revocation_list,
        }
        v["heContext"] = {
            "hospital": {"dataBase64": base64.b64encode((keys / "hospital.he").read_bytes()).decode()}
        }
        # The demo's fixed per-hospital key (`fibemrss demo`'s own): the seeded train/test split is
        # a hash of the patient key, so the figures are the demo's, run to run.
        v["pseudonymKey"] = {"value": demo_pseudonym_key(h)}
        v["networkPolicy"]["aggregator"] = {"cidr": site.uplink.subnet, "port": GRPC}
        assert site.net is not None
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
