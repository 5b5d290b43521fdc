"""Properties of the Kubernetes manifests: the Helm chart for both roles and the kustomize overlays."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "var" / "deploy-tools"
HELM = TOOLS / "bin" / "helm"
KUBECTL = TOOLS / "bin" / "kubectl"
CHART = ROOT / "deploy" / "helm" / "fibemrss"
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"

if not (HELM.exists() and KUBECTL.exists()):
    pytest.skip(
        f"deploy tools not installed in {TOOLS.relative_to(ROOT)}: run bash deploy/tools/install.sh",
        allow_module_level=True,
    )

# The environment contract of the services (docs/runbook.md and the design's table).
DOCUMENTED_ENV = {
    "FIBEMRSS_LISTEN",
    "FIBEMRSS_METRICS_LISTEN",
    "FIBEMRSS_HEALTH_LISTEN",
    "FIBEMRSS_LOG_LEVEL",
    "FIBEMRSS_TLS_CA",
    "FIBEMRSS_TLS_CERT",
    "FIBEMRSS_TLS_KEY",
    "DATABASE_URL",
    "FIBEMRSS_HOSPITAL",
    "FIBEMRSS_TASK",
    "FIBEMRSS_HE_CONTEXT",
    "FIBEMRSS_PSEUDONYM_KEY",
    "FIBEMRSS_GATEWAY",
    "FIBEMRSS_AGGREGATOR",
    "FIBEMRSS_MIGRATE",
    "FIBEMRSS_DATASET",
    "FIBEMRSS_MLLP_LISTEN",
    "FIBEMRSS_HTTP_LISTEN",
    "FIBEMRSS_DB_POOL_SIZE",
    "FIBEMRSS_STUDIES",
    "FIBEMRSS_AGENT_SECRETS_KEY_FILE",
    "FIBEMRSS_MIGRATE_DATABASE_URL",
}
# The init container `migrate` (fibemrss db setup): the owner's URL and the service's own.
MIGRATE_ENV = {"FIBEMRSS_MIGRATE_DATABASE_URL", "DATABASE_URL"}

# The gateway's environment of the hospital console, only with console.enabled (README and
# docs/runbook.md tables; docs/console.md).
CONSOLE_ENV = {
    "FIBEMRSS_CONSOLE_LISTEN",
    "FIBEMRSS_CONSOLE_TLS_CERT",
    "FIBEMRSS_CONSOLE_TLS_KEY",
    "FIBEMRSS_CONSOLE_URL",
    "FIBEMRSS_CONSOLE_SESSION_IDLE_SECONDS",
    "FIBEMRSS_CONSOLE_SESSION_MAX_SECONDS",
    "FIBEMRSS_OIDC_ISSUER",
    "FIBEMRSS_OIDC_CLIENT_ID",
    "FIBEMRSS_OIDC_CLIENT_SECRET_FILE",
    "FIBEMRSS_OIDC_ROLES",
    "FIBEMRSS_OIDC_GROUPS_CLAIM",
    "FIBEMRSS_OIDC_SCOPES",
}
# Which of them each service gets beyond the ones every service gets (the runbook's table).
COMMON_ENV = DOCUMENTED_ENV - {
    "FIBEMRSS_MLLP_LISTEN",
    "FIBEMRSS_HTTP_LISTEN",
    "FIBEMRSS_HOSPITAL",
    "FIBEMRSS_HE_CONTEXT",
    "FIBEMRSS_PSEUDONYM_KEY",
    "FIBEMRSS_GATEWAY",
    "FIBEMRSS_AGGREGATOR",
    "FIBEMRSS_DATASET",
    "FIBEMRSS_DB_POOL_SIZE",
    "FIBEMRSS_STUDIES",
    "FIBEMRSS_AGENT_SECRETS_KEY_FILE",
    "FIBEMRSS_MIGRATE_DATABASE_URL",
}
SERVICE_ENV = {
    "aggregator": {"FIBEMRSS_HE_CONTEXT", "FIBEMRSS_DB_POOL_SIZE"},
    "emr-gateway": {
        "FIBEMRSS_HOSPITAL",
        "FIBEMRSS_PSEUDONYM_KEY",
        "FIBEMRSS_MLLP_LISTEN",
        "FIBEMRSS_HTTP_LISTEN",
        "FIBEMRSS_STUDIES",
    },
    "hospital-agent": {
        "FIBEMRSS_HOSPITAL",
        "FIBEMRSS_HE_CONTEXT",
        "FIBEMRSS_GATEWAY",
        "FIBEMRSS_AGGREGATOR",
        "FIBEMRSS_DATASET",
        "FIBEMRSS_STUDIES",
        "FIBEMRSS_AGENT_SECRETS_KEY_FILE",
    },
    "inference": {"FIBEMRSS_HOSPITAL", "FIBEMRSS_GATEWAY", "FIBEMRSS_HTTP_LISTEN", "FIBEMRSS_STUDIES"},
}
# The ports beyond grpc and metrics each service's Service exposes (mutual TLS, like gRPC).
EDGE_PORTS = {"emr-gateway": {"mllp": 2575, "https": 8443}, "inference": {"https": 8443}}
ROLE_FILES = {
    "central": (CHART / "values-central.yaml", "fibemrss-central", "central"),
    "hospital": (CHART / "values-hospital-example.yaml", "fibemrss-cleveland", "hospital-cleveland"),
}
COMPONENTS = {
    "central": {"aggregator"},
    "hospital": {"emr-gateway", "hospital-agent", "inference"},
}
Doc = dict[str, Any]


def helm_template(role: str, *settings: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    values, namespace, _ = ROLE_FILES[role]
    args = [str(HELM), "template", "fibemrss", str(CHART), "-n", namespace, "-f", str(values)]
    for setting in settings:
        args += ["--set", setting]
    return subprocess.run(args, capture_output=True, text=True, check=check)


@cache
def _rendered(role: str) -> str:
    return helm_template(role).stdout


def render(role: str) -> list[Doc]:
    """A fresh copy of the chart's output for `role` with its example values file."""
    return [d for d in yaml.safe_load_all(_rendered(role)) if d]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def component(doc: Doc) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for deployment in of_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield deployment, container


def serving(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """The containers that serve (not the init container `migrate`, which runs to its end first)."""
    return ((d, c) for d, c in containers(docs) if c["name"] != "migrate")


def deployment(docs: list[Doc], name: str) -> Doc:
    (found,) = [d for d in of_kind(docs, "Deployment") if component(d) == name]
    return found


def secret_volumes(dep: Doc) -> dict[str, Doc]:
    """Secret volumes of a Deployment's pod, by volume name."""
    vols = dep["spec"]["template"]["spec"].get("volumes", [])
    return {v["name"]: v["secret"] for v in vols if "secret" in v}


@pytest.fixture(params=["central", "hospital"])
def role(request: pytest.FixtureRequest) -> str:
    return request.param


def test_each_role_renders_exactly_its_services(role: str) -> None:
    docs = render(role)
    for kind in ("Deployment", "Service", "ServiceAccount", "ConfigMap", "PodDisruptionBudget"):
        # The Grafana dashboard's ConfigMap belongs to no service (monitoring.grafanaDashboard).
        mine = [d for d in of_kind(docs, kind) if "grafana_dashboard" not in d["metadata"].get("labels", {})]
        assert {component(d) for d in mine} == COMPONENTS[role], kind


def test_every_container_has_requests_and_limits(role: str) -> None:
    for dep, container in containers(render(role)):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resources.get(bound, {}).get(resource), (dep["metadata"]["name"], bound, resource)


def test_every_container_is_locked_down(role: str) -> None:
    for dep, container in containers(render(role)):
        pod = dep["spec"]["template"]["spec"]
        sc = container["securityContext"]
        name = dep["metadata"]["name"]
        assert sc.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True, name
        assert sc.get("runAsUser", pod["securityContext"].get("runAsUser", 0)) > 0, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert "add" not in sc["capabilities"], name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        # The read-only root needs a writable /tmp, and it must be an emptyDir.
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[tmp[0]["name"]], name
        assert pod["automountServiceAccountToken"] is False, name


def container_env(docs: list[Doc], container: Doc) -> dict[str, Any]:
    """A container's environment: its ConfigMap sources, then its own env (values or valueFrom)."""
    configmaps = {c["metadata"]["name"]: c["data"] for c in of_kind(docs, "ConfigMap")}
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def test_every_deployment_has_grpc_probes_on_the_plaintext_health_port(role: str) -> None:
    # The grpc port requires a client certificate, which the kubelet's gRPC probe cannot present:
    # the probes go to the port named health, where the server answers grpc.health.v1 in plaintext.
    docs = render(role)
    for dep, container in serving(docs):
        name = dep["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        edges = EDGE_PORTS.get(component(dep), {})
        assert ports.keys() == {"grpc", "metrics", "health", *edges}, name
        assert len(set(ports.values())) == 3 + len(edges), name
        assert ports["health"] == 8081, name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == ports["health"], (name, probe)
            assert container[probe]["grpc"].get("service", "") == "", (name, probe)
        env = container_env(docs, container)
        assert env["FIBEMRSS_HEALTH_LISTEN"] == f"0.0.0.0:{ports['health']}", name
        assert env["FIBEMRSS_LISTEN"] == f"0.0.0.0:{ports['grpc']}", name
        assert env["FIBEMRSS_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}", name
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_the_health_port_follows_its_value(role: str) -> None:
    docs = [d for d in yaml.safe_load_all(helm_template(role, "ports.health=9000").stdout) if d]
    for _dep, container in serving(docs):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["health"] == 9000
        assert {
            container[p]["grpc"]["port"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
        } == {9000}
        assert container_env(docs, container)["FIBEMRSS_HEALTH_LISTEN"] == "0.0.0.0:9000"


def test_services_name_their_grpc_and_metrics_ports(role: str) -> None:
    # The plaintext health port is for the kubelet only: no Service exposes it.
    for service in of_kind(render(role), "Service"):
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        edges = EDGE_PORTS.get(component(service), {})
        assert ports.keys() == {"grpc", "metrics", *edges}
        assert {n: ports[n]["port"] for n in edges} == edges
        assert all(ports[n]["targetPort"] == n for n in edges)
        assert all(p["port"] != 8081 and p["targetPort"] != "health" for p in ports.values())
        assert ports["grpc"]["targetPort"] == "grpc"
        assert ports["metrics"]["targetPort"] == "metrics"


def test_one_service_account_per_service_without_a_token(role: str) -> None:
    docs = render(role)
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(docs, "ServiceAccount")}
    used = [d["spec"]["template"]["spec"]["serviceAccountName"] for d in of_kind(docs, "Deployment")]
    assert sorted(used) == sorted(accounts)
    assert all(sa["automountServiceAccountToken"] is False for sa in accounts.values())


def test_aggregator_mounts_only_the_public_he_context() -> None:
    # Even when the hospital context is given inline, the central role must not render it.
    docs = [
        d
        for d in yaml.safe_load_all(
            helm_template(
                "central",
                "heContext.hospital.dataBase64=c2VjcmV0",
                "heContext.aggregator.dataBase64=cHVibGlj",
            ).stdout
        )
        if d
    ]
    secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    assert not any("hospital.he" in s.get("data", {}) for s in secrets.values())
    agg = deployment(docs, "aggregator")
    volumes = secret_volumes(agg)
    hospital_secret = "fibemrss-he-hospital"
    assert hospital_secret not in {v["secretName"] for v in volumes.values()}
    mounted_keys = {item["key"] for v in volumes.values() for item in v.get("items", [])}
    assert "hospital.he" not in mounted_keys
    assert volumes["he-context"] == {
        "secretName": "fibemrss-he-aggregator",
        "optional": False,
        "defaultMode": 0o440,
        "items": [{"key": "aggregator.he", "path": "aggregator.he"}],
    }
    # Every Secret volume names its items: nothing else of a Secret can appear in the pod.
    assert all(v.get("items") for v in volumes.values())
    config = of_kind(docs, "ConfigMap")[0]["data"]
    assert config["FIBEMRSS_HE_CONTEXT"].endswith("/aggregator.he")


def test_only_the_hospital_agent_holds_the_hospital_he_context() -> None:
    docs = render("hospital")
    holders = {
        component(d)
        for d in of_kind(docs, "Deployment")
        if any(v["secretName"] == "fibemrss-he-hospital" for v in secret_volumes(d).values())
    }
    assert holders == {"hospital-agent"}
    assert "fibemrss-he-aggregator" not in _rendered("hospital")


def test_a_network_policy_denies_everything_by_default(role: str) -> None:
    policies = of_kind(render(role), "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1
    # Every service has its own policy for both directions, so nothing it does is implied.
    per_service = service_policies(render(role))
    assert per_service.keys() == COMPONENTS[role]
    for policy in per_service.values():
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def service_policies(docs: list[Doc]) -> dict[str, Doc]:
    """The NetworkPolicy of each service, by component (the namespace-wide ones have none)."""
    return {
        component(p): p
        for p in of_kind(docs, "NetworkPolicy")
        if "app.kubernetes.io/component" in p["metadata"]["labels"]
    }


def _grpc_ingress_peers(policy: Doc) -> list[Doc]:
    return [
        peer
        for rule in policy["spec"].get("ingress", [])
        if any(p["port"] == 50051 for p in rule.get("ports", []))
        for peer in rule["from"]
    ]


def _egress(policy: Doc) -> list[tuple[Doc, int]]:
    rules = policy["spec"]["egress"]
    return [(peer, port["port"]) for rule in rules for peer in rule["to"] for port in rule["ports"]]


def test_network_policies_allow_exactly_the_documented_flows() -> None:
    values = yaml.safe_load(ROLE_FILES["hospital"][0].read_text())["networkPolicy"]
    db = ({"ipBlock": {"cidr": values["database"]["cidr"]}}, values["database"]["port"])
    policies = service_policies(render("hospital"))
    release = {"app.kubernetes.io/name": "fibemrss", "app.kubernetes.io/instance": "fibemrss"}
    component_key = "app.kubernetes.io/component"
    agent_pods = {"podSelector": {"matchLabels": {**release, component_key: "hospital-agent"}}}
    inference_pods = {"podSelector": {"matchLabels": {**release, component_key: "inference"}}}
    gateway_pods = {"podSelector": {"matchLabels": {**release, component_key: "emr-gateway"}}}
    # Ingress to gRPC: EHR systems, the agent and inference -> gateway; hospital software -> inference;
    # none -> agent.
    assert _grpc_ingress_peers(policies["emr-gateway"]) == values["ehrClients"] + [agent_pods, inference_pods]
    assert _grpc_ingress_peers(policies["inference"]) == values["inferenceClients"]
    assert _grpc_ingress_peers(policies["hospital-agent"]) == []
    # Egress: PostgreSQL for all; the agent and inference also to the gateway (its gRPC port only);
    # the agent also to the aggregator.
    assert _egress(policies["emr-gateway"]) == [db]
    assert _egress(policies["inference"]) == [db, (gateway_pods, 50051)]
    aggregator = ({"ipBlock": {"cidr": values["aggregator"]["cidr"]}}, values["aggregator"]["port"])
    assert _egress(policies["hospital-agent"]) == [db, (gateway_pods, 50051), aggregator]

    central = yaml.safe_load(ROLE_FILES["central"][0].read_text())["networkPolicy"]
    agg = service_policies(render("central"))["aggregator"]
    assert _grpc_ingress_peers(agg) == central["agentClients"]
    assert _egress(agg) == [({"ipBlock": {"cidr": central["database"]["cidr"]}}, central["database"]["port"])]


def test_ehr_systems_reach_mllp_and_https_and_hospital_software_https() -> None:
    values = yaml.safe_load(ROLE_FILES["hospital"][0].read_text())["networkPolicy"]
    docs = render("hospital")
    policies = service_policies(docs)
    for name, clients in (("emr-gateway", values["ehrClients"]), ("inference", values["inferenceClients"])):
        rules = [r for r in policies[name]["spec"]["ingress"] if r["from"] == clients]
        assert len(rules) == 1, name
        assert {p["port"] for p in rules[0]["ports"]} == {50051, *EDGE_PORTS[name].values()}, name
        # Only those clients: no other rule opens an edge port.
        others = [r for r in policies[name]["spec"]["ingress"] if r["from"] != clients]
        assert not {p["port"] for r in others for p in r["ports"]} & set(EDGE_PORTS[name].values())
    for dep, container in serving(docs):
        env = container_env(docs, container)
        edges = EDGE_PORTS.get(component(dep), {})
        assert ("FIBEMRSS_MLLP_LISTEN" in env) == ("mllp" in edges)
        if "https" in edges:
            assert env["FIBEMRSS_HTTP_LISTEN"] == "0.0.0.0:8443"
        if "mllp" in edges:
            assert env["FIBEMRSS_MLLP_LISTEN"] == "0.0.0.0:2575"


def test_the_agent_and_inference_dial_the_in_cluster_gateway() -> None:
    # Inference reads patients (Diagnose by patient_key) from the same gateway the agent reads
    # training examples from: the gateway's Service, on its gRPC port (mutual TLS).
    docs = render("hospital")
    (gateway_service,) = [s for s in of_kind(docs, "Service") if component(s) == "emr-gateway"]
    grpc = {p["name"]: p["port"] for p in gateway_service["spec"]["ports"]}["grpc"]
    address = f"{gateway_service['metadata']['name']}:{grpc}"
    assert address == "fibemrss-emr-gateway:50051"
    for name in ("hospital-agent", "inference", "emr-gateway"):
        (container,) = deployment(docs, name)["spec"]["template"]["spec"]["containers"]
        env = container_env(docs, container)
        if name == "emr-gateway":
            assert "FIBEMRSS_GATEWAY" not in env
        else:
            assert env["FIBEMRSS_GATEWAY"] == address, name
    # Only the agent dials the aggregator.
    (inference,) = deployment(docs, "inference")["spec"]["template"]["spec"]["containers"]
    assert "FIBEMRSS_AGGREGATOR" not in container_env(docs, inference)
    # The address follows the release's fullname and the gRPC port.
    renamed = [
        d
        for d in yaml.safe_load_all(
            helm_template("hospital", "fullnameOverride=fx", "ports.grpc=6000").stdout
        )
        if d
    ]
    (container,) = deployment(renamed, "inference")["spec"]["template"]["spec"]["containers"]
    assert container_env(renamed, container)["FIBEMRSS_GATEWAY"] == "fx-emr-gateway:6000"


def test_env_var_names_are_the_documented_ones(role: str) -> None:
    docs = render(role)
    configmaps = {c["metadata"]["name"]: c["data"] for c in of_kind(docs, "ConfigMap")}
    for dep, container in containers(docs):
        names = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            names |= set(configmaps[source["configMapRef"]["name"]])
        assert names <= DOCUMENTED_ENV, (dep["metadata"]["name"], names - DOCUMENTED_ENV)
        expected = MIGRATE_ENV if container["name"] == "migrate" else COMMON_ENV | SERVICE_ENV[component(dep)]
        assert names == expected, (dep["metadata"]["name"], container["name"])


def test_only_the_init_container_gets_the_database_owners_url(role: str) -> None:
    """Each service connects as its own login (docs/security.md, "Database roles"); the owner's
    URL, which may change the schema, reaches the init container `migrate` alone."""
    docs = render(role)
    owner = {"secretKeyRef": {"name": "fibemrss-database", "key": "url"}}
    for dep, container in containers(docs):
        env = container_env(docs, container)
        own = {"secretKeyRef": {"name": f"fibemrss-database-{component(dep)}", "key": "url"}}
        assert env["DATABASE_URL"] == own, (dep["metadata"]["name"], container["name"])
        if container["name"] == "migrate":
            assert env["FIBEMRSS_MIGRATE_DATABASE_URL"] == owner
        else:
            assert owner not in env.values(), dep["metadata"]["name"]


def test_the_agent_alone_mounts_its_secrets_key() -> None:
    docs = render("hospital")
    for dep in of_kind(docs, "Deployment"):
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        if component(dep) != "hospital-agent":
            assert "agent-secrets-key" not in volumes
            continue
        assert volumes["agent-secrets-key"]["secret"]["secretName"] == "fibemrss-agent-secrets-key"
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert (
            container_env(docs, container)["FIBEMRSS_AGENT_SECRETS_KEY_FILE"]
            == "/etc/fibemrss/agent-secrets/key"
        )


# The hospital console (docs/console.md), as a hospital turns it on.
CONSOLE_ON = (
    "console.enabled=true",
    "console.oidc.issuer=https://login.cleveland.example/realms/hospital",
    "console.oidc.clientId=fibemrss-console",
    "console.oidc.roles=fibemrss-stewards=steward",
    "console.ingress.host=console.cleveland.example",
    "console.ingress.tlsSecretName=console-public-tls",
)


def test_the_console_is_served_by_the_gateway_behind_the_ingress_with_its_oidc_settings() -> None:
    docs = [d for d in yaml.safe_load_all(helm_template("hospital", *CONSOLE_ON).stdout) if d]
    configmaps = {c["metadata"]["name"]: c["data"] for c in of_kind(docs, "ConfigMap")}
    for dep, container in serving(docs):
        names = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            names |= set(configmaps[source["configMapRef"]["name"]])
        extra = CONSOLE_ENV if component(dep) == "emr-gateway" else set()
        assert names == COMMON_ENV | SERVICE_ENV[component(dep)] | extra, dep["metadata"]["name"]
    gateway_env = configmaps["fibemrss-emr-gateway"]
    assert gateway_env["FIBEMRSS_CONSOLE_URL"] == "https://console.cleveland.example"
    assert gateway_env["FIBEMRSS_OIDC_ISSUER"] == "https://login.cleveland.example/realms/hospital"
    (ingress,) = of_kind(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "console.cleveland.example"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "fibemrss-emr-gateway", "port": {"name": "console"}}
    assert ingress["spec"]["tls"] == [
        {"hosts": ["console.cleveland.example"], "secretName": "console-public-tls"}
    ]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    (service,) = [s for s in of_kind(docs, "Service") if component(s) == "emr-gateway"]
    assert {"name": "console", "port": 9443, "targetPort": "console", "protocol": "TCP"} in service["spec"][
        "ports"
    ]
    # Only the ingress controller reaches the console port; the gateway may reach the provider.
    (policy,) = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["labels"].get("app.kubernetes.io/component") == "emr-gateway"
    ]
    to_console = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 9443} in r["ports"]]
    assert [r["from"] for r in to_console] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    ]
    assert {"protocol": "TCP", "port": 443} in [p for r in policy["spec"]["egress"] for p in r["ports"]]
    # Off by default: no Ingress, no console port.
    assert of_kind(render("hospital"), "Ingress") == []


def test_the_federation_console_is_served_by_the_aggregator() -> None:
    settings = [s.replace("cleveland", "central") for s in CONSOLE_ON if "roles" not in s]
    docs = [
        d
        for d in yaml.safe_load_all(
            helm_template("central", *settings, "console.oidc.roles=fibemrss-operators=operator").stdout
        )
        if d
    ]
    configmaps = {c["metadata"]["name"]: c["data"] for c in of_kind(docs, "ConfigMap")}
    assert CONSOLE_ENV <= set(configmaps["fibemrss-aggregator"])
    assert configmaps["fibemrss-aggregator"]["FIBEMRSS_OIDC_ROLES"] == "fibemrss-operators=operator"
    (ingress,) = of_kind(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "fibemrss-aggregator", "port": {"name": "console"}}
    (dep,) = of_kind(docs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert {"name": "console", "containerPort": 9443, "protocol": "TCP"} in container["ports"]


def test_the_console_is_refused_without_its_sign_in_settings() -> None:
    for missing in (
        "console.oidc.issuer",
        "console.oidc.clientId",
        "console.oidc.roles",
        "console.ingress.host",
    ):
        settings = [s for s in CONSOLE_ON if not s.startswith(missing + "=")]
        result = helm_template("hospital", *settings, check=False)
        assert result.returncode != 0 and missing in result.stderr, missing
    result = helm_template("hospital", *CONSOLE_ON, "console.oidc.issuer=http://login.example", check=False)
    assert result.returncode != 0 and "https://" in result.stderr


def test_secrets_are_referenced_not_rendered_by_default(role: str) -> None:
    assert of_kind(render(role), "Secret") == []


def test_invalid_values_are_refused() -> None:
    bad = [
        ("central", "role=orchestrator"),
        ("hospital", "hospital.name="),
        ("hospital", "hospitalAgent.replicas=2"),
        ("central", "aggregator.replicas=3"),
    ]
    for role_name, setting in bad:
        result = helm_template(role_name, setting, check=False)
        assert result.returncode != 0, setting


def _normalized(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    """Drop what only Helm adds, so a chart render and a kustomize build compare."""
    out = {}
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        for meta in (doc["metadata"], doc.get("spec", {}).get("template", {}).get("metadata", {})):
            for label in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
                meta.get("labels", {}).pop(label, None)
            meta.get("annotations", {}).pop("checksum/config", None)
            if meta.get("annotations") == {}:
                del meta["annotations"]
        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.parametrize("role_name", ["central", "hospital"])
def test_kustomize_overlay_renders_what_the_chart_renders(role_name: str) -> None:
    _, namespace, overlay = ROLE_FILES[role_name]
    built = subprocess.run(
        [str(KUBECTL), "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    (ns,) = of_kind(docs, "Namespace")
    assert ns["metadata"]["name"] == namespace
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert _normalized(docs) == _normalized(render(role_name))


@pytest.mark.slow
def test_deploy_check_script_passes(tmp_path: Path) -> None:
    """hadolint, helm lint, kubernetes-validate, kustomize and checkov, as deploy/check.sh runs them."""
    if not (TOOLS / "venv" / "bin" / "checkov").exists():
        pytest.skip("checkov not installed: run bash deploy/tools/install.sh")
    env = {**os.environ, "OUT": str(tmp_path / "deploy-check")}
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "check.sh")], capture_output=True, text=True, env=env, timeout=170
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert ", 0 failed" in result.stdout


def test_the_health_port_is_closed_to_pods_by_default(role: str) -> None:
    # The kubelet probes from the pod's node, which NetworkPolicy always allows: no rule admits
    # anyone to the plaintext health port unless healthProbeClients names them.
    for policy in service_policies(render(role)).values():
        for rule in policy["spec"].get("ingress", []):
            assert all(p["port"] != 8081 for p in rule.get("ports", [])), component(policy)
    nodes = "networkPolicy.healthProbeClients[0].ipBlock.cidr=10.0.0.0/16"
    docs = [d for d in yaml.safe_load_all(helm_template(role, nodes).stdout) if d]
    for name, policy in service_policies(docs).items():
        health_rules = [
            rule for rule in policy["spec"]["ingress"] if any(p["port"] == 8081 for p in rule["ports"])
        ]
        assert health_rules == [
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"protocol": "TCP", "port": 8081}]}
        ], name


def test_certificate_and_port_values_are_checked() -> None:
    for role_name, setting in [
        ("hospital", "hospital.name=agent@cleveland"),
        ("hospital", "hospital.name=cleveland\\,hungary"),
        ("central", "ports.health=50051"),
        ("hospital", "ports.health=9464"),
    ]:
        assert helm_template(role_name, setting, check=False).returncode != 0, setting


def test_tls_secrets_hold_exactly_ca_crt_tls_crt_tls_key(role: str) -> None:
    key = {"central": ["aggregator"], "hospital": ["emrGateway", "hospitalAgent", "inference"]}[role]
    settings = [f"tls.{k}.{field}=PEM-{field}" for k in key for field in ("caCrt", "tlsCrt", "tlsKey")]
    docs = [d for d in yaml.safe_load_all(helm_template(role, *settings).stdout) if d]
    tls_secrets = {
        s["metadata"]["name"]: s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-tls")
    }
    for dep in of_kind(docs, "Deployment"):
        volume = secret_volumes(dep)["tls"]
        assert volume["items"] == [{"key": k, "path": k} for k in ("ca.crt", "tls.crt", "tls.key")]
        assert set(tls_secrets[volume["secretName"]]["data"]) == {"ca.crt", "tls.crt", "tls.key"}
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env = container_env(docs, container)
        assert [env[v] for v in ("FIBEMRSS_TLS_CA", "FIBEMRSS_TLS_CERT", "FIBEMRSS_TLS_KEY")] == [
            "/etc/fibemrss/tls/ca.crt",
            "/etc/fibemrss/tls/tls.crt",
            "/etc/fibemrss/tls/tls.key",
        ]


# Which `fibemrss certs init` identity each service's TLS Secret holds (<role>@<site>).
IDENTITY = {
    "aggregator": "aggregator@central",
    "emr-gateway": "gateway@cleveland",
    "hospital-agent": "agent@cleveland",
    "inference": "inference@cleveland",
}


def _runbook_secrets() -> dict[str, dict[str, str]]:
    """`kubectl create secret generic NAME --from-file=KEY=PATH ...` of the runbook: NAME -> KEY -> PATH,
    with the example hospital's variables filled in."""
    text = (ROOT / "docs" / "runbook.md").read_text().replace("\\\n", " ")
    secrets: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        words = line.replace('"', "").replace("$H", "cleveland").split()
        if "create" not in words or "secret" not in words or "generic" not in words:
            continue
        name = words[words.index("generic") + 1]
        files = [w.removeprefix("--from-file=") for w in words if w.startswith("--from-file=")]
        secrets[name] = dict(f.split("=", 1) for f in files)
    return secrets


def test_runbook_tls_secrets_use_the_files_certs_init_writes(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fibemrss.platform.identity import identity_dns_name

    pki = tmp_path / "pki"
    init = ["certs", "init", "--out", str(pki), "--hospitals", "cleveland"]
    subprocess.run(
        [sys.executable, "-m", "fibemrss.tools.cli", *init], check=True, capture_output=True, cwd=ROOT
    )
    secrets = _runbook_secrets()
    for role_name in ("central", "hospital"):
        for dep in of_kind(render(role_name), "Deployment"):
            name = secret_volumes(dep)["tls"]["secretName"]
            files = secrets[name]
            assert files.keys() == {"ca.crt", "tls.crt", "tls.key"}, name
            paths = {k: tmp_path / v for k, v in files.items()}
            assert all(p.exists() for p in paths.values()), (name, files)
            assert paths["ca.crt"] == pki / "ca.crt", name
            cert = x509.load_pem_x509_certificate(paths["tls.crt"].read_bytes())
            (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            assert cn.value == IDENTITY[component(dep)], name
            # Each certificate names only its own service: the identity clients pin, no other.
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            pinned = [n for n in san.get_values_for_type(x509.DNSName) if n.endswith(".fibemrss")]
            assert pinned == [identity_dns_name(IDENTITY[component(dep)])], name
            assert paths["tls.key"] == paths["tls.crt"].with_suffix(".key"), name
    # The CA's private key goes into no Secret.
    assert not any(v.endswith("ca.key") for files in secrets.values() for v in files.values())


def test_the_revocation_list_reaches_every_service_as_a_mounted_folder(tmp_path: Path) -> None:
    """`tls.revocationList` (docs/security.md, "A stolen certificate"): every service of either
    role gets FIBEMRSS_TLS_CRL and mounts the list's ConfigMap as a folder (a subPath mount would
    never see the ConfigMap replaced); without it, none does. The CA's real list, made by
    `fibemrss certs revoke`, goes in as it is."""
    from fibemrss.tools.certs import init_pki, revoke

    init_pki(tmp_path / "pki", ["agent@cleveland"])
    crl = revoke(tmp_path / "pki", [(tmp_path / "pki" / "agent@cleveland.crt").read_bytes()])
    for role in ("central", "hospital"):
        for extra, configmap in (
            ((f"tls.revocationList.crlPem={crl.read_text()}",), "fibemrss-revocation-list"),
            (("tls.revocationList.existingConfigMap=federation-crl",), "federation-crl"),
            ((), None),
        ):
            docs = [d for d in yaml.safe_load_all(helm_template(role, *extra).stdout) if d]
            made = {c["metadata"]["name"]: c["data"] for c in of_kind(docs, "ConfigMap")}
            if configmap == "fibemrss-revocation-list":
                assert made[configmap] == {"crl.pem": crl.read_text()}
            else:
                assert "fibemrss-revocation-list" not in made
            for dep, container in serving(docs):
                env = container_env(docs, container)
                volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
                mounts = {m["name"]: m for m in container["volumeMounts"]}
                if configmap is None:
                    assert "FIBEMRSS_TLS_CRL" not in env and "revocation-list" not in volumes
                    continue
                assert env["FIBEMRSS_TLS_CRL"] == "/etc/fibemrss/revocation/crl.pem", dep["metadata"]["name"]
                assert volumes["revocation-list"]["configMap"]["name"] == configmap
                assert mounts["revocation-list"]["mountPath"] == "/etc/fibemrss/revocation"
                assert "subPath" not in mounts["revocation-list"]
