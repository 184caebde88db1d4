"""Bearer tokens validated by the service itself: a FakeOidc issuer on loopback, a standalone catalog, and
Apigee's remote-token tokens in Apigee mode."""

import asyncio

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service
from authz.config import load_config
from authz.server import codec
from tests.fakes.apigee import FakeApigee
from tests.fakes.oidc import FakeOidc
from tests.support.apigee_config import apigee_config_yaml, write_policy_secret
from tests.support.catalogs import ORDERS_KEY, catalog_yaml, config_yaml
from tests.support.check_requests import check_request, outcome

pytestmark = pytest.mark.integration

AUDIENCE = "https://orders.example.run.app"


@pytest.fixture
async def oidc():
    fake = FakeOidc(audience=AUDIENCE)
    server = await fake.serve()
    yield fake
    await server.close()


def provider_yaml(issuer, extra=""):
    return f"""  jwt_providers:
    - name: corp
      issuer: {issuer}
      audiences: ["{AUDIENCE}"]
      products: [orders]
      claims: {{client_id: azp, application: sub}}
{extra}"""


@pytest.fixture
async def start(tmp_path):
    services = []

    async def start_service(config_text):
        config = tmp_path / f"config{len(services)}.yaml"
        config.write_text(config_text)
        service = Service(load_config(config, policy_secret_dir=str(tmp_path / "policy-secret")))
        services.append(service)
        await service.start()
        return service

    yield start_service
    for service in services:
        await service.stop()


async def standalone(start, tmp_path, oidc):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml())
    return await start(config_yaml(str(catalog), extra_auth=provider_yaml(oidc.issuer)))


def bearer(token, **kwargs):
    return check_request(headers={"authorization": f"Bearer {token}"}, **kwargs)


async def check(service, req):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=5)


def verifications(service, result):
    labels = {"org": "org", "provider": "corp", "result": result}
    return service.metrics.registry.get_sample_value("jwt_verifications_total", labels) or 0


async def test_a_valid_token_grants_the_providers_products(start, tmp_path, oidc):
    service = await standalone(start, tmp_path, oidc)
    token = oidc.mint({"azp": "client-7", "sub": "svc@example.iam"})
    allowed = await check(service, bearer(token))
    assert outcome(allowed) == (200, "")
    metadata = codec.metadata_struct(allowed)
    assert (metadata["x-apigee-clientid"], metadata["x-apigee-application"]) == (
        "client-7",
        "svc@example.iam",
    )
    assert outcome(await check(service, bearer(token, method="DELETE"))) == (403, "not_authorized")
    es = oidc.mint({"azp": "c"}, alg="ES256")
    assert outcome(await check(service, bearer(es))) == (200, "")


@pytest.mark.parametrize(
    "token_of",
    [
        lambda f: f.mint({}, lifetime=-120),  # expired beyond the 60 s skew
        lambda f: f.mint({"aud": "https://other.example"}),
        lambda f: f.mint({"iss": f.issuer + "/"}),
        lambda f: __import__("jwt").encode(
            {"iss": f.issuer, "aud": AUDIENCE, "exp": 4e9}, None, algorithm="none"
        ),
        lambda f: "not.a.token",
    ],
    ids=["expired", "audience", "issuer", "alg-none-header", "garbage"],
)
async def test_bad_tokens_get_401_with_a_bearer_challenge(start, tmp_path, oidc, token_of):
    service = await standalone(start, tmp_path, oidc)
    denied = await check(service, bearer(token_of(oidc), key=ORDERS_KEY))  # a valid key does not save it
    assert outcome(denied) == (401, "invalid_token")
    challenge = {h.header.key: h.header.value for h in denied.denied_response.headers}["www-authenticate"]
    assert challenge == 'Bearer error="invalid_token"'


async def test_a_thousand_checks_verify_the_token_once(start, tmp_path, oidc):
    service = await standalone(start, tmp_path, oidc)
    token = oidc.mint({"azp": "c"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        replies = await asyncio.gather(
            *(stub.Check(bearer(token, path=f"/v1/orders/{i % 9}")) for i in range(1000))
        )
    assert {r.status.code for r in replies} == {0}
    assert verifications(service, "valid") == 1


async def test_keys_unobtainable_is_503_until_the_issuer_answers(start, tmp_path, oidc):
    oidc.fail_next("discovery", 503, count=1000)
    service = await standalone(start, tmp_path, oidc)
    token = oidc.mint({"azp": "c"})
    assert outcome(await check(service, bearer(token))) == (503, "token_unavailable")
    oidc.heal()  # the issuer is back
    await service.jwt.caches[0].refresh()
    assert outcome(await check(service, bearer(token))) == (200, "")


async def test_a_bad_key_next_to_a_valid_token_is_denied(start, tmp_path, oidc):
    service = await standalone(start, tmp_path, oidc)
    token = oidc.mint({"azp": "c"})
    assert outcome(await check(service, bearer(token, key="no-such-key"))) == (401, "unknown_key")
    assert outcome(await check(service, bearer(token, key=ORDERS_KEY))) == (200, "")


async def test_apigee_remote_token_tokens_carry_their_products(start, tmp_path):
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(policy_jwks=secret.jwks)
    fake.set_products(
        [{"name": "orders", "environments": ["test"], "scopes": ["read"],
          "operationGroup": {"operationConfigs": [{"apiSource": "orders-api",
                                                   "operations": [{"resource": "/v1/**"}]}]}}]
    )  # fmt: skip
    fake.add_key("client-key-1", app="token-app", developer_email="d@example.com", products=["orders"])
    async with await fake.serve() as server:
        service = await start(apigee_config_yaml(server.remote_service_url, str(tmp_path / "tmp")))
        import httpx

        async with httpx.AsyncClient() as http:
            form = {"grant_type": "client_credentials", "client_id": "client-key-1", "client_secret": "s"}
            token = (await http.post(f"{server.base_url}/remote-token/token", json=form)).json()[
                "access_token"
            ]
        # The fake's remote-token tokens carry an empty scope: a product with scopes refuses them.
        assert outcome(await check(service, bearer(token))) == (403, "not_authorized")
        fake.set_products(
            [{"name": "orders", "environments": ["test"],
              "operationGroup": {"operationConfigs": [{"apiSource": "orders-api",
                                                       "operations": [{"resource": "/v1/**"}]}]}}]
        )  # fmt: skip
        await service.apigee.catalog.refresh()
        allowed = await check(service, bearer(token))
        assert outcome(allowed) == (200, "")
        assert codec.metadata_struct(allowed)["x-apigee-application"] == "token-app"
        assert fake.calls["certs"] == 1  # one key cache for verifyApiKey tokens and bearer tokens
