"""The key index in a running service (Apigee X mode, ``tenant.key_sync_interval`` set) against the stateful
FakeApigee on loopback HTTP: the management API lists apps and developers with a Google token from the
analytics service account; ``/verifyApiKey`` stays the fallback for keys the index does not have.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service
from authz.config import load_config
from authz.server import codec
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import (
    apigee_config_yaml,
    new_service_account,
    write_analytics_secret,
    write_policy_secret,
)
from tests.support.check_requests import check_request, outcome

pytestmark = pytest.mark.integration

DEV = "dev@example.com"
PRODUCTS = [
    {"name": name, "environments": ["test"], "operationGroup": {"operationConfigType": "remoteservice",
     "operationConfigs": [{"apiSource": f"{name}-api", "operations": [{"resource": "/**"}]}]}}
    for name in ("orders", "billing")
]  # fmt: skip
DEADLINE = 10.0


def _state_catalogue() -> list[tuple[str, Callable[[FakeApigee, str], None]]]:
    """Each case arranges one key, in an app of its own, in one state."""

    def app(fake: FakeApigee, key: str, developer: str = DEV, **credential: Any) -> str:
        app_id = fake.add_app(f"app-{key}", developer)
        fake.add_credential(app_id, key, credential.pop("products", ["orders"]), **credential)
        return app_id

    def inactive_developer(fake: FakeApigee, key: str) -> None:
        fake.add_developer("gone@example.com", status="inactive")
        app(fake, key, "gone@example.com")

    now_ms = int(time.time() * 1000)
    return [
        ("approved", lambda fake, key: app(fake, key)),
        ("approved, two products", lambda fake, key: app(fake, key, products=["orders", "billing"])),
        ("credential revoked", lambda fake, key: app(fake, key, status="revoked")),
        ("app revoked", lambda fake, key: fake.set_app_status(app(fake, key), "revoked")),
        ("developer inactive", inactive_developer),
        ("expired", lambda fake, key: app(fake, key, expires_at_ms=now_ms - 60_000)),
        ("expires later", lambda fake, key: app(fake, key, expires_at_ms=now_ms + 3_600_000)),
        ("product revoked", lambda fake, key: app(fake, key, products={"orders": "revoked"})),
        ("product pending", lambda fake, key: app(fake, key, products={"orders": "pending"})),
        ("one of two revoked", lambda fake, key: app(fake, key, products={"orders": "approved",
                                                                           "billing": "revoked"})),
        ("no products", lambda fake, key: app(fake, key, products=[])),
        ("unknown", lambda fake, key: None),
    ]  # fmt: skip


CASES = _state_catalogue()


class Stack:
    def __init__(self, fake: FakeApigee, server: Any, tmp_path: Any, secret: Any, analytics_dir: str) -> None:
        self.fake, self.server, self.tmp_path = fake, server, tmp_path
        self._secret, self._analytics_dir = secret, analytics_dir
        self.services: list[Service] = []

    async def start(self, key_sync: str | None = "1h", temp_dir: str = "tmp", auth: str = "") -> Service:
        tenant = f"  management_api: {self.server.management_url}"
        if key_sync is not None:
            tenant += f"\n  key_sync_interval: {key_sync}"
        config = self.tmp_path / f"config{len(self.services)}.yaml"
        config.write_text(
            apigee_config_yaml(
                self.server.remote_service_url,
                str(self.tmp_path / temp_dir),
                extra_tenant=tenant,
                extra_auth=auth,
            )
        )
        service = Service(load_config(config, str(self._secret.directory), self._analytics_dir))
        self.services.append(service)
        await service.start()
        return service


@pytest.fixture
async def stack(tmp_path):
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(policy_jwks=secret.jwks)
    fake.set_products(PRODUCTS)
    async with await fake.serve("127.0.0.1", 0) as server:
        account = new_service_account(f"{server.base_url}/token")
        fake.add_service_account(account.client_email, account.public_key_pem)
        analytics_dir = str(write_analytics_secret(tmp_path / "analytics-secret", account).parent)
        stack = Stack(fake, server, tmp_path, secret, analytics_dir)
        yield stack
        for service in stack.services:
            await service.stop()


async def check(service: Service, req: Any) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=5)


async def readyz(service: Service) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        response = await http.get("/readyz")
        assert response.status_code == 200
        return response.json()


def sample(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, {"org": "org", **labels}) or 0.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for a background loop to get somewhere."""
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def synced(service: Service, count: int = 1) -> None:
    await until(lambda: sample(service, "key_syncs_total", result="ok") >= count, f"{count} key syncs")


def answer(response: Any) -> tuple[int, dict[str, Any] | None]:
    """The HTTP status and, for an allow, the dynamic metadata the access logger and upstream see."""
    status, _ = outcome(response)
    return status, (codec.metadata_struct(response) if status == 200 else None)


async def test_index_decisions_match_verify_api_key_for_every_state(stack):
    for i, (_, arrange) in enumerate(CASES):
        arrange(stack.fake, f"key-{i:02d}")
    indexed = await stack.start()
    await synced(indexed)
    verifying = await stack.start(key_sync=None, temp_dir="tmp-verify")
    calls_before = stack.fake.calls["verifyApiKey"]
    for i, (state, _) in enumerate(CASES):
        for api in ("orders-api", "billing-api"):
            req = check_request(key=f"key-{i:02d}", api=api, path="/v1/x")
            assert answer(await check(indexed, req)) == answer(await check(verifying, req)), (state, api)
    verify_calls = stack.fake.calls["verifyApiKey"] - calls_before
    # The verifying service asked once per key; the indexed one only for the key no listing has.
    assert verify_calls == len(CASES) + 1
    assert sample(indexed, "api_key_cache_lookups_total", result="index") == 2 * (len(CASES) - 1)


async def test_revoked_in_the_index_is_a_401_at_once_without_a_call(stack):
    stack.fake.add_key("good", app="orders-app", developer_email=DEV, products=["orders"])
    stack.fake.add_key("bad", app="orders-app", developer_email=DEV, products=["orders"])
    stack.fake.revoke_key("bad")
    service = await stack.start()
    await synced(service)
    assert (await readyz(service))["key_index_source"] == "apigee"
    assert outcome(await check(service, check_request(key="good"))) == (200, "")
    assert outcome(await check(service, check_request(key="bad"))) == (401, "revoked_key")
    assert stack.fake.calls["verifyApiKey"] == 0


async def test_a_key_revoked_in_apigee_stops_within_one_sync_interval(stack):
    stack.fake.add_key("good", app="orders-app", developer_email=DEV, products=["orders"])
    service = await stack.start(key_sync="1s")
    await synced(service)
    assert outcome(await check(service, check_request(key="good"))) == (200, "")
    stack.fake.revoke_key("good")
    revoked_at = time.monotonic()
    await synced(service, int(sample(service, "key_syncs_total", result="ok")) + 1)
    assert outcome(await check(service, check_request(key="good"))) == (401, "revoked_key")
    assert time.monotonic() - revoked_at < 1.1 + 1.0  # the interval (+10 % jitter) and the listing
    synced_at = sample(service, "key_index_synced_timestamp_seconds")
    assert synced_at >= time.time() - 2.2
    assert stack.fake.calls["verifyApiKey"] == 0


async def test_a_key_created_since_the_sync_falls_back_and_its_app_syncs_early(stack):
    stack.fake.add_key("old", app="orders-app", developer_email=DEV, products=["orders"])
    service = await stack.start()
    await synced(service)
    stack.fake.add_key("new", app="orders-app", developer_email=DEV, products=["orders"])
    assert outcome(await check(service, check_request(key="new"))) == (200, "")
    assert stack.fake.calls["verifyApiKey"] == 1
    key_sync = service.apigee.key_sync
    await until(lambda: key_sync.index.get(_digest("new")) is not None, "the early sync of the app")
    assert stack.fake.calls["app"] == 1
    assert outcome(await check(service, check_request(key="new"))) == (200, "")
    assert sample(service, "api_key_cache_lookups_total", result="index") >= 1
    assert stack.fake.calls["verifyApiKey"] == 1


async def test_a_burst_of_random_keys_costs_apigee_at_most_the_verify_rate(stack):
    stack.fake.add_key("good", app="orders-app", developer_email=DEV, products=["orders"])
    service = await stack.start(auth="  api_key_verify_rate: 5")
    await synced(service)
    started = time.monotonic()
    randoms, known = [], []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for batch in range(20):  # 500 random keys at a time, known keys among them
            keys = [f"random-{batch:02d}-{i:03d}" for i in range(500)]
            replies = await asyncio.gather(
                *(stub.Check(check_request(key=key), timeout=10) for key in keys),
                *(stub.Check(check_request(key="good"), timeout=10) for _ in range(10)),
            )
            randoms += replies[:500]
            known += replies[500:]
    elapsed = time.monotonic() - started
    assert {outcome(r) for r in randoms} == {(401, "unknown_key")}
    assert {outcome(r) for r in known} == {(200, "")}
    calls = stack.fake.calls["verifyApiKey"]
    assert calls <= 5 + 5 * elapsed  # the bucket: a burst of 5, then 5 a second
    shed = sample(service, "api_key_verifications_total", result="shed")
    assert shed + calls == 10_000


async def test_cold_start_with_apigee_down_serves_known_keys_from_the_snapshot(stack):
    stack.fake.add_key("good", app="orders-app", developer_email=DEV, products=["orders"])
    stack.fake.add_key("bad", app="orders-app", developer_email=DEV, products=["orders"])
    stack.fake.revoke_key("bad")
    first = await stack.start()
    await synced(first)
    assert outcome(await check(first, check_request(key="good"))) == (200, "")
    snapshot = stack.tmp_path / "tmp" / "keys" / "org.json"
    assert "good" not in snapshot.read_text().replace(_digest("good").hex(), "")

    # A restart on the same disk while the whole control plane is down: products and keys from snapshots.
    shutil.copytree(stack.tmp_path / "tmp", stack.tmp_path / "restarted")
    for endpoint in ("developers", "apps", "verifyApiKey", "products"):
        stack.fake.fail_next(endpoint, 503, count=1000)
    second = await stack.start(temp_dir="restarted")
    assert (await readyz(second))["key_index_source"] == "snapshot"
    assert outcome(await check(second, check_request(key="good"))) == (200, "")
    assert outcome(await check(second, check_request(key="bad"))) == (401, "revoked_key")
    await until(lambda: sample(second, "key_syncs_total", result="error") >= 1, "a failed sync")
    assert outcome(await check(second, check_request(key="good"))) == (200, "")  # the snapshot stays


def _digest(key: str) -> bytes:
    from authz.apigee.key_index import digest

    return digest(key)


async def test_legacy_edge_lists_with_basic_auth_over_rows_pages(tmp_path, monkeypatch):
    from authz.apigee import management

    monkeypatch.setattr(management, "EDGE_APPS_ROWS", 3)  # several pages from a handful of apps
    fake = FakeApigee(basic_auth=("key", "secret"), management_basic=("ops@acme.example", "s3cret"))
    fake.set_products(PRODUCTS)
    fake.apps_rows_max = 3
    for i in range(7):
        fake.add_key(f"edge-{i}", app=f"app-{i}", developer_email=DEV, products=["orders"])
    fake.revoke_key("edge-6")
    async with await fake.serve("127.0.0.1", 0) as server:
        tenant = (
            f"  internal_api: {server.internal_api_url}\n  key: key\n  secret: secret\n"
            f"  key_sync_interval: 1h\n  management_api: {server.management_url}\n"
            "  management_user: ops@acme.example\n  management_password: s3cret\n"
        )
        config = tmp_path / "config.yaml"
        config.write_text(
            apigee_config_yaml(server.remote_service_url, str(tmp_path / "tmp"), extra_tenant=tenant)
        )
        service = Service(load_config(config))
        await service.start()
        try:
            await synced(service)
            assert sample(service, "key_index_keys") == 7
            assert fake.calls["apps"] == 4  # 3, then 1 + 2 new, 1 + 2 new, 1 + 0: a short page ends it
            for i in range(6):
                assert outcome(await check(service, check_request(key=f"edge-{i}"))) == (200, "")
            assert outcome(await check(service, check_request(key="edge-6"))) == (401, "revoked_key")
            assert fake.calls["verifyApiKey"] == 0
        finally:
            await service.stop()
