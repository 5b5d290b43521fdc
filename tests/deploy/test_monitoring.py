"""The chart's Grafana dashboard and PrometheusRule, offline: every query names a series that the
services define (make deploy-e2e checks the same against the pods' live /metrics)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from fibemrss.tools.deploy_e2e import checks

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "fibemrss"
HELM = ROOT / "var" / "deploy-tools" / "bin" / "helm"

if not HELM.exists():
    pytest.skip("deploy tools not installed: run bash deploy/tools/install.sh", allow_module_level=True)



def rendered(role: str) -> list[dict]:
    values = CHART / ("values-central.yaml" if role == "central" else "values-hospital-example.yaml")
    out = subprocess.run(
        [str(HELM), "template", "fibemrss", str(CHART), "-f", str(values)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def defined_series() -> set[str]:
    """Metric names the code registers (prometheus_client adds _total / _bucket / _sum / _count)."""
    names: set[str] = set()
    for path in [*(ROOT / "fibemrss").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        text = path.read_text()
        for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"([a-z_:]+)\"", text):
            base = name.removesuffix("_total")
            names |= {
                "Counter": {base + "_total"},
                "Gauge": {name},
                "Histogram": {name + "_bucket", name + "_sum", name + "_count"},
            }[kind]
    return names


class _Site:
    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs


class _Dep:
    def __init__(self) -> None:
        self.central = _Site(rendered("central"))
        self.hospitals = [_Site(rendered("hospital"))]


def test_the_extractor_finds_series_and_skips_functions_labels_and_variables() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, grpc_method) (rate(a_bucket{x=~"b|c"}[$__rate_interval])))'
        " / on (task) group_left () clamp_min(max by (task) (d), 1e-9) and time() - e > 120"
    )
    assert checks.series_names(expr) == {"a_bucket", "d", "e"}


def test_every_dashboard_query_and_alert_names_a_series_the_services_define() -> None:
    exprs = checks.monitoring_exprs(_Dep())
    assert len(exprs) >= 30
    defined = defined_series()
    missing = [(where, n) for where, expr in exprs for n in checks.series_names(expr) if n not in defined]
    assert missing == []


def test_the_dashboard_covers_what_ops_teams_watch() -> None:
    (cm,) = [
        d
        for d in rendered("central")
        if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]
    ]
    dash = json.loads(cm["data"]["fibemrss.json"])
    text = json.dumps(dash)
    for series in (
        "fibemrss_current_round",
        "fibemrss_submissions_total",
        "fibemrss_ingested_records_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handled_total",
    ):
        assert series in text, series
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_alerts_of_each_role() -> None:
    def alerts(role: str) -> set[str]:
        (rule,) = [d for d in rendered(role) if d["kind"] == "PrometheusRule"]
        return {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}

    assert alerts("central") == {
        "FibemrssRoundStuckPastDeadline",
        "FibemrssHospitalNotSubmitting",
        "FibemrssRoundsFailing",
        "FibemrssRoundsRefused",
        "FibemrssHighErrorRate",
        "FibemrssRevokedCertificateInUse",
    }
    assert alerts("hospital") == {
        "FibemrssQuarantineSurge",
        "FibemrssInferenceSlow",
        "FibemrssHighErrorRate",
        "FibemrssRevokedCertificateInUse",
    }
