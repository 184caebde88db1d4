"""envoy/gateway.yaml with a real Envoy and authz: each path prefix goes to its own upstream as its own API.

The gateway routes ``/v1/orders`` to one upstream as ``orders-api`` and ``/v1`` to another as
``legacy-api`` (tests/support/catalogs.py: the orders key holds a product for orders-api only, the
legacy key one for legacy-api). A key is allowed on its API's prefix and refused on the other's, and the
health path is answered without asking authz. gRPC transport only: the gateway template is gRPC.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from authz.render import templates
from authz.render.values import HostPort, Route
from devstack.stack import Stack
from devstack.upstream import EchoUpstream
from tests.e2e.conftest import StackFactory
from tests.support.catalogs import LEGACY_KEY, ORDERS_KEY, catalog_yaml

pytestmark = pytest.mark.e2e

HEALTH_PATH = "/gateway-health"


@pytest.fixture(scope="module")
def legacy_upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(grpc_module_authz_stack: StackFactory, echo_upstream, legacy_upstream) -> Stack:
    routes = templates.gateway(
        [
            Route("/v1/orders", "orders-api", HostPort("127.0.0.1", echo_upstream.port)),
            Route("/v1", "legacy-api", HostPort("127.0.0.1", legacy_upstream.port)),
        ]
    )
    return grpc_module_authz_stack(
        catalog_yaml(),
        {"auth": {"append_metadata_headers": True}},  # x-apigee-api upstream says which API authz checked
        envoy_template="gateway.yaml",
        envoy_vars={
            "HEALTH_PATH": HEALTH_PATH,
            "GATEWAY_ROUTES": routes.routes,
            "GATEWAY_CLUSTERS": routes.clusters,
        },
    )


def get(stack: Stack, path: str, key: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side dot-segment removal) through the gateway."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=5)
    try:
        conn.request("GET", path, headers={"x-api-key": key} if key else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def upstream_requests(stack: Stack, upstream: EchoUpstream) -> int:
    return stack.envoy_stats().get(f"cluster.upstream_127_0_0_1_{upstream.port}.upstream_rq_200", 0)


def checks(stack: Stack) -> int:
    counters = stack.envoy_stats()
    return sum(counters.get(f"http.ingress_http.ext_authz.{name}", 0) for name in ("ok", "denied", "error"))


@pytest.mark.parametrize(
    ("key", "path", "api"),
    [(ORDERS_KEY, "/v1/orders/42", "orders-api"), (LEGACY_KEY, "/v1/reports", "legacy-api")],
)
def test_a_key_is_allowed_on_its_api_prefix_and_reaches_that_upstream(
    gateway, echo_upstream, legacy_upstream, key, path, api
):
    upstream = echo_upstream if api == "orders-api" else legacy_upstream
    before = upstream_requests(gateway, upstream)
    status, body = get(gateway, path, key)
    assert status == 200, gateway.logs()
    echoed = json.loads(body)
    assert echoed["path"] == path
    assert echoed["headers"]["x-apigee-api"] == api
    assert upstream_requests(gateway, upstream) == before + 1


@pytest.mark.parametrize(("key", "path"), [(ORDERS_KEY, "/v1/reports"), (LEGACY_KEY, "/v1/orders/42")])
def test_a_key_is_refused_on_the_other_apis_prefix(gateway, key, path):
    status, body = get(gateway, path, key)
    assert status == 403, body
    assert json.loads(body)["reason"] == "not_authorized"


def test_dot_segments_cannot_borrow_another_apis_route(gateway, echo_upstream):
    # Normalized to /v1/reports before routing: the legacy route, where the orders key holds nothing.
    before = upstream_requests(gateway, echo_upstream)
    status, _ = get(gateway, "/v1/orders/../reports", ORDERS_KEY)
    assert status == 403
    assert upstream_requests(gateway, echo_upstream) == before


def test_the_health_path_is_answered_without_authz(gateway):
    before = checks(gateway)
    assert get(gateway, HEALTH_PATH) == (200, b"ok\n")
    assert checks(gateway) == before
    status, _ = get(gateway, "/v1/orders/42")  # a request without a key still is checked (and refused)
    assert status == 401
    assert checks(gateway) == before + 1
