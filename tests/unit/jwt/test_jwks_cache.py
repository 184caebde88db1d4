"""JwksCache: key filtering and pinning, last-good on failure, single-flight refetch, cooldowns, run loop.

The cache fetches from FakeOidc through JwksSource over MockTransport, with a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from authz.errors import ApigeeUnavailable
from authz.jwt.fetch import FetchError, JwksSource
from authz.jwt.jwks import RETRY_AFTER_FAILURE, JwksCache, JWKSError, parse_jwks
from authz.metrics import new_metrics
from tests.fakes.oidc import FakeOidc
from tests.support.clock import FakeClock

OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SMALL = rsa.generate_private_key(public_exponent=65537, key_size=1024)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(private: rsa.RSAPrivateKey, **fields: str) -> dict:
    return {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), **fields}


def ec_jwk(**fields: str) -> dict:
    return {**ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), **fields}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def fake(clock):
    return FakeOidc(clock=clock.now)


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def http(fake):
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        yield http


def cache(fetch, metrics, clock, **options) -> JwksCache:
    return JwksCache(fetch, "org", "corp", metrics, clock, **options)


@pytest.fixture
async def keys(fake, http, clock, metrics):
    source = JwksSource(http, fake.issuer, fake.jwks_uri, metrics=metrics, org="org", provider="corp")
    keys = cache(source, metrics, clock)
    yield keys
    await keys.close()


def refreshes(metrics, result):
    labels = {"org": "org", "provider": "corp", "result": result}
    return metrics.registry.get_sample_value("jwks_refreshes_total", labels) or 0


def failing(exc: Exception):
    async def fetch():
        raise exc

    return fetch


# -- parsing (J25) ------------------------------------------------------------------------------------


def test_parse_skips_unusable_keys_one_by_one():
    good = rsa_jwk(OTHER, kid="good", alg="RS256", use="sig")
    document = {
        "keys": [
            "not an object",
            {"kty": "oct", "kid": "hmac", "k": base64.urlsafe_b64encode(b"s" * 32).decode()},
            rsa_jwk(OTHER, kid="enc", use="enc"),
            rsa_jwk(OTHER, kid="hs", alg="HS256"),
            rsa_jwk(OTHER, kid="none", alg="none"),
            rsa_jwk(OTHER, kid="alg-list", alg=["RS256"]),
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            rsa_jwk(SMALL, kid="small"),
            RSAAlgorithm.to_jwk(OTHER, as_dict=True) | {"kid": "private"},
            ec_jwk(kid="ec-mismatch", alg="ES384"),
            rsa_jwk(OTHER, kid="rsa-as-ec", alg="ES256"),
            rsa_jwk(OTHER, kid=7),
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            good,
            rsa_jwk(OTHER, kid="good", alg="PS256"),  # a kid listed twice: the first stays
            rsa_jwk(OTHER, kid="no-alg"),
            rsa_jwk(OTHER, kid="ps", alg="PS384"),
            ec_jwk(kid="ec"),
        ]
    }
    found = {key.key_id: key.algorithm_name for key in parse_jwks(document)}
    assert found == {"good": "RS256", "no-alg": "RS256", "ps": "PS384", "ec": "ES256"}


@pytest.mark.parametrize(
    "document",
    [{}, {"keys": {}}, {"keys": []}, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, {"keys": [{}] * 101}],
    ids=["no-keys", "keys-object", "empty", "only-hmac", "too-many"],
)
def test_parse_refuses_a_set_without_usable_keys(document):
    with pytest.raises(JWKSError):
        parse_jwks(document)


# -- loading and keeping the last good set (J26, J27, S-07, F-08) ----------------------------------------


async def test_refresh_loads_the_keys_pinned_to_their_algorithms(keys, fake, metrics):
    assert keys.key("rsa-1") is None and not keys.loaded  # nothing before the first fetch
    assert await keys.refresh()
    assert keys.loaded
    assert keys.key("rsa-1").algorithm_name == "RS256"
    assert keys.key("ec-1").algorithm_name == "ES256"
    assert keys.key(None) is None  # two keys: a token without kid gets none
    assert keys.key("other") is None
    assert refreshes(metrics, "ok") == 1


async def test_a_one_key_set_serves_a_token_without_kid(keys, fake):
    fake.retire("ec-1")
    await keys.refresh()
    assert keys.key(None) is keys.key("rsa-1") is not None


async def test_the_cached_key_verifies_a_token_of_the_issuer(keys, fake):
    token = fake.mint({}, alg="ES256")
    key = await keys.key_for(jwt.get_unverified_header(token)["kid"])
    claims = jwt.decode(token, key, algorithms=[key.algorithm_name], audience=fake.audience, leeway=10**10)
    assert claims["iss"] == fake.issuer


@pytest.mark.parametrize(
    "fault",
    [
        lambda f: f.fail_next("jwks", 500),
        lambda f: f.fail_next("jwks", 403),
        lambda f: f.fail_next("jwks", 302, headers={"Location": "https://oidc.test/jwks"}),
        lambda f: f.drop_next("jwks"),
        lambda f: f.malformed_next("jwks", b"<html>hi</html>", content_type="text/html"),
        lambda f: f.malformed_next("jwks", b"[]"),
        lambda f: f.malformed_next("jwks", b'{"keys": []}'),
        lambda f: f.malformed_next("jwks", b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'),
        lambda f: f.malformed_next("jwks", b'{"keys": [], "x": "' + b"x" * 300_000 + b'"}'),
        lambda f: f.malformed_next("jwks", b" " * 10_000_000, chunked=True),
    ],
    ids=["500", "403", "302", "dropped", "html", "array", "empty", "only-hmac", "oversize", "10MB-streamed"],
)
async def test_a_failed_refresh_keeps_the_last_good_keys(keys, fake, metrics, fault):
    await keys.refresh()
    good = keys.key("rsa-1")
    fault(fake)
    assert not await keys.refresh()
    assert keys.key("rsa-1") is good and keys.loaded
    assert (refreshes(metrics, "ok"), refreshes(metrics, "error")) == (1, 1)


async def test_a_slow_endpoint_keeps_serving_the_last_good_keys(keys, fake):
    await keys.refresh()
    good = keys.key("rsa-1")
    fake.set_delay("jwks", 60)  # never waited for: close() abandons it
    pending = asyncio.create_task(keys.refresh())
    while fake.calls["jwks"] == 1:
        await asyncio.sleep(0)
    assert keys.key("rsa-1") is good
    assert await keys.key_for("ec-1") is not None  # a known kid never waits for the fetch in flight
    await keys.close()
    assert await pending is False


async def test_loaded_tells_keys_unobtainable_from_a_bad_kid(keys, fake, clock):
    fake.drop_next("jwks")
    assert not await keys.refresh()
    assert not keys.loaded and await keys.key_for("rsa-1") is None  # never had keys: not the token's fault
    clock.advance(RETRY_AFTER_FAILURE)
    assert await keys.key_for("rsa-1") is not None and keys.loaded
    fake.fail_next("jwks", 500)
    assert not await keys.refresh()
    assert keys.loaded  # a later failure does not forget the good set


async def test_a_reused_kid_takes_its_new_material_at_the_next_refresh(keys, fake):
    await keys.refresh()
    old = keys.key("rsa-1").key.public_numbers()
    new = fake.rotate()
    jwk = next(k for k in fake.jwks["keys"] if k["kid"] == new)
    fake.jwks = {"keys": [{**jwk, "kid": "rsa-1"}]}
    assert keys.key("rsa-1").key.public_numbers() == old  # until the refresh
    await keys.refresh()
    assert keys.key("rsa-1").key.public_numbers() != old


# -- rotation and refetch rate (J07, J26, S-08) ----------------------------------------------------------


async def test_rotation_a_new_kid_after_one_refetch_and_the_old_one_until_retired(keys, fake, clock):
    await keys.refresh()
    new = fake.rotate()
    assert await keys.key_for(new) is None  # within the cooldown of the first fetch: no refetch
    clock.advance(30)
    assert await keys.key_for(new) is not None
    assert fake.calls["jwks"] == 2
    assert await keys.key_for("rsa-1") is not None  # still published: still good
    fake.retire("rsa-1")
    clock.advance(300)
    await keys.refresh()  # the background refresh
    assert keys.key("rsa-1") is None and keys.key(new) is not None


async def test_unknown_kid_refetches_at_most_once_per_cooldown(keys, fake, clock):
    await keys.refresh()
    assert fake.calls["jwks"] == 1
    assert await keys.key_for("rsa-1") is not None  # known: no fetch
    assert await keys.key_for("random-1") is None  # the initial fetch is within the cooldown
    assert fake.calls["jwks"] == 1
    clock.advance(30)
    results = await asyncio.gather(*(keys.key_for(f"random-{i}") for i in range(50)))
    assert results == [None] * 50
    assert fake.calls["jwks"] == 2  # one shared fetch for 50 concurrent unknown kids
    clock.advance(29)
    assert await keys.key_for("random-x") is None
    assert fake.calls["jwks"] == 2


async def test_a_thousand_random_kids_in_one_second_cost_at_most_one_fetch(keys, fake, clock):
    await keys.refresh()
    clock.advance(30)
    for _ in range(1000):  # one after another, spread over one second
        assert await keys.key_for(uuid.uuid4().hex) is None
        clock.advance(0.001)
    assert fake.calls["jwks"] == 2
    clock.advance(30)
    found = await asyncio.gather(*(keys.key_for(uuid.uuid4().hex) for _ in range(1000)))  # all at once
    assert found == [None] * 1000 and fake.calls["jwks"] == 3


async def test_a_thousand_random_kids_while_the_endpoint_is_down(keys, fake, clock):
    fake.fail_next("jwks", 503, count=10_000)
    assert not await keys.refresh()
    for _ in range(1000):  # within RETRY_AFTER_FAILURE of the failed fetch
        assert await keys.key_for(uuid.uuid4().hex) is None
        clock.advance(0.000999)
    assert fake.calls["jwks"] == 1
    clock.advance(0.001)
    for _ in range(1000):  # the next second: one retry
        assert await keys.key_for(uuid.uuid4().hex) is None
        clock.advance(0.000999)
    assert fake.calls["jwks"] == 2


async def test_after_a_failed_fetch_an_unknown_kid_retries_within_a_second(keys, fake, clock):
    fake.drop_next("jwks")  # the issuer was down when the service started
    assert not await keys.refresh()
    assert await keys.key_for("rsa-1") is None  # within a second of the failure: no new fetch
    assert fake.calls["jwks"] == 1
    clock.advance(1)
    assert await keys.key_for("rsa-1") is not None  # back: found without waiting 30 s
    assert fake.calls["jwks"] == 2
    clock.advance(1)
    assert await keys.key_for("random") is None  # a good set again: the long cooldown applies
    assert fake.calls["jwks"] == 2


async def test_the_cooldown_is_configurable(fake, http, clock, metrics):
    source = JwksSource(http, fake.issuer, fake.jwks_uri, metrics=metrics, org="org", provider="corp")
    keys = cache(source, metrics, clock, unknown_kid_cooldown=5.0)
    await keys.refresh()
    clock.advance(4.9)
    assert await keys.key_for("random") is None and fake.calls["jwks"] == 1
    clock.advance(0.1)
    assert await keys.key_for("random") is None and fake.calls["jwks"] == 2


async def test_first_use_fetches_when_nothing_is_loaded(keys, fake):
    assert await keys.key_for("rsa-1") is not None
    assert fake.calls["jwks"] == 1


async def test_a_cancelled_caller_leaves_the_shared_fetch_running(fake, http, clock, metrics):
    gate = asyncio.Event()
    source = JwksSource(http, fake.issuer, fake.jwks_uri, metrics=metrics, org="org", provider="corp")

    async def gated():
        await gate.wait()
        return await source()

    keys = cache(gated, metrics, clock)
    first = asyncio.create_task(keys.key_for("rsa-1"))
    second = asyncio.create_task(keys.key_for("ec-1"))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second is not None
    assert first.cancelled() and keys.key("rsa-1") is not None
    assert fake.calls["jwks"] == 1


async def test_discovery_feeds_the_cache(fake, http, clock, metrics):
    source = JwksSource(http, fake.issuer, metrics=metrics, org="org", provider="corp")
    keys = cache(source, metrics, clock)
    assert await keys.refresh() and keys.key("rsa-1") is not None
    fake.fail_next("jwks", 503)
    assert not await keys.refresh()
    assert await keys.refresh()
    assert fake.calls == {"discovery": 2, "jwks": 3}


# -- failures in the log -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "traceback"),
    [
        (FetchError("GET JWKS: HTTP 503"), False),
        (ApigeeUnavailable("GET certs: HTTP 503"), False),
        (JWKSError("no usable key"), False),
        (RuntimeError("a bug"), True),
    ],
    ids=["fetch", "apigee", "jwks", "bug"],
)
async def test_a_failed_fetch_logs_one_warning_and_a_traceback_only_for_a_bug(
    clock, metrics, caplog, error, traceback
):
    keys = cache(failing(error), metrics, clock)
    with caplog.at_level(logging.WARNING, logger="authz"):
        assert not await keys.refresh()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"JWKS of corp: fetch failed, keeping 0 keys: {error}"
    assert bool(record.exc_info) is traceback
    assert refreshes(metrics, "error") == 1


async def test_a_fetch_that_returns_no_object_is_a_failed_fetch(clock, metrics, caplog):
    async def fetch():
        return ["not", "an", "object"]

    keys = cache(fetch, metrics, clock)
    with caplog.at_level(logging.WARNING, logger="authz"):
        assert not await keys.refresh()
    assert "not a JSON object" in caplog.text and not caplog.records[0].exc_info


# -- the background loop --------------------------------------------------------------------------------


async def test_run_fetches_then_stops_and_close_abandons_a_fetch(keys, fake):
    runner = asyncio.create_task(keys.run())
    while fake.calls["jwks"] == 0:
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    keys.stop()
    await runner
    assert keys.key("rsa-1") is not None
    fake.set_delay("jwks", 60)  # cancelled by close(), never waited for
    pending = asyncio.create_task(keys.refresh())
    while fake.calls["jwks"] == 1:
        await asyncio.sleep(0)
    await keys.close()
    assert await pending is False


async def test_run_survives_failures(keys, fake, metrics):
    fake.fail_next("jwks", 500)
    runner = asyncio.create_task(keys.run())
    while refreshes(metrics, "error") == 0:
        await asyncio.sleep(0)
    assert not runner.done()
    keys.stop()
    await runner


async def test_run_after_a_start_up_fetch_waits_a_full_interval(keys, fake):
    assert await keys.refresh()
    runner = asyncio.create_task(keys.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.calls["jwks"] == 1  # no second fetch straight away
    keys.stop()
    await runner
