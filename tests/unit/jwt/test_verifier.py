"""BearerTokens: finding the token, choosing the provider, caching answers (FakeOidc over an httpx transport)."""

import asyncio

import httpx
import pytest

from authz.config_providers import ClaimNames, JwtProvider
from authz.decision.model import AuthContext, DenyReason
from authz.jwt import verifier as verifier_module
from authz.jwt.fetch import JwksSource
from authz.jwt.jwks import JwksCache
from authz.jwt.validate import Rules
from authz.jwt.verifier import BearerTokens, Provider, Verified, auth_from_claims
from authz.metrics import new_metrics
from tests.fakes.oidc import FakeOidc
from tests.support.clock import FakeClock

AUD = "orders"


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def oidc(clock):
    return FakeOidc(clock=clock.now, audience=AUD)


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def tokens(oidc, clock, metrics):
    async with httpx.AsyncClient(transport=oidc.transport()) as http:
        config = JwtProvider(name="corp", issuer=oidc.issuer, audiences=(AUD,), products=("orders",))
        source = JwksSource(http, oidc.issuer, metrics=metrics, org="org", provider="corp")
        keys = JwksCache(source, "org", "corp", metrics, clock)
        rules = Rules(
            config.issuer, frozenset(config.audiences), frozenset(config.algorithms), config.clock_skew
        )
        yield BearerTokens([Provider(config, rules, keys)], "org", metrics, clock)
        await keys.close()


def results(metrics, result):
    labels = {"org": "org", "provider": "corp", "result": result}
    return metrics.registry.get_sample_value("jwt_verifications_total", labels) or 0


@pytest.mark.parametrize(
    ("headers", "found"),
    [
        ({"authorization": "Bearer abc"}, "abc"),
        ({"authorization": "bearer  abc "}, "abc"),
        ({"authorization": "Basic abc"}, None),
        ({"authorization": "Bearer "}, None),
        ({"x-other": "Bearer abc"}, None),
    ],
)
def test_find(tokens, headers, found):
    assert tokens.headers == ("authorization",)
    assert tokens.find(headers) == found


async def test_a_valid_token_is_verified_once_then_served_until_it_expires(tokens, oidc, clock, metrics):
    token = oidc.mint({"client_id": "c1", "application_name": "app"}, lifetime=120)
    assert tokens.lookup(token) is None
    verified = await tokens.verify(token)
    assert isinstance(verified, Verified)
    assert verified.auth == AuthContext(
        client_id="c1", app_name="app", developer_email="", products=("orders",)
    )
    assert verified.valid_until == clock.now() + 120 + 60  # exp plus the clock skew
    assert tokens.lookup(token) is verified
    clock.advance(180)
    assert tokens.lookup(token) is None  # expired: verified again (and rejected) on the next call
    assert await tokens.verify(token) is DenyReason.INVALID_TOKEN
    assert (results(metrics, "valid"), results(metrics, "expired")) == (1, 1)


async def test_concurrent_verifications_of_one_token_share_one(tokens, oidc, metrics):
    token = oidc.mint({})
    answers = await asyncio.gather(*(tokens.verify(token) for _ in range(50)))
    assert len({id(a) for a in answers}) == 1
    assert results(metrics, "valid") == 1


async def test_a_bad_token_is_remembered_for_ten_seconds(tokens, oidc, clock, metrics):
    token = oidc.mint({"aud": "other"})
    assert await tokens.verify(token) is DenyReason.INVALID_TOKEN
    assert tokens.lookup(token) is DenyReason.INVALID_TOKEN
    clock.advance(10)
    assert tokens.lookup(token) is None
    assert results(metrics, "wrong_audience") == 1


async def test_unknown_issuer_and_unknown_kid(tokens, oidc, metrics):
    assert await tokens.verify(oidc.mint({"iss": "https://elsewhere.example"})) is DenyReason.INVALID_TOKEN
    assert await tokens.verify(oidc.mint({}, kid="never-published")) is DenyReason.INVALID_TOKEN
    assert await tokens.verify("garbage") is DenyReason.INVALID_TOKEN
    assert (results(metrics, "valid"), results(metrics, "unknown_kid")) == (0, 1)
    labels = {"org": "org", "provider": "-", "result": "unknown_issuer"}
    assert metrics.registry.get_sample_value("jwt_verifications_total", labels) == 1


async def test_keys_never_loaded_is_unavailable_and_not_remembered(tokens, oidc, metrics):
    oidc.fail_next("discovery", 503)
    token = oidc.mint({})
    assert await tokens.verify(token) is DenyReason.TOKEN_UNAVAILABLE
    assert tokens.lookup(token) is None
    assert results(metrics, "keys_unavailable") == 1


async def test_the_caches_are_bounded(tokens, oidc, monkeypatch):
    monkeypatch.setattr(verifier_module, "MAX_ENTRIES", 3)
    minted = [oidc.mint({"n": i}) for i in range(5)]
    for token in minted:
        assert isinstance(await tokens.verify(token), Verified)
    assert tokens.lookup(minted[0]) is None and tokens.lookup(minted[1]) is None
    assert isinstance(tokens.lookup(minted[4]), Verified)


@pytest.mark.parametrize(
    ("claims", "auth"),
    [
        ({"sub": "s"}, AuthContext("s", "s", "", ("fixed",))),  # client_id falls back to sub
        ({"azp": "a", "sub": "s", "email": "e@x", "scope": "r w", "products": ["p"]},
         AuthContext("a", "s", "e@x", ("p",), scopes=("r", "w"))),
        ({"azp": "a", "products": 5}, AuthContext("a", "", "", ("fixed",))),
    ],
)  # fmt: skip
def test_claims_map_to_the_caller(claims, auth):
    names = ClaimNames(products="products", client_id="azp", application="sub", developer_email="email")
    provider = JwtProvider(name="p", issuer="https://i", audiences=("a",), products=("fixed",), claims=names)
    assert auth_from_claims(provider, claims) == auth


async def test_check_now_needs_no_await_once_the_keys_are_in_memory(tokens, oidc, metrics):
    first = oidc.mint({"n": 1})
    assert tokens.check_now(first) == (None, False)  # keys never fetched: the caller must await verify
    verified = await tokens.verify(first)
    assert tokens.check_now(first) == (verified, True)  # from the cache
    second = oidc.mint({"n": 2})
    found, cached = tokens.check_now(second)
    assert isinstance(found, Verified) and not cached
    assert tokens.check_now(oidc.mint({}, kid="rotated-later")) == (None, False)  # a fetch may help
    assert tokens.check_now(oidc.mint({"aud": "other"})) == (DenyReason.INVALID_TOKEN, False)
    assert results(metrics, "valid") == 2
