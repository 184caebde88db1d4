"""JwksSource: OIDC discovery and the JWKS GET, against FakeOidc (MockTransport, and once over loopback)."""

from __future__ import annotations

import json

import httpx
import pytest

from authz.jwt.fetch import MAX_DISCOVERY_BYTES, MAX_JWKS_BYTES, FetchError, JwksSource, usable_jwks_uri
from authz.metrics import new_metrics
from tests.fakes.oidc import CHUNK, FakeOidc

ISSUER = "https://oidc.test/issuer"


@pytest.fixture
def fake():
    return FakeOidc()


@pytest.fixture
async def http(fake):
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        yield http


def source(http, issuer=ISSUER, jwks_uri=None):
    return JwksSource(http, issuer, jwks_uri, metrics=new_metrics(), org="org", provider="corp")


async def failure(call) -> FetchError:
    with pytest.raises(FetchError) as info:
        await call()
    assert info.value.code == "fetch_error"
    assert len(str(info.value)) < 100  # short, never a body
    return info.value


async def test_discovery_then_jwks_and_the_uri_is_kept(fake, http):
    jwks = source(http)
    assert await jwks() == fake.jwks
    assert await jwks() == fake.jwks
    assert fake.calls == {"discovery": 1, "jwks": 2}  # discovered once


async def test_a_configured_jwks_uri_skips_discovery(fake, http):
    assert await source(http, jwks_uri="https://oidc.test/jwks")() == fake.jwks
    assert fake.calls == {"jwks": 1}


async def test_no_credentials_are_sent_even_if_the_client_has_them(fake):
    async with httpx.AsyncClient(
        transport=fake.transport(),
        headers={"Authorization": "Bearer apigee-secret", "Cookie": "session=1"},
        auth=httpx.BasicAuth("user", "password"),
        cookies={"jar": "2"},
    ) as http:
        await source(http)()
    for endpoint in ("discovery", "jwks"):
        headers = fake.last_headers[endpoint]
        assert not {"authorization", "cookie", "proxy-authorization"} & set(headers), headers
        assert headers["accept"] == "application/json"


@pytest.mark.parametrize(
    ("configured", "served"),
    [
        (ISSUER, ISSUER + "/"),  # a trailing slash is another issuer
        (ISSUER + "/", ISSUER),  # the same discovery URL, but not the same issuer
        (ISSUER, "https://OIDC.test/issuer"),  # no case folding
        (ISSUER, "https://evil.test/issuer"),
        (ISSUER, None),
        (ISSUER, ["https://oidc.test/issuer"]),
    ],
    ids=["served-slash", "configured-slash", "case", "other-host", "null", "list"],
)
async def test_discovery_refuses_another_issuer(fake, http, configured, served):
    fake.discovery_overrides["issuer"] = served
    error = await failure(source(http, issuer=configured))
    assert "issuer" in str(error)
    assert fake.calls == {"discovery": 1}  # no JWKS fetched from an untrusted document


@pytest.mark.parametrize(
    "uri",
    [
        "http://oidc.test/jwks",
        "http://10.0.0.1/jwks",
        "ftp://oidc.test/jwks",
        "/jwks",
        "https:///jwks",
        "https://user:pw@oidc.test/jwks",
        "https://oidc.test:99999/jwks",
        "https://oidc.test/" + "x" * 3000,
        None,
        7,
    ],
)
async def test_discovery_refuses_a_jwks_uri_that_is_not_https(fake, http, uri):
    fake.discovery_overrides["jwks_uri"] = uri
    assert "jwks_uri" in str(await failure(source(http)))
    assert fake.calls == {"discovery": 1}


@pytest.mark.parametrize(
    ("uri", "usable"),
    [
        ("https://oidc.test/jwks", True),
        ("https://oidc.test:8443/jwks", True),
        ("http://127.0.0.1:8080/jwks", True),
        ("http://127.1.2.3/jwks", True),
        ("http://[::1]:8080/jwks", True),
        ("http://localhost/jwks", True),
        ("http://LOCALHOST/jwks", True),
        ("http://127.0.0.1.evil.test/jwks", False),
        ("http://[::2]/jwks", False),
        ("http://oidc.test/jwks", False),
    ],
)
def test_usable_jwks_uri(uri, usable):
    assert usable_jwks_uri(uri) is usable


async def test_discovery_without_a_jwks_uri_is_refused(fake, http):
    fake.discovery_overrides["jwks_uri"] = None
    await failure(source(http))


@pytest.mark.parametrize("endpoint", ["discovery", "jwks"])
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (lambda f, e: f.fail_next(e, 500), "HTTP 500"),
        (lambda f, e: f.fail_next(e, 404), "HTTP 404"),
        (lambda f, e: f.fail_next(e, 204), "HTTP 204"),
        (lambda f, e: f.fail_next(e, 302, headers={"Location": "https://oidc.test/jwks"}), "HTTP 302"),
        (lambda f, e: f.fail_next(e, 307, headers={"Location": "/jwks"}), "HTTP 307"),
        (lambda f, e: f.drop_next(e), "Connect"),
        (lambda f, e: f.malformed_next(e, b"<html>hi</html>", content_type="text/html"), "not JSON"),
        (lambda f, e: f.malformed_next(e, b"[]"), "not a JSON object"),
        (lambda f, e: f.malformed_next(e, b'"keys"'), "not a JSON object"),
        (lambda f, e: f.malformed_next(e, b"\xff\xfe{}"), "not JSON"),
        (lambda f, e: f.malformed_next(e, b"[" * 60_000), "not JSON"),  # nesting past the recursion limit
        (lambda f, e: f.malformed_next(e, b'{"keys": [], "x": NaN'), "not JSON"),
    ],
    ids=["500", "404", "204", "302", "307", "drop", "html", "array", "string", "utf8", "deep", "truncated"],
)
async def test_failures_raise_a_short_fetch_error(fake, http, endpoint, fault, message):
    fault(fake, endpoint)
    error = await failure(source(http))
    assert message in str(error)
    assert fake.calls[endpoint] == 1  # a redirect is not followed


async def test_redirects_are_not_followed_even_when_the_client_would(fake):
    fake.fail_next("jwks", 301, headers={"Location": "https://oidc.test/jwks"})
    async with httpx.AsyncClient(transport=fake.transport(), follow_redirects=True) as http:
        await failure(source(http, jwks_uri="https://oidc.test/jwks"))
    assert fake.calls["jwks"] == 1


@pytest.mark.parametrize(("endpoint", "cap"), [("discovery", MAX_DISCOVERY_BYTES), ("jwks", MAX_JWKS_BYTES)])
async def test_a_body_over_the_cap_is_refused_by_its_content_length(fake, http, endpoint, cap):
    fake.malformed_next(endpoint, b'{"x": "' + b"x" * cap + b'"}')
    assert "Content-Length over" in str(await failure(source(http)))


@pytest.mark.parametrize(("endpoint", "cap"), [("discovery", MAX_DISCOVERY_BYTES), ("jwks", MAX_JWKS_BYTES)])
async def test_a_streamed_body_is_cut_off_past_the_cap(fake, http, endpoint, cap):
    fake.malformed_next(endpoint, b" " * 10 * 1024 * 1024, chunked=True)  # 10 MB without Content-Length
    assert "body over" in str(await failure(source(http)))
    assert cap < fake.sent_bytes[endpoint] <= cap + CHUNK  # reading stopped at the cap


async def test_a_streamed_body_within_the_cap_is_read(fake, http):
    fake.malformed_next("jwks", json.dumps(fake.jwks).encode(), chunked=True)
    assert await source(http, jwks_uri="https://oidc.test/jwks")() == fake.jwks


async def test_a_failed_jwks_fetch_makes_the_next_call_discover_again(fake, http):
    jwks = source(http)
    await jwks()
    fake.fail_next("jwks", 503)
    await failure(jwks)
    assert fake.calls == {"discovery": 1, "jwks": 2}
    fake.discovery_overrides["jwks_uri"] = "https://oidc.test/jwks?v=2"  # the issuer moved its keys
    assert await jwks() == fake.jwks
    assert fake.calls == {"discovery": 2, "jwks": 3}
    await jwks()
    assert fake.calls == {"discovery": 2, "jwks": 4}


async def test_a_failed_discovery_is_retried_on_the_next_call(fake, http):
    jwks = source(http)
    fake.fail_next("discovery", 500)
    await failure(jwks)
    assert await jwks() == fake.jwks
    assert fake.calls == {"discovery": 2, "jwks": 1}


async def test_a_configured_uri_is_kept_after_a_failure(fake, http):
    jwks = source(http, jwks_uri="https://oidc.test/jwks")
    fake.drop_next("jwks")
    await failure(jwks)
    assert await jwks() == fake.jwks
    assert fake.calls == {"jwks": 2}


async def test_an_invalid_url_is_a_fetch_error(http):
    assert "InvalidURL" in str(await failure(source(http, jwks_uri="https://oidc.test:port/jwks")))


async def test_discovery_over_loopback_allows_http(fake):
    async with await fake.serve() as server, httpx.AsyncClient() as http:
        jwks = JwksSource(http, server.issuer, metrics=new_metrics(), org="org", provider="corp")
        assert await jwks() == fake.jwks
        fake.fail_next("jwks", 302, headers={"Location": server.base_url + "/jwks"})
        assert "HTTP 302" in str(await failure(jwks))
    assert fake.calls == {"discovery": 1, "jwks": 2}
