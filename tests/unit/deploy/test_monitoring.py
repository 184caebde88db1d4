"""deploy/monitoring/: alert rules (promtool), their CRD copies, the Grafana dashboard and the scrape configs.

promtool is Debian's (``make test`` installs the ``prometheus`` package). Debian builds Prometheus without
Kubernetes service discovery, so prometheus.yaml's relabeling is checked by ``promtool check
service-discovery`` on the same job with static targets carrying the ``__meta_kubernetes_*`` labels that
Kubernetes discovery would attach. The real scrape of the service is tests/integration/test_prometheus_scrape.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from authz.metrics import new_metrics, new_supervisor_metrics
from tests.support.promql import exposed_names, metric_names

ROOT = Path(__file__).resolve().parents[3]
MONITORING = ROOT / "deploy" / "monitoring"
SELECTOR = {"app.kubernetes.io/name": "apigee-authz"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = {"critical", "warning"}


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip(
            "promtool not installed: make test installs Debian's prometheus with apt-get; "
            "here run `apt-get install prometheus`"
        )
    return binary


def run_promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - a fixed binary and arguments
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def load_yaml(name: str) -> Any:
    return yaml.safe_load((MONITORING / name).read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml("alerts.yaml")["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads((MONITORING / "grafana-dashboard.json").read_text()))


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def service_metrics() -> dict[str, str]:
    """Every series family the service exposes (a worker's and, with --workers N, the supervisor's), as a
    scrape names it: name -> type."""
    families = {}
    registries = (new_metrics().registry, new_supervisor_metrics().registry)
    for family in (family for registry in registries for family in registry.collect()):
        suffix = "_total" if family.type == "counter" else ""
        families[family.name + suffix] = family.type
    return families


# --- the PromQL scanner the drift checks rely on ----------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("ready == 0", {"ready"}),
        ('up{job=~"(.*/)?apigee-authz"} == 0', {"up"}),
        (
            'sum by (namespace, org) (rate(auth_denied_total{code="503"}[5m]))'
            " / sum by (namespace, org) (rate(auth_requests_seconds_count[5m])) > 0.05",
            {"auth_denied_total", "auth_requests_seconds_count"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(auth_requests_seconds_bucket[5m]))) > 0.25",
            {"auth_requests_seconds_bucket"},
        ),
        ("increase(x_total[10m]) > 0 or (x_total > 0 unless x_total offset 10m)", {"x_total"}),
        ("(time() - a_seconds > 900) and b", {"a_seconds", "b"}),
        ("c > 0.8 * 1024 * 1e3 unless ignoring(result) d", {"c", "d"}),
        ('sum(rate(e{namespace=~"$namespace", pod=~"$pod"}[$__rate_interval]))', {"e"}),
        ("sum(increase(f[$__range])) > bool 1", {"f"}),
        ('label_replace(g, "dst", "$1", "src", "(.*)")', {"g"}),
    ],
)
def test_metric_names_finds_the_series_an_expression_reads(expr, names):
    assert metric_names(expr) == names


def test_exposed_names_expand_histograms():
    assert exposed_names({"h_seconds": "histogram", "c_total": "counter"}) == {
        "h_seconds_bucket",
        "h_seconds_count",
        "h_seconds_sum",
        "c_total",
    }


# --- alert rules -------------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules():
    result = run_promtool("check", "rules", "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_each_alert_fires_on_a_failing_series_and_not_on_a_healthy_one():
    result = run_promtool("test", "rules", "alerts_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr

    firing, silent = set(), set()
    for case in load_yaml("alerts_test.yaml")["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert firing == alerts, "each alert needs a promtool case where it fires"
    assert silent == alerts, "each alert needs a promtool case where it stays silent"


def test_each_alert_has_a_delay_a_severity_and_a_runbook_section():
    readme = (MONITORING / "README.md").read_text()
    sections = {heading.lower() for heading in re.findall(r"^#+ (Authz\w+)\s*$", readme, re.MULTILINE)}
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert rule["annotations"]["runbook"] == f"deploy/monitoring/README.md#{name.lower()}"
        assert name.lower() in sections, f"README.md has no section for {name}"


def test_alerts_read_only_metrics_the_service_exposes():
    exposed = exposed_names(service_metrics()) | {"up"}
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= exposed, rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]


def render_rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_rules", MONITORING / "render_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "api_version", "kind"),
    [
        ("prometheusrule.yaml", "monitoring.coreos.com/v1", "PrometheusRule"),
        ("gmp-rules.yaml", "monitoring.googleapis.com/v1", "Rules"),
    ],
)
def test_rule_crds_carry_exactly_the_groups_of_alerts_yaml(name, api_version, kind):
    source = (MONITORING / "alerts.yaml").read_text()
    assert (MONITORING / name).read_text() == render_rules().render(name, source), (
        f"{name} is out of date: run python deploy/monitoring/render_rules.py"
    )
    document = load_yaml(name)
    assert (document["apiVersion"], document["kind"]) == (api_version, kind)
    assert document["metadata"]["namespace"] == "apigee"
    groups = [{k: v for k, v in group.items() if k != "interval"} for group in document["spec"]["groups"]]
    assert groups == load_yaml("alerts.yaml")["groups"]
    if kind == "Rules":  # GMP's CRD requires an interval on each group
        assert all(group["interval"] == "30s" for group in document["spec"]["groups"])


# --- dashboard ---------------------------------------------------------------------------------------------


def test_dashboard_has_the_variables_and_unique_panel_ids():
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"] == "apigee-authz"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "pod"}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name in ("namespace", "pod"):
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] is True
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]


def test_every_panel_queries_the_chosen_datasource_namespace_and_pod():
    assert len(panels()) >= 20
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            expr = target["expr"]
            assert expr.strip(), panel["title"]
            selectors = len(re.findall(r"\{", expr))
            assert selectors >= 1, expr
            assert expr.count('namespace=~"$namespace"') == selectors, expr
            assert expr.count('pod=~"$pod"') == selectors, expr


def test_dashboard_reads_only_metrics_the_service_exposes_and_shows_them_all():
    families = service_metrics()
    exposed = exposed_names(families)
    shown: set[str] = set()
    for panel in panels():
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names <= exposed, (panel["title"], target["expr"])
            shown |= names
    missing = {name for name, kind in families.items() if not (exposed_names({name: kind}) & shown)}
    assert not missing, f"metrics.py defines metrics the dashboard does not show: {sorted(missing)}"


# --- scrape configs ----------------------------------------------------------------------------------------


def deployment_pod() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    return dict(document["spec"]["template"])


def test_pod_monitors_select_the_deployments_pods_on_the_metrics_port():
    pod = deployment_pod()
    labels = pod["metadata"]["labels"]
    ports = {port["name"]: port["containerPort"] for c in pod["spec"]["containers"] for port in c["ports"]}
    assert ports["metrics"] == 5001

    gmp = load_yaml("podmonitoring.yaml")
    assert (gmp["apiVersion"], gmp["kind"]) == ("monitoring.googleapis.com/v1", "PodMonitoring")
    operator = load_yaml("podmonitor.yaml")
    assert (operator["apiVersion"], operator["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert operator["spec"]["namespaceSelector"] == {"matchNames": ["apigee"]}
    endpoints = [*gmp["spec"]["endpoints"], *operator["spec"]["podMetricsEndpoints"]]
    for monitor in (gmp, operator):
        assert monitor["metadata"]["name"] == "apigee-authz"
        assert monitor["metadata"]["namespace"] == "apigee"
        assert monitor["spec"]["selector"] == {"matchLabels": SELECTOR}
        assert SELECTOR.items() <= labels.items()
    assert len(endpoints) == 2
    for endpoint in endpoints:
        assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "30s")
    assert set(gmp["spec"]["targetLabels"]["metadata"]) >= {"pod"}  # namespace is always added


def kubernetes_target(address: str, name: str, port: str, phase: str, pod: str) -> dict[str, Any]:
    """A static target labelled as Kubernetes pod discovery labels one container port of a pod."""
    return {
        "targets": [address],
        "labels": {
            "__meta_kubernetes_namespace": "apigee",
            "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_phase": phase,
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": name,
            "__meta_kubernetes_pod_container_name": "authz",
            "__meta_kubernetes_pod_container_port_name": port,
        },
    }


def test_prometheus_yaml_keeps_only_running_authz_pods_on_the_metrics_port(tmp_path):
    config = load_yaml("prometheus.yaml")
    assert config["rule_files"] == ["alerts.yaml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "apigee-authz"
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["apigee"]}}]

    del job["kubernetes_sd_configs"]  # Debian's Prometheus has no Kubernetes discovery: same labels, static
    job["static_configs"] = [
        kubernetes_target("10.0.0.1:5001", "apigee-authz", "metrics", "Running", "apigee-authz-0"),
        kubernetes_target("10.0.0.1:5000", "apigee-authz", "grpc", "Running", "apigee-authz-0"),
        kubernetes_target("10.0.0.2:5001", "apigee-authz", "metrics", "Succeeded", "apigee-authz-old"),
        kubernetes_target("10.0.0.3:5001", "something-else", "metrics", "Running", "other-0"),
    ]
    config["rule_files"] = [str(MONITORING / "alerts.yaml")]
    derived = tmp_path / "prometheus.yaml"
    derived.write_text(yaml.safe_dump(config))

    checked = run_promtool("check", "config", str(derived), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    discovered = run_promtool("check", "service-discovery", "--timeout=2s", str(derived), "apigee-authz")
    assert discovered.returncode == 0, discovered.stdout + discovered.stderr
    kept = [target["labels"] for target in json.loads(discovered.stdout) if target["labels"]]
    assert [{k: v for k, v in labels.items() if not k.startswith("__")} for labels in kept] == [
        {
            "job": "apigee-authz",
            "instance": "10.0.0.1:5001",
            "namespace": "apigee",
            "pod": "apigee-authz-0",
            "container": "authz",
        }
    ]
