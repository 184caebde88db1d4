"""ApigeeClient against the stateful fake of the remote-service API (as an httpx transport)."""

import httpx
import jwt
import pytest

from authz.apigee.client import ApigeeClient, tls_context
from authz.apigee.signer import BasicAuthorizer
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee

PRODUCTS = [
    {"name": "httpbin-product", "environments": ["test"], "apiResources": ["/headers"], "quota": "5",
     "quotaInterval": "1", "quotaTimeUnit": "minute",
     "attributes": [{"name": "apigee-remote-service-targets", "value": "httpbin.org"}]},
]  # fmt: skip


@pytest.fixture
def fake():
    fake = FakeApigee(basic_auth=("k", "s"))
    fake.set_products(PRODUCTS)
    fake.add_key("good-key", app="app", developer_email="d@example.com", products=["httpbin-product"])
    return fake


@pytest.fixture
async def client(fake):
    metrics = new_metrics()
    async with httpx.AsyncClient(transport=fake.transport(), timeout=2) as http:
        yield ApigeeClient(
            http, "http://apigee.test/remote-service/", BasicAuthorizer("k", "s"), metrics, "org", "test"
        )


async def test_products_with_etag_and_304(client, fake):
    first = await client.products()
    assert not first.not_modified
    assert [p["name"] for p in first.products] == ["httpbin-product"]
    assert first.products[0]["quota"] == "5"  # strings on the wire, parsed by the decision core
    assert first.etag
    again = await client.products(first.etag)
    assert again.not_modified and again.etag == first.etag
    assert fake.last_headers["products"]["if-none-match"] == first.etag
    assert fake.last_headers["products"]["authorization"].startswith("Basic ")


async def test_verify_api_key_good_and_bad(client, fake):
    good = await client.verify_api_key("good-key")
    claims = jwt.decode(good.token, options={"verify_signature": False})
    assert claims["api_product_list"] == ["httpbin-product"]
    assert claims["application_name"] == "app"
    assert (await client.verify_api_key("unknown")).token is None
    fake.revoke_key("good-key")
    assert (await client.verify_api_key("good-key")).token is None


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
async def test_retryable_statuses_are_unavailable_never_a_bad_key(client, fake, status):
    fake.fail_next("verifyApiKey", status)
    with pytest.raises(ApigeeUnavailable):
        await client.verify_api_key("good-key")
    fake.fail_next("products", status)
    with pytest.raises(ApigeeUnavailable):
        await client.products()


async def test_transport_errors_and_garbage_are_unavailable(client, fake):
    fake.drop_next("products")
    with pytest.raises(ApigeeUnavailable):
        await client.products()
    fake.malformed_next("products", b"<html>oops</html>", content_type="text/html")
    with pytest.raises(ApigeeUnavailable):
        await client.products()
    fake.malformed_next("products", b'{"apiProduct": {"name": "x"}}')
    with pytest.raises(ApigeeUnavailable):
        await client.products()
    fake.malformed_next("products", b'{"error": "maintenance"}')  # empty by error: not "no products"
    with pytest.raises(ApigeeUnavailable):
        await client.products()
    fake.malformed_next("products", b'{"apiProduct": []}')  # a real empty list is an answer
    assert (await client.products()).products == ()
    fake.malformed_next("verifyApiKey", b"{}")
    with pytest.raises(ApigeeUnavailable):
        await client.verify_api_key("good-key")


async def test_timeout_is_unavailable(fake):
    fake.set_delay("products", 0.5)  # MockTransport ignores timeouts: use the real loopback server
    async with await fake.serve() as server, httpx.AsyncClient(timeout=0.05) as http:
        client = ApigeeClient(
            http, server.remote_service_url, BasicAuthorizer("k", "s"), new_metrics(), "o", "e"
        )
        with pytest.raises(ApigeeUnavailable):
            await client.products()


async def test_bad_credentials_are_rejected_and_calls_are_timed(fake):
    metrics = new_metrics()
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        client = ApigeeClient(
            http, "http://apigee.test/remote-service", BasicAuthorizer("k", "wrong"), metrics, "o", "e"
        )
        with pytest.raises(ApigeeRejected) as info:
            await client.products()
    assert info.value.status == 401
    labels = {"org": "o", "env": "e", "api": "products", "code": "401", "method": "GET"}
    assert metrics.registry.get_sample_value("apigee_requests_seconds_count", labels) == 1.0


def test_tls_context_defaults_to_verification():
    assert tls_context("", "", "", False) is True
    insecure = tls_context("", "", "", True)
    assert insecure.check_hostname is False


CERTS = "http://apigee.test/remote-token/certs"


async def test_jwks_returns_the_fake_key_set(client, fake):
    body = await client.jwks(CERTS)
    assert body == fake.jwks
    assert body["keys"][0]["kid"] == fake.signing_kid
    assert "authorization" not in fake.last_headers["certs"]  # a public document: no credentials sent


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (500, b'{"error":"x"}', "application/json"),
        (429, b"{}", "application/json"),
        (302, b"", "text/plain"),  # redirects are not followed
        (200, b"<html>maintenance</html>", "text/html"),
        (200, b'[{"kty":"RSA"}]', "application/json"),
        (200, b'"keys"', "application/json"),
        (200, b'{"keys":[], "pad":"' + b"x" * 256 * 1024 + b'"}', "application/json"),
    ],
    ids=["500", "429", "302", "html", "array", "string", "over-256KiB"],
)
async def test_jwks_unusable_answers_are_unavailable(client, fake, status, body, content_type):
    fake.malformed_next("certs", body, status=status, content_type=content_type)
    with pytest.raises(ApigeeUnavailable):
        await client.jwks(CERTS)


async def test_jwks_4xx_is_rejected_and_drop_is_unavailable(client, fake):
    fake.fail_next("certs", 404)
    with pytest.raises(ApigeeRejected) as info:
        await client.jwks(CERTS)
    assert info.value.status == 404
    fake.drop_next("certs")
    with pytest.raises(ApigeeUnavailable):
        await client.jwks(CERTS)


def _response(value):
    import httpx

    return httpx.Response(503, headers={"Retry-After": value} if value is not None else {})


def test_retry_after_forms():
    import email.utils
    import time

    from authz.apigee.client import retry_after

    assert retry_after(_response("12")) == 12.0
    assert retry_after(_response("100000")) == 600.0
    assert retry_after(_response(None)) is None
    assert retry_after(_response("soon")) is None
    assert retry_after(_response("Wed, 21 Oct 2015 07:28:00")) is None  # not a valid HTTP date
    assert retry_after(_response("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # in the past
    future = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 < retry_after(_response(future)) <= 60


async def test_new_http_client_applies_the_tenant_timeout():
    from authz.apigee.client import new_http_client
    from authz.config import TenantConfig, TenantTLS

    tenant = TenantConfig(client_timeout=2.5, tls=TenantTLS(allow_unverified_ssl_cert=True))
    async with new_http_client(tenant) as http:
        assert http.timeout == httpx.Timeout(2.5)
        assert not http.follow_redirects  # a redirect would carry our credentials elsewhere
