"""The key index end to end: a real Envoy in front of ``python -m authz serve`` (Apigee X mode,
``tenant.key_sync_interval`` set) against a FakeApigee served from a thread of this process.

authz lists every app with its credentials from the fake's management API (``tenant.management_api``,
with a Google token the fake issues for the analytics service account) as it starts and every second,
and answers API keys from memory: an index hit needs no ``/verifyApiKey``, a revoked or expired key is
a 401 at once, a key created since the last listing goes to ``/verifyApiKey`` once and its app is then
synced early, and a restart while the control plane fails serves the snapshot of the last good index.
The same cases in process: tests/integration/test_key_sync_service.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import APIGEE_TEMP_DIR, Stack, start_stack
from devstack.upstream import EchoUpstream
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import (
    PolicySecretFiles,
    new_service_account,
    write_analytics_secret,
    write_policy_secret,
)
from tests.support.apigee_thread import ApigeeThread
from tests.support.http_polling import outcome, poll, unavailable

pytestmark = pytest.mark.e2e

ORG, ENV, API = "demo", "test", "orders.example.com"
DEV = "dev@example.com"
PRODUCTS: list[dict[str, Any]] = [
    {"name": "orders", "environments": [ENV],
     "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
         {"apiSource": API, "operations": [{"resource": "/v1/orders/**", "methods": ["GET", "POST"]}]}]}},
]  # fmt: skip
KNOWN_KEY = "index-known-key-3c81d0f2a7"
REVOKED_KEY = "index-revoked-key-94be1f06d3"
EXPIRED_KEY = "index-expired-key-0d57c2e8b1"
FLIP_KEY = "index-flip-key-6a20e9d4c5"  # revoked in the fake by the revocation test only
NEW_KEY = "index-new-key-e71b3f5a08"  # created in the fake by the fallback test only
UNKNOWN_KEY = "index-unknown-key-58f0a4c29e"
SYNC_INTERVAL = 1.0  # tenant.key_sync_interval, the smallest the config takes
# Revoked just after a sync ended, a key is denied once the next one has run: interval + 10 % jitter later,
# plus the listing (a few ms against the fake); the rest is slack for a busy CI machine.
REVOCATION_BOUND = 2.5
EXT_AUTHZ_TIMEOUT = "1s"  # above the service's own 0.8 s wait for /verifyApiKey


class KeyIndexStacks:
    """FakeApigees (with a Google service account for the management API) and authz + Envoy stacks with a
    key index; everything is stopped at teardown, stacks first."""

    def __init__(
        self, base_dir: Path, upstream: EchoUpstream, secret: PolicySecretFiles, transport: str
    ) -> None:
        self._transport = transport
        self._base_dir = base_dir
        self._upstream = upstream
        self._secret = secret
        self._fakes: list[ApigeeThread] = []
        self._stacks: list[Stack] = []

    def fake(self) -> tuple[ApigeeThread, Path]:
        """A serving fake with PRODUCTS and the keys every test starts from, and the directory of the
        analytics Secret (``client_secret.json``) whose service account the fake gives Google tokens."""
        fake = FakeApigee(org=ORG, env=ENV, policy_jwks=self._secret.jwks)
        fake.set_products(PRODUCTS)
        for key in (KNOWN_KEY, REVOKED_KEY, EXPIRED_KEY, FLIP_KEY):
            fake.add_key(key, app="orders-app", developer_email=DEV, products=["orders"])
        fake.revoke_key(REVOKED_KEY)
        fake.set_credential_expiry(EXPIRED_KEY, int(time.time() * 1000) - 60_000)
        apigee = ApigeeThread(fake)
        self._fakes.append(apigee)
        account = new_service_account(f"{apigee.base_url}/token")
        apigee.call(fake.add_service_account, account.client_email, account.public_key_pem)
        analytics_dir = self._base_dir / f"analytics-secret{len(self._fakes)}"
        return apigee, write_analytics_secret(analytics_dir, account).parent

    def stack(self, apigee: ApigeeThread, analytics_dir: Path) -> Stack:
        """authz (key index every SYNC_INTERVAL) against ``apigee`` behind Envoy; the API is the Host."""
        overrides = {
            "global": {"graceful_shutdown_timeout": "1s"},
            "tenant": {
                "remote_service_api": apigee.remote_service_url,
                "management_api": apigee.base_url,
                "client_timeout": "2s",
                "key_sync_interval": f"{SYNC_INTERVAL:g}s",
            },
        }
        with pytest.MonkeyPatch.context() as env:  # the child process reads it as it starts
            env.setenv("AUTHZ_ANALYTICS_SECRET", str(analytics_dir))
            stack = start_stack(
                self._base_dir / f"stack{len(self._stacks)}",
                None,
                self._upstream.port,
                overrides=overrides,
                envoy_vars={"EXT_AUTHZ_TIMEOUT": EXT_AUTHZ_TIMEOUT},
                policy_secret_dir=self._secret.directory,
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


class Shared:
    """The module's fake and stack, synced once before the first test."""

    def __init__(self, apigee: ApigeeThread, stack: Stack, first_sync_keys: float | None) -> None:
        self.apigee = apigee
        self.fake = apigee.fake
        self.stack = stack
        self.first_sync_keys = first_sync_keys  # key_index_keys right after the first good listing


def metric(http: httpx.Client, stack: Stack, sample: str, **labels: str) -> float | None:
    """One sample of authz's /metrics (the labels given must match), None when absent."""
    text = http.get(f"{stack.metrics_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def counter(http: httpx.Client, stack: Stack, sample: str, **labels: str) -> float:
    return metric(http, stack, sample, org=ORG, **labels) or 0.0


def index_hits(http: httpx.Client, stack: Stack) -> float:
    return counter(http, stack, "api_key_cache_lookups_total", result="index")


def wait_synced(http: httpx.Client, stack: Stack, count: int = 1) -> None:
    poll(
        lambda: counter(http, stack, "key_syncs_total", result="ok"),
        lambda syncs: syncs >= count,
        f"{count} good key syncs",
    )


def send(http: httpx.Client, stack: Stack, path: str, key: str | None) -> httpx.Response:
    headers = {"host": API}
    if key is not None:
        headers["x-api-key"] = key
    return http.get(stack.url + path, headers=headers)


def readyz(http: httpx.Client, stack: Stack) -> tuple[int, dict[str, Any]]:
    response = http.get(f"{stack.metrics_url}/readyz")
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def policy_secret(tmp_path_factory: pytest.TempPathFactory) -> PolicySecretFiles:
    return write_policy_secret(tmp_path_factory.mktemp("policy-secret"))


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
    echo_upstream: EchoUpstream,
    envoy_bin: str,
    policy_secret: PolicySecretFiles,
    transport: str,
) -> Iterator[Shared]:
    """One fake and one stack for the tests of this module that turn no fault knob for good; each test
    that changes the fake's state does it to a key of its own."""
    stacks = KeyIndexStacks(tmp_path_factory.mktemp("key-index-e2e"), echo_upstream, policy_secret, transport)
    try:
        apigee, analytics_dir = stacks.fake()
        stack = stacks.stack(apigee, analytics_dir)
        with httpx.Client(timeout=5.0, trust_env=False) as http:
            wait_synced(http, stack)  # the first listing runs in the background after start-up
            keys = metric(http, stack, "key_index_keys", org=ORG)
        yield Shared(apigee, stack, keys)
    finally:
        stacks.close()


@pytest.fixture
def key_index_stacks(
    tmp_path: Path,
    echo_upstream: EchoUpstream,
    envoy_bin: str,
    policy_secret: PolicySecretFiles,
    transport: str,
) -> Iterator[KeyIndexStacks]:
    stacks = KeyIndexStacks(tmp_path, echo_upstream, policy_secret, transport)
    yield stacks
    stacks.close()


def test_indexed_keys_are_decided_without_verify_api_key(shared, http):
    stack, apigee = shared.stack, shared.apigee
    assert shared.first_sync_keys == 4  # known, revoked, expired and flip: inactive keys are indexed too
    assert counter(http, stack, "key_index_synced_timestamp_seconds") > time.time() - 60
    verify_before, hits_before = apigee.calls("verifyApiKey"), index_hits(http, stack)

    response = send(http, stack, "/v1/orders/11?a=1", KNOWN_KEY)
    assert response.status_code == 200, stack.logs()
    seen = response.json()  # what the echo upstream received
    assert seen["path"] == "/v1/orders/11?a=1"
    assert seen["headers"]["host"] == API
    assert "x-api-key" not in seen["headers"]
    assert outcome(send(http, stack, "/v1/orders/12", REVOKED_KEY)) == (401, "revoked_key"), stack.logs()
    assert outcome(send(http, stack, "/v1/orders/13", EXPIRED_KEY)) == (401, "expired_key"), stack.logs()
    assert outcome(send(http, stack, "/v2/orders/14", KNOWN_KEY)) == (403, "not_authorized"), stack.logs()

    assert apigee.calls("verifyApiKey") == verify_before  # four decisions, no call to Apigee
    assert index_hits(http, stack) - hits_before == 4

    # A key no listing has: the one call to /verifyApiKey is what the index saved the others.
    assert outcome(send(http, stack, "/v1/orders/15", UNKNOWN_KEY)) == (401, "unknown_key"), stack.logs()
    assert apigee.calls("verifyApiKey") == verify_before + 1
    assert index_hits(http, stack) - hits_before == 4


def test_a_key_revoked_in_apigee_stops_within_one_sync_interval(shared, http):
    stack, apigee = shared.stack, shared.apigee
    assert outcome(send(http, stack, "/v1/orders/21", FLIP_KEY)) == (200, ""), stack.logs()
    verify_before = apigee.calls("verifyApiKey")
    # Revoke right after a sync, so the wait measured is a whole interval, not what was left of one.
    syncs = counter(http, stack, "key_syncs_total", result="ok")
    wait_synced(http, stack, int(syncs) + 1)

    apigee.call(shared.fake.revoke_key, FLIP_KEY)
    revoked_at, revoked_wall = time.monotonic(), time.time()
    seen: list[tuple[int, str]] = []

    def probe() -> tuple[int, str]:
        seen.append(outcome(send(http, stack, "/v1/orders/21", FLIP_KEY)))
        return seen[-1]

    poll(probe, lambda o: o != (200, ""), "the revoked key denied", timeout=2 * REVOCATION_BOUND)
    took = time.monotonic() - revoked_at
    assert seen[-1] == (401, "revoked_key"), stack.logs()
    assert set(seen[:-1]) <= {(200, "")}, seen
    assert took < REVOCATION_BOUND, f"revocation took {took:.2f}s"
    # The listing that carried the revocation ran after it, and the index answered without Apigee.
    assert counter(http, stack, "key_index_synced_timestamp_seconds") >= revoked_wall
    assert apigee.calls("verifyApiKey") == verify_before


def test_a_key_created_since_the_sync_falls_back_then_its_app_syncs_early(shared, http):
    stack, apigee, fake = shared.stack, shared.apigee, shared.fake
    # From now on every full listing fails (the index is kept): only the early sync of the new key's app,
    # GET apps/{appId} after /verifyApiKey vouched for it, can bring the key into the index.
    apigee.call(fake.fail_next, "apps", 503, 1000)
    try:
        keys_before = metric(http, stack, "key_index_keys", org=ORG)
        assert keys_before is not None
        verify_before, app_before = apigee.calls("verifyApiKey"), apigee.calls("app")
        apigee.call(fake.add_key, NEW_KEY, app="late-app", developer_email=DEV, products=["orders"])

        hits_before = index_hits(http, stack)
        assert outcome(send(http, stack, "/v1/orders/31", NEW_KEY)) == (200, ""), stack.logs()
        assert apigee.calls("verifyApiKey") == verify_before + 1
        assert index_hits(http, stack) == hits_before  # a miss: answered by /verifyApiKey

        poll(
            lambda: metric(http, stack, "key_index_keys", org=ORG),
            lambda keys: keys == keys_before + 1,
            "the new key in the index",
        )
        assert apigee.calls("app") >= app_before + 1

        hits_before = index_hits(http, stack)
        assert outcome(send(http, stack, "/v1/orders/32", NEW_KEY)) == (200, ""), stack.logs()
        assert index_hits(http, stack) - hits_before == 1  # now from the index
        assert apigee.calls("verifyApiKey") == verify_before + 1
    finally:
        apigee.call(fake.clear_faults, "apps")


def test_cold_start_with_the_control_plane_failing_serves_the_snapshots(key_index_stacks, http):
    apigee, analytics_dir = key_index_stacks.fake()
    stack = key_index_stacks.stack(apigee, analytics_dir)
    wait_synced(http, stack)
    assert outcome(send(http, stack, "/v1/orders/41", KNOWN_KEY)) == (200, ""), stack.logs()
    temp_dir = stack.work_dir / APIGEE_TEMP_DIR
    key_snapshot = temp_dir / "keys" / f"{ORG}.json"
    poll(key_snapshot.exists, bool, "the key snapshot written")
    text = key_snapshot.read_text()
    assert len([key for c in json.loads(text)["credentials"] for key in c["keys"]]) == 4
    assert not [key for key in (KNOWN_KEY, REVOKED_KEY, EXPIRED_KEY, FLIP_KEY) if key in text]  # digests
    assert (temp_dir / "products" / f"{ORG}~{ENV}.json").exists()

    # Same disk, same config, and every call the service makes to the control plane fails.
    for endpoint in ("developers", "apps", "app", "verifyApiKey", "products"):
        apigee.call(apigee.fake.fail_next, endpoint, 503, 1000)
    asked_before = apigee.calls("developers") + apigee.calls("products")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AUTHZ_ANALYTICS_SECRET", str(analytics_dir))
        stack.restart_authz()  # ready at once: products from their snapshot
    status, body = readyz(http, stack)
    assert (status, body["catalog_source"], body["key_index_source"]) == (200, "snapshot", "snapshot"), body

    assert outcome(send(http, stack, "/v1/orders/42", KNOWN_KEY)) == (200, ""), stack.logs()
    assert outcome(send(http, stack, "/v1/orders/43", REVOKED_KEY)) == (401, "revoked_key"), stack.logs()
    # Apigee was asked and failed (so the answers above came from the snapshot), and still they stand.
    poll(lambda: counter(http, stack, "key_syncs_total", result="error"), lambda n: n >= 1, "a failed sync")
    assert apigee.calls("developers") + apigee.calls("products") > asked_before
    assert apigee.calls("verifyApiKey") == 0
    assert outcome(send(http, stack, "/v1/orders/44", KNOWN_KEY)) == (200, ""), stack.logs()
    assert outcome(send(http, stack, "/v1/orders/45", UNKNOWN_KEY)) == unavailable(
        stack.transport, "auth_unavailable"
    )
    assert apigee.calls("verifyApiKey") >= 1  # the only key the snapshot lacks went to Apigee, and failed
