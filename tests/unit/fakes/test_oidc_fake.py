"""FakeOidc: discovery, JWKS, minted tokens that PyJWT verifies, rotation and fault knobs, mock and loopback."""

from __future__ import annotations

import asyncio

import httpx
import jwt
import pytest

from tests.fakes.oidc import FakeOidc
from tests.support.clock import FakeClock

DISCOVERY = "/issuer/.well-known/openid-configuration"


@pytest.fixture(scope="module")
def fake():
    return FakeOidc()


def client(fake: FakeOidc) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.transport(), base_url=fake.origin)


def verify(fake: FakeOidc, token: str, jwks: dict | None = None) -> dict:
    """Verify as a relying party would: the key by kid from the JWKS, its alg pinned by the JWK."""
    key = jwt.PyJWKSet.from_dict(jwks or fake.jwks)[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key, algorithms=[key.algorithm_name], audience=fake.audience, issuer=fake.issuer)


async def test_discovery_names_the_issuer_and_the_jwks():
    fake = FakeOidc()
    async with client(fake) as http:
        document = (await http.get(DISCOVERY)).json()
        jwks = (await http.get("/jwks")).json()
    assert document["issuer"] == "https://oidc.test/issuer" == fake.issuer
    assert document["jwks_uri"] == "https://oidc.test/jwks" == fake.jwks_uri
    assert jwks == fake.jwks
    assert [(k["kid"], k["kty"], k["alg"], k["use"]) for k in jwks["keys"]] == [
        ("ec-1", "EC", "ES256", "sig"),
        ("rsa-1", "RSA", "RS256", "sig"),
    ]
    assert all("d" not in k for k in jwks["keys"])  # public halves only
    assert fake.calls == {"discovery": 1, "jwks": 1}


async def test_unknown_path_and_wrong_method():
    fake = FakeOidc()
    async with client(fake) as http:
        assert (await http.get("/other")).status_code == 404
        assert (await http.post("/jwks")).status_code == 405


@pytest.mark.parametrize("alg", ["RS256", "RS512", "PS256", "ES256"])
def test_minted_tokens_verify_against_the_jwks(alg):
    fake = FakeOidc(clock=FakeClock().now)
    token = fake.mint({"email": "a@example.com"}, alg=alg)
    header = jwt.get_unverified_header(token)
    assert header["kid"] == ("ec-1" if alg == "ES256" else "rsa-1") and header["alg"] == alg
    key = jwt.PyJWKSet.from_dict(fake.jwks)[header["kid"]]
    if alg not in ("RS256", "ES256"):  # the JWK pins RS256, so only its raw key verifies another RSA alg
        with pytest.raises(jwt.InvalidAlgorithmError):
            jwt.decode(token, key, algorithms=[alg], audience="authz-test", leeway=10**10)
    claims = jwt.decode(
        token, key.key, algorithms=[alg], audience="authz-test", issuer=fake.issuer, leeway=10**10
    )
    assert claims == {
        "iss": "https://oidc.test/issuer",
        "aud": "authz-test",
        "sub": "user-1",
        "iat": 1_800_000_000,
        "exp": 1_800_000_300,
        "email": "a@example.com",
    }


def test_mint_overrides_claims_lifetime_and_headers(fake):
    token = fake.mint(
        {"aud": ["x", "y"], "sub": "s"}, lifetime=60, headers={"jku": "https://evil.test/jwks", "typ": None}
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["aud"], claims["sub"], claims["exp"] - claims["iat"]) == (["x", "y"], "s", 60)
    assert jwt.get_unverified_header(token) == {
        "alg": "RS256",
        "kid": "rsa-1",
        "jku": "https://evil.test/jwks",
    }
    assert "kid" not in jwt.get_unverified_header(fake.mint({}, headers={"kid": None}))


def test_an_unknown_kid_is_only_a_header(fake):
    token = fake.mint({}, kid="random-kid")
    assert jwt.get_unverified_header(token)["kid"] == "random-kid"
    key = jwt.PyJWKSet.from_dict(fake.jwks)["rsa-1"]  # signed by the current RSA key all the same
    assert jwt.decode(token, key, algorithms=["RS256"], audience=fake.audience)["sub"] == "user-1"


def test_rotate_publishes_a_new_key_and_retire_removes_the_old():
    fake = FakeOidc()
    old_token = fake.mint({})
    new = fake.rotate()
    assert new == "rsa-2" == fake.rsa_kid
    assert [k["kid"] for k in fake.jwks["keys"]] == ["ec-1", "rsa-1", "rsa-2"]
    new_token = fake.mint({})
    assert jwt.get_unverified_header(new_token)["kid"] == "rsa-2"
    assert verify(fake, old_token)["sub"] == verify(fake, new_token)["sub"] == "user-1"
    fake.retire("rsa-1")
    assert [k["kid"] for k in fake.jwks["keys"]] == ["ec-1", "rsa-2"]
    with pytest.raises(KeyError):
        verify(fake, old_token)
    retired = fake.mint({}, kid="rsa-1")  # still signable, to test a removed key
    key = jwt.PyJWKSet.from_dict(fake.jwks)["rsa-2"]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(retired, key, algorithms=["RS256"], audience=fake.audience)


async def test_fault_knobs_apply_once_each_then_normal_answers_resume():
    fake = FakeOidc()
    fake.fail_next("jwks", 503)
    fake.fail_next("jwks", 302, headers={"Location": "https://elsewhere.test/jwks"})
    fake.malformed_next("jwks", b"<html>hi</html>", content_type="text/html")
    fake.drop_next("discovery")
    async with client(fake) as http:
        assert (await http.get("/jwks")).status_code == 503
        moved = await http.get("/jwks")
        assert (moved.status_code, moved.headers["location"]) == (302, "https://elsewhere.test/jwks")
        html = await http.get("/jwks")
        assert (html.text, html.headers["content-type"]) == ("<html>hi</html>", "text/html")
        assert (await http.get("/jwks")).json() == fake.jwks
        with pytest.raises(httpx.ConnectError):
            await http.get(DISCOVERY)
        assert (await http.get(DISCOVERY)).status_code == 200
    assert fake.calls == {"jwks": 4, "discovery": 2}


async def test_chunked_answers_have_no_content_length_and_count_what_was_read():
    fake = FakeOidc()
    fake.malformed_next("jwks", b"x" * 100_000, chunked=True)
    async with client(fake) as http, http.stream("GET", "/jwks") as response:
        assert "content-length" not in response.headers
        async for _ in response.aiter_raw():
            break
    assert fake.sent_bytes["jwks"] == 16 * 1024  # the client stopped after one chunk


async def test_discovery_overrides_and_last_headers():
    fake = FakeOidc()
    fake.discovery_overrides["issuer"] = fake.issuer + "/"
    async with client(fake) as http:
        document = (await http.get(DISCOVERY, headers={"X-Probe": "1"})).json()
    assert document["issuer"] == "https://oidc.test/issuer/"
    assert fake.last_headers["discovery"]["x-probe"] == "1"


def test_knobs_refuse_unknown_endpoints_and_counts():
    fake = FakeOidc()
    with pytest.raises(ValueError, match="unknown endpoint"):
        fake.fail_next("token", 500)
    with pytest.raises(ValueError, match="count"):
        fake.drop_next("jwks", 0)


async def test_delay_holds_the_answer_until_cleared():
    fake = FakeOidc()
    fake.set_delay("jwks", 60)
    async with client(fake) as http:
        pending = asyncio.create_task(http.get("/jwks"))
        while fake.calls["jwks"] == 0:
            await asyncio.sleep(0)
        assert not pending.done()
        pending.cancel()
        fake.set_delay("jwks", 0)
        assert (await http.get("/jwks")).status_code == 200


async def test_served_on_loopback_with_the_bound_address_as_issuer():
    fake = FakeOidc(issuer_path="/realms/corp")
    async with await fake.serve() as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.issuer == fake.issuer == server.base_url + "/realms/corp"
        token = fake.mint({})  # minted after serving: carries the served issuer
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            document = (await http.get("/realms/corp/.well-known/openid-configuration")).json()
            assert (document["issuer"], document["jwks_uri"]) == (server.issuer, server.base_url + "/jwks")
            jwks = (await http.get("/jwks")).json()
            fake.drop_next("jwks")
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/jwks")
    assert verify(fake, token, jwks)["iss"] == server.issuer


async def test_serve_refuses_a_non_loopback_address():
    with pytest.raises(ValueError, match="loopback"):
        await FakeOidc().serve("0.0.0.0")
