"""Every Envoy config this project ships is one the real Envoy accepts (``envoy --mode validate``).

Each ``envoy/*.yaml`` (found by a glob, so a new file cannot escape) is filled twice: with the local
stack's values (loopback IPs, STATIC clusters) and with production-like ones (0.0.0.0, DNS names and
STRICT_DNS clusters, a TLS JWKS cluster), and once more as devstack renders it (its DEFAULT_VARS plus
only what devstack's callers pass). Every ``authz render envoy`` variant is rendered through the CLI and
validated the same way. A template placeholder with no value must fail loudly, never leave ``${...}``
in a config. The validations run in parallel: each is a short-lived Envoy process (about 0.3 s).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz import cli
from authz.render import templates
from authz.render.values import route
from devstack.envoy import (
    DEFAULT_VARS,
    GRPC_ACCESS_LOG,
    METADATA_UPSTREAM_HEADERS,
    TEMPLATE_DIR,
    envoy_binary,
    render,
)

pytestmark = pytest.mark.e2e

TEMPLATES = sorted(TEMPLATE_DIR.glob("*.yaml"))
# RFC 7517 appendix A.1's example RSA public key: a JWKS Envoy's jwt_authn accepts inline.
JWKS = {
    "keys": [
        {
            "kty": "RSA",
            "kid": "2011-04-29",
            "alg": "RS256",
            "e": "AQAB",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWK"
            "RXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMic"
            "AtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3"
            "XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        }
    ]
}
GATEWAY = templates.gateway(
    [
        route("/orders=orders-api@orders.apigee.svc.cluster.local:8080"),
        route("/inventory/v2=inventory-api@10.0.0.7:8081"),
        route("/=web@127.0.0.1:8888"),
    ]
)
# Values for every placeholder of every template. A new placeholder needs an entry here (the test names
# it); a new template needs nothing.
LOCAL: dict[str, str] = {
    "LISTEN_ADDRESS": "127.0.0.1",
    "LISTEN_PORT": "18080",
    "ADMIN_ADDRESS": "127.0.0.1",
    "ADMIN_PORT": "19901",
    "AUTHZ_HOST": "127.0.0.1",
    "AUTHZ_CLUSTER_TYPE": "STATIC",
    "AUTHZ_PORT": "15000",
    "AUTHZ_HTTP_HOST": "127.0.0.1",
    "AUTHZ_HTTP_CLUSTER_TYPE": "STATIC",
    "AUTHZ_HTTP_PORT": "15002",
    "METRICS_PORT": "15001",
    "UPSTREAM_HOST": "127.0.0.1",
    "UPSTREAM_CLUSTER_TYPE": "STATIC",
    "UPSTREAM_PORT": "18888",
    "EXT_AUTHZ_TIMEOUT": "1s",
    "HEALTH_INTERVAL": "1s",
    "AUTHZ_MAX_CONCURRENT_STREAMS": "1024",
    "AUTHZ_PER_ROUTE": templates.per_route_authz("orders-api"),
    "AUTHZ_CONTEXT": templates.context_headers("orders-api"),
    "UPSTREAM_HEADERS": METADATA_UPSTREAM_HEADERS,
    "ACCESS_LOG": GRPC_ACCESS_LOG,
    "API_NAME": "bench-api",
    "JWT_PROVIDER": "apigee",
    "JWT_ISSUER": "http://127.0.0.1:19000/token",
    "JWT_AUDIENCE": "remote-service-client",
    "JWKS_URI": "http://127.0.0.1:19000/certs",
    "JWKS_HOST": "127.0.0.1",
    "JWKS_CLUSTER_TYPE": "STATIC",
    "JWKS_PORT": "19000",
    "JWKS_TRANSPORT_SOCKET": templates.transport_socket(None, ""),
    "JWKS_INLINE": json.dumps(json.dumps(JWKS)),
    "HEALTH_PATH": "/gateway-health",
    "GATEWAY_ROUTES": GATEWAY.routes,
    "GATEWAY_CLUSTERS": GATEWAY.clusters,
}
RUNTIME = "https://api.example.com"
PRODUCTION: dict[str, str] = {
    **LOCAL,
    "LISTEN_ADDRESS": "0.0.0.0",
    "LISTEN_PORT": "8080",
    "ADMIN_PORT": "9901",
    "AUTHZ_HOST": "apigee-authz.apigee.svc.cluster.local",
    "AUTHZ_CLUSTER_TYPE": "STRICT_DNS",
    "AUTHZ_PORT": "5000",
    "AUTHZ_HTTP_HOST": "apigee-authz.apigee.svc.cluster.local",
    "AUTHZ_HTTP_CLUSTER_TYPE": "STRICT_DNS",
    "UPSTREAM_HOST": "localhost",
    "UPSTREAM_CLUSTER_TYPE": "STRICT_DNS",
    "AUTHZ_MAX_CONCURRENT_STREAMS": "100",
    "EXT_AUTHZ_TIMEOUT": "0.25s",
    "HEALTH_INTERVAL": "5s",
    "AUTHZ_PER_ROUTE": "{}",
    "AUTHZ_CONTEXT": "[]",
    "ACCESS_LOG": "[]",
    "JWT_PROVIDER": f"{RUNTIME}/remote-token/token",
    "JWT_ISSUER": f"{RUNTIME}/remote-token/token",
    "JWKS_URI": f"{RUNTIME}/remote-token/certs",
    "JWKS_HOST": "api.example.com",
    "JWKS_CLUSTER_TYPE": "STRICT_DNS",
    "JWKS_PORT": "443",
    "JWKS_TRANSPORT_SOCKET": templates.transport_socket(
        "api.example.com", "/etc/ssl/certs/ca-certificates.crt"
    ),
}
# What devstack.envoy.render derives itself (from api_name, gateway and AUTHZ_HOST).
DEVSTACK_DERIVED = {
    "AUTHZ_PER_ROUTE",
    "AUTHZ_CONTEXT",
    "AUTHZ_HTTP_HOST",
    "GATEWAY_ROUTES",
    "GATEWAY_CLUSTERS",
}
VALUE_SETS = {"local": LOCAL, "production": PRODUCTION}
# `authz render envoy` argv per case: each variant, the sidecar with an IP and with a DNS name.
RENDER_CASES: dict[str, list[str]] = {
    "sidecar-ip": ["--authz", "10.128.0.50:5000", "--api", "orders-api"],
    "sidecar-dns": ["--authz", "apigee-authz.apigee.svc.cluster.local:5000", "--upstream", "app:8080"],
    "sidecar-ipv6": ["--listen", "[::]:8080", "--authz", "[fd00::5]:5000"],
    "sidecar-http": ["--variant", "sidecar-http", "--authz-http", "10.128.0.50:5002", "--metadata-headers"],
    "jwt-authn-apigee": [
        "--variant",
        "jwt-authn",
        "--apigee-runtime",
        RUNTIME,
        "--authz",
        "10.128.0.50:5000",
    ],
    "jwt-authn-local": [
        "--variant",
        "jwt-authn",
        "--jwt-issuer",
        "http://127.0.0.1:9000/token",
        "--jwks-uri",
        "http://127.0.0.1:9000/certs",
        "--jwt-provider",
        "apigee",
    ],  # fmt: skip
    "gateway": [
        "--variant",
        "gateway",
        "--authz",
        "apigee-authz.apigee.svc.cluster.local:5000",
        "--route",
        "/orders=orders-api@orders.apigee.svc.cluster.local:8080",
        "--route",
        "/inventory=inventory-api@10.0.0.7:8080",
        "--route",
        "/=web@127.0.0.1:8888",
    ],  # fmt: skip
}


@dataclass(frozen=True)
class Validation:
    returncode: int
    output: str


def validate(config: Path) -> Validation:
    argv = [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "error"]
    argv += ["--use-dynamic-base-id", "--disable-hot-restart"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return Validation(done.returncode, (done.stdout + done.stderr)[-2000:])


def render_cli(argv: list[str], out: Path) -> None:
    assert cli.main(["render", "envoy", *argv, "--output", str(out)]) == 0


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every config to validate, by case id; written once for the module."""
    out = tmp_path_factory.mktemp("envoy-configs")
    paths: dict[str, Path] = {}
    for template in TEMPLATES:
        for set_name, values in VALUE_SETS.items():
            case = f"{template.name}-{set_name}"
            paths[case] = out / f"{template.stem}-{set_name}.yaml"
            paths[case].write_text(templates.fill(template.read_text(), values, template.name))
    for template in TEMPLATES:  # as devstack renders them: DEFAULT_VARS plus what its callers pass
        given = {k: LOCAL[k] for k in templates.placeholders(template.read_text()) - DEVSTACK_DERIVED}
        given = {k: v for k, v in given.items() if k not in DEFAULT_VARS}
        paths[f"{template.name}-devstack"] = render(
            template.name,
            out,
            given,
            api_name="orders-api",
            gateway=GATEWAY,
            out_name=f"{template.stem}-devstack.yaml",
        )
    for case, argv in RENDER_CASES.items():
        paths[f"render-{case}"] = out / f"render-{case}.yaml"
        render_cli(argv, paths[f"render-{case}"])
    # The control: Envoy must refuse a DNS name in a STATIC cluster, or this test could never fail.
    broken = {**LOCAL, "AUTHZ_HOST": "authz.example.com"}
    paths["control-broken"] = out / "control-broken.yaml"
    paths["control-broken"].write_text(templates.fill((TEMPLATE_DIR / "sidecar.yaml").read_text(), broken))
    return paths


@pytest.fixture(scope="module")
def validations(configs: Mapping[str, Path]) -> dict[str, Validation]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(configs, pool.map(validate, configs.values()), strict=True))
    return results


def test_the_glob_finds_the_shipped_configs():
    names = {t.name for t in TEMPLATES}
    assert {
        "sidecar.yaml",
        "sidecar-http.yaml",
        "sidecar-jwt-authn.yaml",
        "gateway.yaml",
        "bench.yaml",
    } <= names


@pytest.mark.parametrize("set_name", sorted(VALUE_SETS))
@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_every_template_is_a_config_envoy_accepts(template, set_name, validations):
    result = validations[f"{template.name}-{set_name}"]
    assert result.returncode == 0, result.output


@pytest.mark.parametrize("case", sorted(RENDER_CASES))
def test_every_render_variant_is_a_config_envoy_accepts(case, validations):
    result = validations[f"render-{case}"]
    assert result.returncode == 0, result.output


def test_envoy_refuses_a_broken_config(validations):
    result = validations["control-broken"]
    assert result.returncode != 0
    assert "malformed IP address: authz.example.com" in result.output


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_an_unset_placeholder_fails_loudly(template):
    text = template.read_text()
    names = templates.placeholders(text)
    for name in names:
        values = {k: v for k, v in LOCAL.items() if k != name}
        with pytest.raises(templates.TemplateError, match=rf"{template.name}: no value for \${{{name}}}"):
            templates.fill(text, values, template.name)
    filled = templates.fill(text, LOCAL, template.name)
    assert "${" not in filled
    assert "$" not in filled  # no stray placeholder syntax of any form


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_devstack_defaults_render_every_template_into_a_config_envoy_accepts(template, configs, validations):
    assert "$" not in configs[f"{template.name}-devstack"].read_text()
    result = validations[f"{template.name}-devstack"]
    assert result.returncode == 0, result.output
