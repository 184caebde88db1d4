"""ApiKeyCache against the stateful fake: verification, positive/negative caching, stale refresh, outages."""

import asyncio
import json
import logging

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from authz.apigee.client import ApigeeClient
from authz.apigee.jwks import RemoteTokenKeys
from authz.apigee.keys import ApiKeyCache
from authz.apigee.signer import BasicAuthorizer
from authz.decision.authorize import key_digest
from authz.decision.model import Credential, DenyReason
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

KEY = "good-key-0123456789"
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
INTRUDER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Timeouts:
    """Wraps the fake: while ``on``, verifyApiKey times out at the transport (as a slow Apigee would);
    while ``hold`` is set, answers wait for it (so calls overlap without real time passing)."""

    def __init__(self, fake: FakeApigee) -> None:
        self.fake, self.on = fake, False
        self.hold: asyncio.Event | None = None
        self.held = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.on and request.url.path.endswith("/verifyApiKey"):
            self.fake.calls["verifyApiKey"] += 1
            raise httpx.ReadTimeout("slow", request=request)
        if self.hold is not None:
            self.held += 1
            await self.hold.wait()
        return await self.fake.handler(request)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def fake(clock):
    fake = FakeApigee(basic_auth=("k", "s"), clock=clock.now)
    fake.add_key(KEY, app="app-1", developer_email="dev@example.com", products=["p1", "p2"])
    fake.jwks["keys"].append({**RSAAlgorithm.to_jwk(OTHER.public_key(), as_dict=True), "kid": "test"})
    return fake


@pytest.fixture
def timeouts(fake):
    return Timeouts(fake)


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def make(fake, clock, metrics, timeouts):
    caches = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(timeouts)) as http:
        client = ApigeeClient(
            http, "http://apigee.test/remote-service", BasicAuthorizer("k", "s"), metrics, "org", "test"
        )
        keys = RemoteTokenKeys(client, "http://apigee.test/remote-token/certs", "org", metrics, clock)

        def make(**options):
            caches.append(ApiKeyCache(client, keys, "org", metrics, clock, **options))
            return caches[-1]

        yield make
        for cache in caches:
            await cache.close()
        await keys.close()


@pytest.fixture
def cache(make):
    return make()


def sample(metrics, name, result):
    value = metrics.registry.get_sample_value(name, {"org": "org", "result": result})
    return int(value or 0)


def verifications(metrics, result):
    return sample(metrics, "api_key_verifications_total", result)


def token(clock, key=OTHER, kid="test", alg="RS256", drop=(), **claims):
    now = int(clock.now())
    body = {"aud": "remote-service-client", "iat": now, "nbf": now, "exp": now + 900, "client_id": "cid",
            "application_name": "app", "api_product_list": ["p1"], **claims}  # fmt: skip
    body = {k: v for k, v in body.items() if k not in drop}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def answer(fake, signed):
    """The next verifyApiKey answers 200 with this token."""
    fake.malformed_next("verifyApiKey", json.dumps({"token": signed}).encode())


async def test_a_valid_key_gives_a_credential_with_the_claims(cache, fake, metrics):
    found = await cache.verify(KEY)
    assert found == Credential(
        key_sha256=key_digest(KEY), client_id=KEY, app_name="app-1", developer_email="dev@example.com",
        products=("p1", "p2"), active=True, expires_at=None,
    )  # fmt: skip
    assert cache.lookup(KEY) is found
    assert verifications(metrics, "valid") == 1
    assert metrics.registry.get_sample_value("credentials_cached", {"org": "org"}) == 1


@pytest.mark.parametrize(
    ("products", "expected"),
    [
        (["a", "b"], ("a", "b")),
        ('["a", "b"]', ("a", "b")),
        ("a, b ,,c", ("a", "b", "c")),  # a plain comma-separated string is accepted too
        ([], ()),
    ],
)
async def test_optional_claims_and_product_list_forms(cache, fake, clock, products, expected):
    answer(fake, token(clock, api_product_list=products, access_token="at", scope="read  write",
                       custom_attributes='{"tier":"gold"}', developer_email="d@x"))  # fmt: skip
    found = await cache.verify(KEY)
    assert isinstance(found, Credential)
    assert (found.products, found.client_id, found.app_name) == (expected, "cid", "app")
    assert (found.access_token, found.scopes, found.developer_email) == ("at", ("read", "write"), "d@x")
    assert found.custom_attributes == '{"tier":"gold"}'


async def test_one_verify_serves_a_thousand_lookups(cache, fake, metrics):
    found = await cache.verify(KEY)
    assert all(cache.lookup(KEY) is found for _ in range(1000))
    assert fake.calls["verifyApiKey"] == 1
    assert sample(metrics, "api_key_cache_lookups_total", "hit") == 1000


async def test_concurrent_verifies_share_one_call(cache, fake):
    results = await asyncio.gather(*(cache.verify(KEY) for _ in range(20)))
    assert fake.calls["verifyApiKey"] == 1
    assert all(r is results[0] for r in results) and isinstance(results[0], Credential)


async def test_a_cancelled_caller_does_not_cancel_the_shared_call(cache, fake):
    first = asyncio.create_task(cache.verify(KEY))
    second = asyncio.create_task(cache.verify(KEY))
    await asyncio.sleep(0)
    first.cancel()
    assert isinstance(await second, Credential)
    assert fake.calls["verifyApiKey"] == 1


async def test_an_invalid_key_is_cached_as_negative_for_ten_seconds(cache, fake, clock, metrics):
    assert cache.lookup("nope") is None
    assert await cache.verify("nope") is DenyReason.UNKNOWN_KEY
    assert cache.lookup("nope") is DenyReason.UNKNOWN_KEY
    clock.advance(9.9)
    assert cache.lookup("nope") is DenyReason.UNKNOWN_KEY
    clock.advance(0.1)
    assert cache.lookup("nope") is None
    assert verifications(metrics, "invalid") == 1
    assert [sample(metrics, "api_key_cache_lookups_total", r) for r in ("negative", "miss")] == [2, 2]


async def test_a_non_ascii_key_is_malformed_without_a_call(cache, fake):
    assert await cache.verify("clé") is DenyReason.MALFORMED_CREDENTIALS
    assert fake.calls["verifyApiKey"] == 0


FAULTS = {
    "500": lambda f, t: f.fail_next("verifyApiKey", 500),
    "503-without-token": lambda f, t: f.fail_next("verifyApiKey", 503, body=b'{"error":"config"}'),
    "429": lambda f, t: f.fail_next("verifyApiKey", 429),
    "dropped": lambda f, t: f.drop_next("verifyApiKey"),
    "timeout": lambda f, t: setattr(t, "on", True),
    "200-without-token": lambda f, t: f.malformed_next("verifyApiKey", b"{}"),
    "html": lambda f, t: f.malformed_next("verifyApiKey", b"<html/>", content_type="text/html"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_unavailable_is_not_cached_and_backs_off_then_recovers(
    cache, fake, clock, metrics, timeouts, fault
):
    FAULTS[fault](fake, timeouts)
    assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE
    timeouts.on = False
    assert cache.lookup(KEY) is None  # nothing cached, not even as negative
    assert verifications(metrics, "unavailable") == 1
    calls = fake.calls["verifyApiKey"]
    clock.advance(0.4)  # the first retry time is 0.5 s ± 10 %
    assert await cache.verify("another-key") is DenyReason.AUTH_UNAVAILABLE
    assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE
    assert fake.calls["verifyApiKey"] == calls  # refused without an HTTP call
    assert verifications(metrics, "refused") == 2
    clock.advance(0.2)
    assert isinstance(await cache.verify(KEY), Credential)
    assert await cache.verify("another-key") is DenyReason.UNKNOWN_KEY  # reset after a success


async def test_backoff_doubles_to_ten_seconds(cache, fake, clock):
    fake.fail_next("verifyApiKey", 500, count=100)
    for delay in (0.5, 1, 2, 4, 8, 10, 10):
        assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE
        calls = fake.calls["verifyApiKey"]
        clock.advance(delay * 0.89)
        assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE
        assert fake.calls["verifyApiKey"] == calls
        clock.advance(delay * 0.22)
    assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE
    assert fake.calls["verifyApiKey"] == 8


async def test_after_the_retry_time_one_probe_goes_out(cache, fake, clock, timeouts):
    fake.fail_next("verifyApiKey", 500)
    await cache.verify(KEY)
    clock.advance(1)
    timeouts.hold = asyncio.Event()
    probe = asyncio.create_task(cache.verify(KEY))
    while timeouts.held == 0:
        await asyncio.sleep(0)
    assert await cache.verify("k2") is DenyReason.AUTH_UNAVAILABLE  # refused while the probe runs
    timeouts.hold.set()
    assert isinstance(await probe, Credential)
    assert await cache.verify("k2") is DenyReason.UNKNOWN_KEY
    assert fake.calls["verifyApiKey"] == 3


def bad(clock):
    return {
        "bad-signature": token(clock, key=INTRUDER),
        "no-exp": token(clock, drop=("exp",)),
        "expired": token(clock, exp=int(clock.now()) - 60),
        "no-product-list": token(clock, drop=("api_product_list",)),
        "product-list-not-names": token(clock, api_product_list=[1, 2]),
        "product-list-bad-json": token(clock, api_product_list="[a, b"),
        "no-client-id": token(clock, drop=("client_id",)),
        "app-name-not-string": token(clock, application_name=5),
        "scope-not-string": token(clock, scope=["a"]),
        "hs256": token(clock, key="a-shared-secret-of-thirty-two-bytes", alg="HS256"),
        "alg-none": jwt.encode(
            {"exp": int(clock.now()) + 900}, None, algorithm="none", headers={"kid": "test"}
        ),
        "unknown-kid": token(clock, kid="unknown"),
        "garbage": "garbage",
    }


@pytest.mark.parametrize("name", list(bad(FakeClock())))
async def test_a_token_that_does_not_verify_is_unavailable_and_not_cached(
    cache, fake, clock, metrics, caplog, name
):
    bad_token = bad(clock)[name]
    answer(fake, bad_token)
    with caplog.at_level(logging.DEBUG, logger="authz"):
        assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE
    assert cache.lookup(KEY) is None
    assert verifications(metrics, "bad_token") == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert KEY not in caplog.text and bad_token not in caplog.text
    assert await cache.verify("other") is DenyReason.AUTH_UNAVAILABLE  # refused while backing off
    assert verifications(metrics, "refused") == 1


async def test_stale_entry_is_served_while_one_refresh_runs(cache, fake, clock, metrics):
    found = await cache.verify(KEY)
    clock.advance(901)  # the token's exp (15 min) has passed
    assert all(cache.lookup(KEY) is found for _ in range(10))
    await cache.drain()
    assert fake.calls["verifyApiKey"] == 2  # one refresh for ten stale lookups
    assert sample(metrics, "api_key_cache_lookups_total", "stale") == 10
    assert cache.lookup(KEY) is found  # same claims: the same object
    assert sample(metrics, "api_key_cache_lookups_total", "hit") == 1


async def test_changed_claims_replace_the_credential(cache, fake, clock):
    found = await cache.verify(KEY)
    fake.add_key(KEY, app="app-1", developer_email="dev@example.com", products=["p1"])
    clock.advance(901)
    cache.lookup(KEY)
    await cache.drain()
    refreshed = cache.lookup(KEY)
    assert refreshed is not found and refreshed.products == ("p1",)


async def test_a_revoked_key_stops_working_after_the_refresh(cache, fake, clock, metrics):
    assert isinstance(await cache.verify(KEY), Credential)
    fake.revoke_key(KEY)
    clock.advance(901)
    assert isinstance(cache.lookup(KEY), Credential)  # stale, refresh started
    await cache.drain()
    assert cache.lookup(KEY) is DenyReason.UNKNOWN_KEY
    assert metrics.registry.get_sample_value("credentials_cached", {"org": "org"}) == 0


async def test_a_cached_key_works_through_an_outage_until_cache_duration(cache, fake, clock, metrics):
    found = await cache.verify(KEY)
    fake.fail_next("verifyApiKey", 503, count=1000)
    for step in range(179):
        clock.advance(10)
        assert cache.lookup(KEY) is found
        for i in range(10):
            assert await cache.verify(f"uncached-{step}-{i}") is DenyReason.AUTH_UNAVAILABLE
        await cache.drain()
    # 1,790 uncached verifies: at most one call per global retry time (>= 9 s once at the 10 s cap), plus
    # the stale key's refreshes (1 s doubling to 60 s)
    assert fake.calls["verifyApiKey"] <= 1 + 1790 / 9 + 1790 / 60 + 7
    assert verifications(metrics, "refused") > 1500
    clock.advance(10)
    assert cache.lookup(KEY) is None  # 30 min after the last successful verification
    assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE


async def test_stale_refresh_waits_for_its_backoff(cache, fake, clock):
    await cache.verify(KEY)
    fake.fail_next("verifyApiKey", 503, count=10)
    clock.advance(901)
    cache.lookup(KEY)
    await cache.drain()
    assert fake.calls["verifyApiKey"] == 2
    clock.advance(0.9)
    cache.lookup(KEY)
    await cache.drain()
    assert fake.calls["verifyApiKey"] == 2  # 1 s backoff for this key not over
    clock.advance(0.2)
    cache.lookup(KEY)
    await cache.drain()
    assert fake.calls["verifyApiKey"] == 3


async def test_positive_and_negative_caches_are_bounded_lru(make, fake, metrics):
    cache = make(max_entries=3)
    for name in "abcd":
        fake.add_key(name, app=name, developer_email="d", products=[])
    for name in "abc":
        await cache.verify(name)
    cache.lookup("a")  # a is now the most recently used
    await cache.verify("d")
    assert cache.lookup("b") is None
    assert all(isinstance(cache.lookup(name), Credential) for name in "acd")
    assert metrics.registry.get_sample_value("credentials_cached", {"org": "org"}) == 3
    for name in ("x1", "x2", "x3", "x4"):
        await cache.verify(name)
    assert cache.lookup("x1") is None
    assert cache.lookup("x4") is DenyReason.UNKNOWN_KEY


async def test_expired_entries_are_swept(make, fake, clock, metrics):
    cache = make(cache_duration=60)
    await cache.verify(KEY)
    await cache.verify("bad")
    clock.advance(61)
    fake.add_key("new", app="n", developer_email="d", products=[])
    await cache.verify("new")
    assert metrics.registry.get_sample_value("credentials_cached", {"org": "org"}) == 1


async def test_key_rotation_needs_one_jwks_refetch_per_cooldown(cache, fake, clock, metrics):
    await cache.verify(KEY)  # loads the JWKS
    assert fake.calls["certs"] == 1
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake.jwks = {"keys": [{**RSAAlgorithm.to_jwk(rotated.public_key(), as_dict=True), "kid": "2025"}]}
    answer(fake, token(clock, key=rotated, kid="2025"))
    assert await cache.verify("k2") is DenyReason.AUTH_UNAVAILABLE  # within the cooldown: no refetch
    assert fake.calls["certs"] == 1
    clock.advance(30)
    answer(fake, token(clock, key=rotated, kid="2025"))
    assert isinstance(await cache.verify("k2"), Credential)
    assert fake.calls["certs"] == 2


async def test_close_cancels_calls_in_flight(make, fake):
    cache = make()
    fake.set_delay("verifyApiKey", 60)  # cancelled by close(), never waited for
    waiting = asyncio.create_task(cache.verify(KEY))
    while fake.calls["verifyApiKey"] == 0:
        await asyncio.sleep(0)
    await cache.close()
    assert await waiting is DenyReason.AUTH_UNAVAILABLE


async def test_retry_after_holds_new_keys_back_up_to_ten_seconds(cache, fake, clock):
    fake.fail_next("verifyApiKey", 503, headers={"Retry-After": "7"})
    assert await cache.verify(KEY) is DenyReason.AUTH_UNAVAILABLE
    clock.advance(6.5)
    assert await cache.verify("another-key") is DenyReason.AUTH_UNAVAILABLE
    assert fake.calls["verifyApiKey"] == 1  # refused: Apigee asked for 7 s
    clock.advance(1)
    assert isinstance(await cache.verify(KEY), Credential)
