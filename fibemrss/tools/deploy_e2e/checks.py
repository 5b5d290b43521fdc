"""What the pods must show once the job is done: the securityContext in force, the NetworkPolicies'
intent, and every dashboard query and alert naming series that the pods export."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import TlsFiles
from fibemrss.tools.deploy_e2e.sites import (
    GRPC,
    HEALTH,
    METRICS,
    NET_PREFIX,
    Deployment,
    log,
    podman,
    probe_from,
)


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



def check_revocation(dep: Deployment, pki: Path) -> dict[str, Any]:
    """The stolen operator certificate the ceremony revoked (`chart.ceremony`) is refused by
    every service of its hospital and by the aggregator, naming the revocation, through the
    chart's mounted list; the hospital's own operator certificate is answered by the same pods."""
    identity = f"operator@{dep.hospitals[0].name}"
    thief = dep.work / "thief"
    stolen = TlsFiles(str(pki / "ca.crt"), str(thief / f"{identity}.crt"), str(thief / f"{identity}.key"))
    own = TlsFiles(str(pki / "ca.crt"), str(pki / f"{identity}.crt"), str(pki / f"{identity}.key"))
    site = dep.hospitals[0]
    targets = {
        "aggregator@central": f"{dep.address(dep.central, 'aggregator')}:{GRPC}",
        f"gateway@{site.name}": f"{dep.address(site, 'emr-gateway')}:{GRPC}",
        f"agent@{site.name}": f"{dep.address(site, 'hospital-agent')}:{GRPC}",
        f"inference@{site.name}": f"{dep.address(site, 'inference')}:{GRPC}",
    }
    refused: dict[str, str] = {}
    for server, address in targets.items():
        for tls, want_refused in ((stolen, True), (own, False)):
            with open_channel(address, tls, server) as channel:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as error:
                    code, details = error.code(), error.details() or ""
            if want_refused and (code != grpc.StatusCode.UNAUTHENTICATED or "revoked" not in details):
                raise AssertionError(f"{server} answered the revoked {identity}: {code.name} {details}")
            if not want_refused and code != grpc.StatusCode.OK:
                raise AssertionError(f"{server} refused the valid {identity}: {code.name} {details}")
            if want_refused:
                refused[server] = details
    log(f"revocation: the revoked {identity} refused by {len(refused)} services, the valid one answered")
    return {"revoked": identity, "refused_by": refused}
