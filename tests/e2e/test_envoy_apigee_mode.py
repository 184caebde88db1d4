"""Apigee mode end to end: a real Envoy in front of ``python -m authz serve`` against a FakeApigee.

The fake is served on 127.0.0.1 by its own asyncio loop on a thread of this process
(tests/support/apigee_thread.py), so tests turn its knobs and take it down and up; authz runs as a
subprocess, as deployed, with a provisioned policy secret (Apigee X/hybrid: every call to Apigee carries
our internal JWT, which the fake verifies). Expected outcomes are the DENY_STATUS table of
authz/server/codec.py: 401 missing or unknown key, 403 not authorized, 503 unavailable or not ready.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import Stack, start_stack
from devstack.upstream import EchoUpstream
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import PolicySecretFiles, write_policy_secret
from tests.support.apigee_thread import ApigeeThread
from tests.support.http_polling import outcome, poll, unavailable

pytestmark = pytest.mark.e2e

ORG, ENV = "demo", "test"
ORDERS_API, LEGACY_API = "orders.example.com", "legacy.example.com"
ORDERS_KEY = "orders-key-2f9c41d07b"
LEGACY_KEY = "legacy-key-8e13a6c5f2"
OTHER_KEY = "other-key-5a0d7e93c1"  # valid in Apigee, never sent before the test that needs it
# Reference shapes (apigee-adapter.md §3.1): quota fields are strings, "null" means none.
PRODUCTS: list[dict[str, Any]] = [
    {"name": "orders", "displayName": "Orders", "approvalType": "auto", "environments": [ENV],
     "attributes": [{"name": "access", "value": "private"}],
     "quota": "100000", "quotaInterval": "1", "quotaTimeUnit": "minute",
     "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
         {"apiSource": ORDERS_API,
          "operations": [{"resource": "/v1/orders/**", "methods": ["GET", "POST"]},
                         {"resource": "/v1/orders", "methods": ["GET"]}],
          "quota": {"limit": "100000", "interval": "1", "timeUnit": "minute"}}]}},
    {"name": "legacy", "displayName": "Legacy", "environments": [ENV], "apiResources": ["/v1/**"],
     "quota": "null", "quotaInterval": "null", "quotaTimeUnit": "null",
     "attributes": [{"name": "apigee-remote-service-targets", "value": f"{LEGACY_API},legacy.internal"}]},
]  # fmt: skip
KEYS = {ORDERS_KEY: ["orders"], LEGACY_KEY: ["legacy"], OTHER_KEY: ["orders"]}
# Above the service's own 0.8 s wait for an uncached key, as in the Go adapter's sample Envoy config, so
# a slow verifyApiKey is answered by the service (503 auth_unavailable), not by Envoy's timeout.
EXT_AUTHZ_TIMEOUT = "1s"
REFRESH_RATE = "1s"  # products poll (and retry) every second


class ApigeeStacks:
    """Starts FakeApigee threads and authz (Apigee mode) + Envoy stacks; stops them all at teardown."""

    def __init__(
        self, base_dir: Path, upstream: EchoUpstream, secret: PolicySecretFiles, transport: str
    ) -> None:
        self._transport = transport
        self._base_dir = base_dir
        self._upstream = upstream
        self._secret = secret
        self._fakes: list[ApigeeThread] = []
        self._stacks: list[Stack] = []

    def fake(self, *, token_ttl: float = 900.0, up: bool = True) -> ApigeeThread:
        """A FakeApigee with PRODUCTS and KEYS, serving (or, with ``up=False``, unreachable)."""
        fake = FakeApigee(org=ORG, env=ENV, policy_jwks=self._secret.jwks, token_ttl=token_ttl)
        fake.set_products(PRODUCTS)
        for key, products in KEYS.items():
            fake.add_key(key, app=f"{products[0]}-app", developer_email="dev@example.com", products=products)
        apigee = ApigeeThread(fake, up=up)
        self._fakes.append(apigee)
        return apigee

    def stack(self, apigee: ApigeeThread, *, wait_ready: bool = True) -> Stack:
        """authz against ``apigee`` behind Envoy; the API is the Host header (no route extension)."""
        work_dir = self._base_dir / f"stack{len(self._stacks)}"
        overrides = {
            "global": {"graceful_shutdown_timeout": "1s"},
            "tenant": {"remote_service_api": apigee.remote_service_url, "client_timeout": "2s"},
            "products": {"refresh_rate": REFRESH_RATE},
        }
        stack = start_stack(
            work_dir,
            None,
            self._upstream.port,
            overrides=overrides,
            envoy_vars={"EXT_AUTHZ_TIMEOUT": EXT_AUTHZ_TIMEOUT},
            policy_secret_dir=self._secret.directory,
            wait_ready=wait_ready,
            transport=self._transport,
        )
        self._stacks.append(stack)
        return stack

    def close(self) -> None:
        for stack in reversed(self._stacks):
            stack.close()
            print(f"logs of {stack.work_dir}:\n{stack.logs()}")  # shown by pytest when a test failed
        for apigee in self._fakes:
            apigee.close()


@pytest.fixture(scope="module")
def policy_secret(tmp_path_factory: pytest.TempPathFactory) -> PolicySecretFiles:
    return write_policy_secret(tmp_path_factory.mktemp("policy-secret"))


@pytest.fixture
def apigee_stacks(
    tmp_path: Path,
    echo_upstream: EchoUpstream,
    envoy_bin: str,
    policy_secret: PolicySecretFiles,
    transport: str,
) -> Iterator[ApigeeStacks]:
    stacks = ApigeeStacks(tmp_path, echo_upstream, policy_secret, transport)
    yield stacks
    stacks.close()


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
    echo_upstream: EchoUpstream,
    envoy_bin: str,
    policy_secret: PolicySecretFiles,
    transport: str,
) -> Iterator[Stack]:
    """One fake and one stack for the read-only tests of this module."""
    stacks = ApigeeStacks(tmp_path_factory.mktemp("apigee-e2e"), echo_upstream, policy_secret, transport)
    try:
        yield stacks.stack(stacks.fake())
    finally:
        stacks.close()


def send(
    http: httpx.Client, stack: Stack, path: str, key: str | None, host: str = ORDERS_API, method: str = "GET"
) -> httpx.Response:
    headers = {"host": host}
    if key is not None:
        headers["x-api-key"] = key
    return http.request(method, stack.url + path, headers=headers)


def readyz(http: httpx.Client, stack: Stack) -> tuple[int, dict[str, Any]]:
    response = http.get(f"{stack.metrics_url}/readyz")
    return response.status_code, response.json()


def readiness(source: str) -> dict[str, Any]:
    """The /readyz body of a running service whose products come from ``source`` ("none": no products)."""
    return {"catalog_loaded": source != "none", "not_draining": True, "catalog_source": source}


def metric(http: httpx.Client, stack: Stack, name: str, **labels: str) -> float | None:
    """The value of one sample of authz's /metrics (labels given must match), None when absent."""
    for line in http.get(f"{stack.metrics_url}/metrics").text.splitlines():
        found = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if found is None or found[1] != name:
            continue
        sample = dict(re.findall(r'(\w+)="([^"]*)"', found[2] or ""))
        if all(sample.get(k) == v for k, v in labels.items()):
            return float(found[3])
    return None


def snapshot_file(stack: Stack) -> Path:
    """Where authz keeps the last good product list (global.temp_dir set by devstack for Apigee mode)."""
    return stack.work_dir / "apigee-temp" / "products" / f"{ORG}~{ENV}.json"


@pytest.mark.parametrize(
    ("host", "method", "path", "key", "expected"),
    [
        (ORDERS_API, "GET", "/v1/orders/1", ORDERS_KEY, (200, "")),
        (ORDERS_API, "POST", "/v1/orders/1", ORDERS_KEY, (200, "")),
        (LEGACY_API, "DELETE", "/v1/anything", LEGACY_KEY, (200, "")),  # legacy: methods not checked
        (ORDERS_API, "GET", "/v1/orders/1", None, (401, "missing_credentials")),
        (ORDERS_API, "GET", "/v1/orders/1", "not-a-key-4d1e", (401, "unknown_key")),
        (ORDERS_API, "GET", "/v2/orders", ORDERS_KEY, (403, "not_authorized")),  # no product for the path
        (LEGACY_API, "GET", "/v1/orders/1", ORDERS_KEY, (403, "not_authorized")),  # nor for the API
        (ORDERS_API, "GET", "/v1/orders/1", LEGACY_KEY, (403, "not_authorized")),
        (ORDERS_API, "DELETE", "/v1/orders/1", ORDERS_KEY, (403, "not_authorized")),  # method not listed
        (ORDERS_API, "POST", "/v1/orders", ORDERS_KEY, (403, "not_authorized")),  # /v1/orders is GET only
    ],
)
def test_decisions(shared, http, host, method, path, key, expected):
    assert outcome(send(http, shared, path, key, host, method)) == expected, shared.logs()


def test_allowed_request_reaches_upstream_without_the_key(shared, http):
    response = send(http, shared, "/v1/orders/7?a=1", ORDERS_KEY)
    assert response.status_code == 200, shared.logs()
    seen = response.json()
    assert seen["path"] == "/v1/orders/7?a=1"
    assert seen["headers"]["host"] == ORDERS_API
    assert "x-api-key" not in seen["headers"]
    assert not [name for name in seen["headers"] if name.startswith("x-apigee-")]


def test_a_thousand_requests_with_one_key_make_one_verify_call(apigee_stacks, http):
    apigee = apigee_stacks.fake()
    stack = apigee_stacks.stack(apigee)
    statuses = collections.Counter(
        send(http, stack, f"/v1/orders/{i % 10}", ORDERS_KEY).status_code for i in range(1000)
    )
    assert statuses == {200: 1000}, stack.logs()
    assert apigee.calls("verifyApiKey") == 1


def test_outage_keeps_cached_keys_and_catalog_and_new_keys_get_503(apigee_stacks, http):
    apigee = apigee_stacks.fake()
    stack = apigee_stacks.stack(apigee)
    assert send(http, stack, "/v1/orders/0", ORDERS_KEY).status_code == 200  # now cached
    errors_before = metric(http, stack, "catalog_reloads_total", org=ORG, result="error") or 0.0

    apigee.down()  # connections refused from now on
    poll(
        lambda: metric(http, stack, "catalog_reloads_total", org=ORG, result="error") or 0.0,
        lambda errors: errors > errors_before,
        "a products poll failing during the outage",
    )
    for i in range(1, 21):  # other paths than before: answered from the key cache, not an allow cache
        assert send(http, stack, f"/v1/orders/{i}", ORDERS_KEY).status_code == 200, stack.logs()
    for key in (OTHER_KEY, "never-seen-key-77b0"):  # valid or not, Apigee cannot tell us now
        assert outcome(send(http, stack, "/v1/orders/1", key)) == unavailable(
            stack.transport, "auth_unavailable"
        ), stack.logs()
    assert readyz(http, stack) == (200, readiness("apigee"))
    assert metric(http, stack, "products_cached", org=ORG) == len(PRODUCTS)
    assert outcome(send(http, stack, "/v2/orders", ORDERS_KEY)) == (403, "not_authorized")  # same catalog

    apigee.up()
    poll(lambda: outcome(send(http, stack, "/v1/orders/1", OTHER_KEY)), lambda o: o == (200, ""), "a new key")
    assert stack.envoy_stats().get("http.ingress_http.ext_authz.failure_mode_allowed", 0) == 0


def test_cold_start_serves_the_snapshot_until_apigee_is_back(apigee_stacks, http):
    apigee = apigee_stacks.fake()
    stack = apigee_stacks.stack(apigee)
    assert send(http, stack, "/v1/orders/1", ORDERS_KEY).status_code == 200
    assert json.loads(snapshot_file(stack).read_text())["apiProduct"] == PRODUCTS

    apigee.down()
    stack.restart_authz()  # ready at once: the snapshot stands in for Apigee
    assert readyz(http, stack) == (200, readiness("snapshot"))
    assert metric(http, stack, "catalog_from_snapshot", org=ORG) == 1.0
    assert outcome(send(http, stack, "/v1/orders/1", None)) == (401, "missing_credentials")
    # The key cache is memory only: after the restart no key can be verified until Apigee answers.
    assert outcome(send(http, stack, "/v1/orders/1", ORDERS_KEY)) == unavailable(
        stack.transport, "auth_unavailable"
    )

    apigee.up()
    poll(lambda: readyz(http, stack)[1]["catalog_source"], lambda s: s == "apigee", "catalog from Apigee")
    assert metric(http, stack, "catalog_from_snapshot", org=ORG) == 0.0
    seen = poll(
        lambda: outcome(send(http, stack, "/v1/orders/1", ORDERS_KEY)),
        lambda o: o != unavailable(stack.transport, "auth_unavailable"),
        "the key verified again",
    )
    assert seen == (200, ""), stack.logs()


def test_cold_start_without_snapshot_is_unready_and_503_until_apigee_answers(apigee_stacks, http):
    apigee = apigee_stacks.fake(up=False)
    stack = apigee_stacks.stack(apigee, wait_ready=False)
    assert readyz(http, stack) == (503, readiness("none"))
    for key in (ORDERS_KEY, None, "not-a-key-4d1e"):
        assert outcome(send(http, stack, "/v1/orders/1", key)) == unavailable(stack.transport, "not_ready"), (
            stack.logs()
        )

    apigee.up()
    poll(lambda: readyz(http, stack)[0], lambda status: status == 200, "ready")
    seen: list[tuple[int, str]] = []

    def probe() -> tuple[int, str]:
        seen.append(outcome(send(http, stack, "/v1/orders/1", ORDERS_KEY)))
        return seen[-1]

    poll(probe, lambda o: o == (200, ""), "the valid key allowed")
    assert set(seen) <= {unavailable(stack.transport, "auth_unavailable"), (200, "")}, (
        seen
    )  # never a 401/403 on the way
    assert outcome(send(http, stack, "/v1/orders/1", "not-a-key-4d1e")) == (401, "unknown_key")
    assert stack.envoy_stats().get("http.ingress_http.ext_authz.failure_mode_allowed", 0) == 0


def test_revoked_key_stops_working_within_seconds(apigee_stacks, http):
    token_ttl = 2.0  # verifyApiKey tokens go stale after 2 s; a stale hit refreshes in the background
    apigee = apigee_stacks.fake(token_ttl=token_ttl)
    stack = apigee_stacks.stack(apigee)
    assert send(http, stack, "/v1/orders/1", ORDERS_KEY).status_code == 200

    apigee.call(apigee.fake.revoke_key, ORDERS_KEY)
    revoked_at = time.monotonic()
    seen: list[tuple[int, str]] = []

    def probe() -> tuple[int, str]:
        seen.append(outcome(send(http, stack, "/v1/orders/1", ORDERS_KEY)))
        return seen[-1]

    poll(probe, lambda o: o != (200, ""), "the revoked key denied")
    took = time.monotonic() - revoked_at
    assert seen[-1] == (401, "unknown_key"), stack.logs()
    assert took < token_ttl + 2.0, f"revocation took {took:.1f}s"
