"""The service in Apigee mode, in process, against the stateful FakeApigee served on loopback HTTP.

The config is the provision-style one: Apigee X/hybrid (no internal_api) with the policy secret mounted in
a directory, so every call to the fake carries our internal JWT, which the fake verifies.
"""

import asyncio
import shutil
import time

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service
from authz.config import load_config
from authz.server import codec
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import apigee_config_yaml, write_policy_secret
from tests.support.check_requests import check_request, outcome

pytestmark = pytest.mark.integration

ORDERS_KEY, LEGACY_KEY, NOPRODUCT_KEY = "orders-key-31f0", "legacy-key-77aa", "lonely-key-0c1d"
PRODUCTS = [
    {"name": "orders", "displayName": "Orders", "approvalType": "auto", "environments": ["test", "prod"],
     "quota": "100000", "quotaInterval": "1", "quotaTimeUnit": "minute",  # quotas: test_quotas.py
     "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
         {"apiSource": "orders-api",
          "operations": [{"resource": "/v1/orders/**", "methods": ["GET", "POST"]}],
          "quota": {"limit": "null", "interval": "null", "timeUnit": "null"}}]}},
    {"name": "legacy", "environments": ["test"], "apiResources": ["/v1/**"], "quota": "null",
     "attributes": [{"name": "apigee-remote-service-targets", "value": "legacy-api, other"}]},
    {"name": "broken", "environments": ["test"], "apiResources": ["/a/**/b"]},
]  # fmt: skip


class Apigee:
    """A FakeApigee on a fixed loopback port that tests can take down and bring back."""

    def __init__(self, fake: FakeApigee) -> None:
        self.fake = fake
        self.port = 0
        self.server = None

    async def up(self) -> None:
        self.server = await self.fake.serve("127.0.0.1", self.port)
        self.port = int(self.server.base_url.rsplit(":", 1)[1])

    async def down(self) -> None:
        await self.server.close()

    @property
    def remote_service_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/remote-service"


@pytest.fixture
async def apigee(tmp_path):
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(policy_jwks=secret.jwks)
    fake.set_products(PRODUCTS)
    fake.add_key(ORDERS_KEY, app="orders-app", developer_email="dev@example.com", products=["orders"])
    fake.add_key(LEGACY_KEY, app="legacy-app", developer_email="dev@example.com", products=["legacy", "gone"])
    fake.add_key(NOPRODUCT_KEY, app="lonely", developer_email="dev@example.com", products=[])
    control = Apigee(fake)
    await control.up()
    yield control
    await control.down()


@pytest.fixture
async def start(apigee, tmp_path):
    """start(env="test", extra_auth="") -> a started Service in Apigee mode; stopped at teardown."""
    services = []

    async def start_service(env="test", extra_auth="", temp_dir="tmp"):
        config = tmp_path / f"config{len(services)}.yaml"
        config.write_text(
            apigee_config_yaml(
                apigee.remote_service_url, str(tmp_path / temp_dir), env=env, extra_auth=extra_auth
            )
        )
        service = Service(load_config(config, policy_secret_dir=str(tmp_path / "policy-secret")))
        services.append(service)
        await service.start()
        return service

    yield start_service
    for service in services:
        await service.stop()


def request(key=ORDERS_KEY, **kwargs):
    return check_request(key=key, **kwargs)


async def check(service, req):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=5)


async def readyz(service):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        response = await http.get("/readyz")
        return response.status_code, response.json()


async def eventually(probe, expected, deadline=5.0):
    """Poll ``probe()`` (a coroutine function) until it returns ``expected`` or the deadline passes."""
    end = time.monotonic() + deadline
    while (value := await probe()) != expected and time.monotonic() < end:
        await asyncio.sleep(0.05)
    return value


async def test_decisions_match_the_reference(start, apigee):
    service = await start()
    assert await readyz(service) == (
        200,
        {"catalog_loaded": True, "not_draining": True, "catalog_source": "apigee"},
    )
    allowed = await check(service, request())
    assert outcome(allowed) == (200, "")
    metadata = codec.metadata_struct(allowed)
    assert metadata["x-apigee-application"] == "orders-app"
    assert metadata["x-apigee-apiproducts"] == "orders"
    assert metadata["x-apigee-analytics-product"] == "orders"
    assert metadata["x-apigee-authorized"] == "true"
    assert "x-api-key" in allowed.ok_response.headers_to_remove
    assert outcome(await check(service, request(key=None))) == (401, "missing_credentials")
    assert outcome(await check(service, request(key="no-such-key"))) == (401, "unknown_key")
    assert outcome(await check(service, request(method="DELETE"))) == (403, "not_authorized")
    assert outcome(await check(service, request(path="/v2/orders"))) == (403, "not_authorized")
    assert outcome(await check(service, request(key=NOPRODUCT_KEY))) == (403, "not_authorized")
    assert outcome(await check(service, request(api="", key=ORDERS_KEY))) == (403, "missing_api")
    # Legacy binding: any method, the API among the targets (trimmed), the path in apiResources.
    assert outcome(
        await check(service, request(key=LEGACY_KEY, api="other", method="PATCH", path="/v1/x"))
    ) == (200, "")
    assert outcome(await check(service, request(key=LEGACY_KEY, path="/v1/orders/1"))) == (
        403,
        "not_authorized",
    )
    # The invalid product was skipped; the internal JWT was accepted by the fake on every call.
    assert set(service.apigee.catalog.current().products) == {"orders", "legacy"}
    assert apigee.fake.last_headers["products"]["authorization"].startswith("Bearer ")


async def test_one_verify_call_for_a_thousand_checks(start, apigee):
    service = await start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        replies = await asyncio.gather(
            *(stub.Check(request(path=f"/v1/orders/{i % 7}"), timeout=5) for i in range(1000))
        )
    assert {r.status.code for r in replies} == {0}
    assert apigee.fake.calls["verifyApiKey"] == 1


async def test_outage_keeps_cached_keys_and_answers_503_for_new_ones(start, apigee):
    service = await start()
    assert outcome(await check(service, request())) == (200, "")
    await apigee.down()
    assert outcome(await check(service, request())) == (200, "")
    assert outcome(await check(service, request(key=LEGACY_KEY, api="legacy-api"))) == (
        503,
        "auth_unavailable",
    )
    assert outcome(await check(service, request(key="random-key-1"))) == (503, "auth_unavailable")
    assert await service.apigee.catalog.refresh() is False  # the poller fails ...
    assert outcome(await check(service, request(path="/v1/orders/9"))) == (200, "")  # ... the catalog stays
    await apigee.up()


async def test_slow_verify_answers_503_then_the_answer_is_cached(start, apigee):
    service = await start()
    apigee.fake.set_delay("verifyApiKey", 1.2)  # longer than the 0.8 s Check waits
    assert outcome(await check(service, request())) == (503, "auth_unavailable")
    await service.apigee.keys.drain()  # the call went on and filled the cache
    apigee.fake.set_delay("verifyApiKey", 0)
    assert outcome(await check(service, request())) == (200, "")
    assert apigee.fake.calls["verifyApiKey"] == 1


async def test_cold_start_serves_the_snapshot_until_apigee_is_back(start, apigee, tmp_path):
    first = await start()
    assert outcome(await check(first, request())) == (200, "")
    await apigee.down()

    # A restart on the same disk: the new process finds the snapshot (the running one keeps its temp_dir).
    shutil.copytree(tmp_path / "tmp" / "products", tmp_path / "restarted" / "products")
    second = await start(temp_dir="restarted")
    assert await readyz(second) == (
        200,
        {"catalog_loaded": True, "not_draining": True, "catalog_source": "snapshot"},
    )
    gauge = second.metrics.registry.get_sample_value("catalog_from_snapshot", {"org": "org"})
    assert gauge == 1.0
    assert outcome(await check(second, request())) == (503, "auth_unavailable")  # keys still need Apigee

    await apigee.up()

    async def source():
        return (await readyz(second))[1]["catalog_source"]

    assert await eventually(source, "apigee") == "apigee"
    assert second.metrics.registry.get_sample_value("catalog_from_snapshot", {"org": "org"}) == 0.0
    await second.apigee.keys.drain()
    assert await eventually(lambda: _outcome_of(second, request()), (200, "")) == (200, "")


async def _outcome_of(service, req):
    return outcome(await check(service, req))


async def test_cold_start_without_snapshot_is_unready_until_products_arrive(start, apigee):
    await apigee.down()
    service = await start()
    status, body = await readyz(service)
    assert (status, body["catalog_source"]) == (503, "none")
    assert outcome(await check(service, request())) == (503, "not_ready")
    await apigee.up()
    assert (
        await eventually(
            lambda: readyz(service),
            (200, {"catalog_loaded": True, "not_draining": True, "catalog_source": "apigee"}),
        )
    )[0] == 200
    assert await eventually(lambda: _outcome_of(service, request()), (200, "")) == (200, "")


async def test_multi_tenant_takes_the_environment_from_the_route(start):
    service = await start(env="*")
    assert outcome(await check(service, request(ext={"apigee_environment": "prod"}))) == (200, "")
    legacy = request(key=LEGACY_KEY, api="legacy-api", path="/v1/x", ext={"apigee_environment": "prod"})
    assert outcome(await check(service, legacy)) == (403, "not_authorized")
    assert outcome(await check(service, request())) == (503, "missing_environment")


async def test_jwt_claims_from_envoy_and_api_key_claim(start, apigee):
    extra = "  jwt_provider_key: apigee\n  api_key_claim: apikey\n"
    service = await start(extra_auth=extra)
    claims = {
        "api_product_list": ["orders"],
        "client_id": "c1",
        "application_name": "jwt-app",
        "scope": "read",
    }
    allowed = await check(service, request(key=None, claims=claims))
    assert outcome(allowed) == (200, "")
    assert codec.metadata_struct(allowed)["x-apigee-application"] == "jwt-app"
    # A bad key next to a valid token: the token decides (Go adapter precedence).
    assert outcome(await check(service, request(key="no-such-key", claims=claims))) == (200, "")
    # The key inside the token is verified with Apigee and wins.
    via_claim = await check(
        service, request(key=None, claims={"apikey": LEGACY_KEY}, api="legacy-api", path="/v1/a")
    )
    assert codec.metadata_struct(via_claim)["x-apigee-application"] == "legacy-app"
    assert outcome(await check(service, request(key=None, claims={"client_id": "c"}))) == (
        403,
        "invalid_claims",
    )
    assert apigee.fake.calls["verifyApiKey"] == 2  # no-such-key and the claim's key


async def test_revoked_key_stops_within_one_refresh(start, apigee):
    apigee.fake.token_ttl = 1.0  # tokens go stale after a second; lookups then refresh in the background
    service = await start()
    assert outcome(await check(service, request())) == (200, "")
    apigee.fake.revoke_key(ORDERS_KEY)
    result = await eventually(lambda: _outcome_of(service, request()), (401, "unknown_key"), deadline=8.0)
    assert result == (401, "unknown_key")


async def test_a_policy_key_that_cannot_sign_fails_start(apigee, tmp_path):
    from authz.errors import ConfigError

    secret_dir = tmp_path / "policy-secret"
    (secret_dir / "remote-service.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(apigee_config_yaml(apigee.remote_service_url, str(tmp_path / "tmp")))
    with pytest.raises(ConfigError, match="policy_secret: remote-service.key cannot sign"):
        Service(load_config(config, policy_secret_dir=str(secret_dir)))
