"""A real Prometheus server scrapes the service and loads the shipped alert rules; its HTTP API is the oracle.

The service runs as it does in a pod with several CPUs: ``authz serve --workers 2`` (a supervisor merging
its workers' metrics, so every family of metrics.py and the supervisor's own are exposed), standalone with a
small catalog, on fixed free loopback ports, and answers a few Checks. Debian's ``prometheus`` runs with a
generated config (scrape every second, ``rule_files`` = the shipped ``deploy/monitoring/alerts.yaml``). The
test then asks Prometheus, not the service, what it saw: the series and labels of the traffic, every alert
loaded and healthy (none raised for a healthy service), every metric the alerts and the Grafana dashboard
read present in the scrape, and every dashboard query valid PromQL. Both processes are stopped by PID.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.metrics import CHECK_BUCKETS
from devstack.procs import Proc, free_port, wait_http_ok
from tests.support.catalogs import ORDERS_KEY, catalog_yaml, config_yaml
from tests.support.check_requests import check_request, outcome
from tests.support.http_polling import poll
from tests.support.promql import exposed_names, metric_names

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
JOB = "apigee-authz"
WORKERS = 2
TARGET_LABELS = {"namespace": "apigee", "pod": "apigee-authz-0"}  # what the Kubernetes relabeling adds
START_TIMEOUT = 15.0
DEADLINE = 20.0
# Grafana's variables, as the dashboard would send them for this target.
GRAFANA_VARIABLES = {
    "$namespace": "apigee",
    "$pod": ".*",
    "$__rate_interval": "1m",
    "$__range": "5m",
}


class Service:
    def __init__(self, api_port: int, metrics_port: int) -> None:
        self.api_port = api_port
        self.metrics_port = metrics_port


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus not installed: make test installs Debian's prometheus with apt-get; "
            "here run `apt-get install prometheus`"
        )
    return binary


@pytest.fixture
def service(prometheus_binary: str, tmp_path: Path) -> Iterator[Service]:
    """``authz serve --workers 2``, standalone; ready when it yields."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml())
    api_port, metrics_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        config_yaml(str(catalog))
        .replace('api_address: "127.0.0.1:0"', f'api_address: "127.0.0.1:{api_port}"')
        .replace('metrics_address: "127.0.0.1:0"', f'metrics_address: "127.0.0.1:{metrics_port}"')
    )
    argv = [sys.executable, "-m", "authz", "serve", "--config", str(config), "--workers", str(WORKERS)]
    proc = Proc("authz", argv, tmp_path, cwd=REPO)
    try:
        wait_http_ok(f"http://127.0.0.1:{metrics_port}/readyz", START_TIMEOUT, proc)
        yield Service(api_port, metrics_port)
    finally:
        proc.stop(timeout=20)


@pytest.fixture
def prometheus(prometheus_binary: str, service: Service, tmp_path: Path) -> Iterator[Prometheus]:
    """A Prometheus server scraping the service every second, with the shipped rules."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.yaml")],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{service.metrics_port}"], "labels": TARGET_LABELS},
                ],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        prometheus_binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    proc = Proc("prometheus", argv, tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            yield Prometheus(http, proc)
    finally:
        proc.stop(timeout=10)


class Prometheus:
    """Prometheus's HTTP API; ``until`` polls it to a deadline."""

    def __init__(self, http: httpx.Client, proc: Proc) -> None:
        self.http = http
        self.proc = proc

    def get(self, path: str, **params: Any) -> Any:
        body = self.http.get(path, params=params).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr)["result"])

    def until(self, probe: Callable[[], Any], done: Callable[[Any], bool], what: str) -> Any:
        def attempt() -> Any:
            self.proc.check_alive(what)
            try:
                return probe()
            except (httpx.TransportError, json.JSONDecodeError):
                return None  # not listening or not ready yet

        return poll(attempt, lambda value: value is not None and done(value), what, timeout=DEADLINE)


def by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    """{label values: sample value} of an instant vector."""
    return {tuple(s["metric"].get(label, "") for label in labels): float(s["value"][1]) for s in result}


def parse_time(text: str) -> float:
    """Prometheus's RFC 3339 timestamps carry nanoseconds; Python reads microseconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def shipped_alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def with_variables(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    return expr


def drive_traffic(service: Service) -> None:
    """Two allows, two 401s (no key, unknown key) and a 403 (no product grants the path)."""
    with grpc.insecure_channel(f"127.0.0.1:{service.api_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for request, expected in [
            (check_request(key=ORDERS_KEY), (200, "")),
            (check_request(key=ORDERS_KEY, method="POST"), (200, "")),
            (check_request(), (401, "missing_credentials")),
            (check_request(key="nope"), (401, "unknown_key")),
            (check_request(key=ORDERS_KEY, path="/v2/x"), (403, "not_authorized")),
        ]:
            assert outcome(stub.Check(request, timeout=5)) == expected


def test_prometheus_scrapes_the_service_and_loads_the_shipped_rules(service, prometheus):
    started = time.time()
    drive_traffic(service)
    prom = prometheus
    prom.until(lambda: prom.query(f'up{{job="{JOB}"}}'), lambda r: by(r) == {(): 1.0}, "target scraped")
    denies = f'sum by (org, env, code, reason, namespace, pod) (auth_denied_total{{job="{JOB}"}})'
    denied = prom.until(lambda: prom.query(denies), lambda r: len(r) == 3, "denies scraped")
    scraped = time.time()  # a rule evaluation after this sees the traffic's samples

    # The traffic, as Prometheus stored it: labels from metrics.py plus the target's and the worker's.
    assert by(denied, "org", "env", "code", "reason", "namespace", "pod") == {
        ("org", "test", "401", "missing_credentials", "apigee", "apigee-authz-0"): 1.0,
        ("org", "test", "401", "unknown_key", "apigee", "apigee-authz-0"): 1.0,
        ("org", "test", "403", "not_authorized", "apigee", "apigee-authz-0"): 1.0,
    }
    counts = prom.query("sum by (org, env, code) (auth_requests_seconds_count)")
    assert by(counts, "org", "env", "code") == {
        ("org", "test", "200"): 2.0,
        ("org", "test", "401"): 2.0,
        ("org", "test", "403"): 1.0,
    }
    buckets = prom.query("auth_requests_seconds_bucket")
    assert {s["metric"]["le"] for s in buckets} == {*(str(b) for b in CHECK_BUCKETS), "+Inf"}
    infinite = prom.query('sum by (org, env, code) (auth_requests_seconds_bucket{le="+Inf"})')
    assert by(infinite, "org", "env", "code") == by(counts, "org", "env", "code")
    workers = {(str(k),): 1.0 for k in range(WORKERS)}
    assert by(prom.query("workers")) == {(): float(WORKERS)}
    assert by(prom.query("worker_up"), "worker") == workers
    assert by(prom.query("ready"), "worker") == workers
    assert by(prom.query("products_cached"), "worker", "org") == {(w, "org"): 2.0 for (w,) in workers}
    assert by(prom.query("credentials_cached"), "worker", "org") == {(w, "org"): 3.0 for (w,) in workers}
    reloads = by(prom.query("catalog_reloads_total"), "worker", "org", "result")
    assert reloads == {(w, "org", "ok"): 1.0 for (w,) in workers}
    for loaded in by(prom.query("catalog_loaded_timestamp_seconds"), "worker", "org").values():
        assert started - 60 <= loaded <= time.time()

    # Every alert of alerts.yaml loaded and evaluated without error against the real series; none raised.
    alerts = {rule["alert"] for rule in shipped_alerts()}
    rules = prom.until(
        lambda: prom.get("/api/v1/rules", type="alert"),
        lambda data: all(
            rule["health"] == "ok" and parse_time(group["lastEvaluation"]) > scraped
            for group in data["groups"]
            for rule in group["rules"]
        ),
        "rules evaluated",
    )
    loaded_rules = [rule for group in rules["groups"] for rule in group["rules"]]
    assert sorted(rule["name"] for rule in loaded_rules) == sorted(alerts)
    assert prom.get("/api/v1/alerts")["alerts"] == [], "a healthy service must not raise any alert"

    # Every metric the alerts and the dashboard read is one the service exposes.
    metadata = prom.get("/api/v1/targets/metadata", match_target=f'{{job="{JOB}"}}')
    exposed = exposed_names({entry["metric"]: entry["type"] for entry in metadata}) | {"up"}
    for rule in shipped_alerts():
        missing = metric_names(rule["expr"]) - exposed
        assert not missing, f"alert {rule['alert']} reads {missing}, not in the scrape"
    for expr in dashboard_exprs():
        missing = metric_names(expr) - exposed
        assert not missing, f"dashboard query {expr!r} reads {missing}, not in the scrape"

    # Every dashboard query is valid PromQL for this Prometheus; the variables' queries find the pod.
    for expr in dashboard_exprs():
        prom.query(with_variables(expr))  # asserts status "success"
    ready_pods, pods = (prom.query(with_variables(expr)) for expr in dashboard_exprs()[:2])
    assert (by(ready_pods), by(pods)) == ({(): 1.0}, {(): 1.0})
    assert prom.get("/api/v1/label/namespace/values", **{"match[]": "ready"}) == ["apigee"]
    pod_values = prom.get("/api/v1/label/pod/values", **{"match[]": 'ready{namespace=~"apigee"}'})
    assert pod_values == ["apigee-authz-0"]
