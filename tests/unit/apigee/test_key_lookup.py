"""IndexedKeys against FakeApigee as an httpx transport: the index first, /verifyApiKey within a rate."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from authz.apigee import key_lookup
from authz.apigee.client import ApigeeClient
from authz.apigee.jwks import RemoteTokenKeys
from authz.apigee.key_lookup import IndexedKeys, TokenBucket
from authz.apigee.key_sync import KeySync
from authz.apigee.keys import ApiKeyCache
from authz.apigee.management import ManagementClient
from authz.apigee.signer import BasicAuthorizer
from authz.decision.authorize import key_digest
from authz.decision.model import Credential, DenyReason
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

DEV = "dev@example.com"
TOKEN = "ya29.management"


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def fake(clock):
    fake = FakeApigee(basic_auth=("k", "s"), google_token=TOKEN, clock=clock.now)
    fake.add_key("known", app="orders-app", developer_email=DEV, products=["orders"])
    fake.add_key("revoked", app="orders-app", developer_email=DEV, products=["orders"])
    fake.revoke_key("revoked")
    return fake


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def parts(fake, clock, metrics):
    async def token() -> str:
        return TOKEN

    async with httpx.AsyncClient(transport=fake.transport()) as http:
        client = ApigeeClient(
            http, "http://apigee.test/remote-service", BasicAuthorizer("k", "s"), metrics, "org", "test"
        )
        jwks = RemoteTokenKeys(client, "http://apigee.test/remote-token/certs", "org", metrics, clock)
        cache = ApiKeyCache(client, jwks, "org", metrics, clock)
        management = ManagementClient(http, "http://googleapis.test", "org", token, metrics)
        sync = KeySync(management, "org", metrics, clock, 3600.0, None)
        keys = IndexedKeys(sync, cache, "org", metrics, clock, verify_rate=3)
        yield sync, cache, keys
        await keys.close()
        await cache.close()
        await jwks.close()


def sample(metrics, name: str, result: str) -> float:
    return metrics.registry.get_sample_value(name, {"org": "org", "result": result}) or 0.0


async def test_an_index_hit_is_answered_without_a_call_and_is_the_same_object(parts, fake, metrics):
    sync, _, keys = parts
    assert await sync.sync()
    found = keys.lookup("known")
    assert isinstance(found, Credential) and found.active and found.products == ("orders",)
    assert (found.client_id, found.key_sha256) == ("known", key_digest("known"))  # as /verifyApiKey says
    assert keys.lookup("known") is found  # a cached allow stays valid while the index does
    revoked = keys.lookup("revoked")
    assert isinstance(revoked, Credential) and not revoked.active  # decide() makes it a 401
    assert fake.calls["verifyApiKey"] == 0
    assert sample(metrics, "api_key_cache_lookups_total", "index") == 3


async def test_a_sync_keeps_the_object_while_the_key_grants_the_same(parts, fake):
    sync, _, keys = parts
    await sync.sync()
    before = keys.lookup("known")
    await sync.sync()
    assert keys.lookup("known") is before  # allows cached on it stay valid
    fake.set_credential_product_status("known", "orders", "revoked")
    await sync.sync()
    after = keys.lookup("known")
    assert isinstance(after, Credential) and after.products == () and after is not before


async def test_the_memo_is_bounded(parts, monkeypatch):
    sync, _, keys = parts
    monkeypatch.setattr(key_lookup, "MEMO_SIZE", 1)
    await sync.sync()
    known = keys.lookup("known")
    keys.lookup("revoked")  # fills the memo: it starts over
    assert keys.lookup("known") == known


async def test_a_miss_falls_back_and_syncs_its_app_early(parts, fake):
    sync, _, keys = parts
    await sync.sync()
    fake.add_key("new", app="orders-app", developer_email=DEV, products=["orders"])
    assert keys.lookup("new") is None
    verified = await keys.verify("new")
    assert isinstance(verified, Credential) and verified.products == ("orders",)
    await asyncio.gather(*keys._refreshes)
    assert fake.calls["app"] == 1
    indexed = keys.lookup("new")
    assert isinstance(indexed, Credential) and indexed.active and fake.calls["verifyApiKey"] == 1


async def test_fallback_calls_are_shed_over_the_rate_only_with_an_index(parts, fake, metrics, clock):
    sync, _, keys = parts
    # No index yet (first sync not done, no snapshot): every unknown key is verified, as without a sync.
    assert [await keys.verify(f"nope-{i}") for i in range(5)] == [DenyReason.UNKNOWN_KEY] * 5
    assert fake.calls["verifyApiKey"] == 5
    await sync.sync()
    clock.advance(10)  # the bucket is full: 3
    answers = [await keys.verify(f"random-{i}") for i in range(10)]
    assert answers == [DenyReason.UNKNOWN_KEY] * 10
    assert fake.calls["verifyApiKey"] == 5 + 3
    assert sample(metrics, "api_key_verifications_total", "shed") == 7
    clock.advance(1)  # 3 more a second
    await keys.verify("random-x")
    assert fake.calls["verifyApiKey"] == 9


async def test_a_key_in_flight_is_joined_not_shed(parts, fake, clock):
    sync, cache, keys = parts
    await sync.sync()
    fake.add_key("new", app="orders-app", developer_email=DEV, products=["orders"])
    fake.set_delay("verifyApiKey", 0.05)
    first = asyncio.ensure_future(keys.verify("new"))
    await asyncio.sleep(0)
    assert cache.in_flight("new")
    # Two random keys take what is left in the bucket (3 - 1), then "new" joins the call under way.
    *randoms, joined = await asyncio.gather(
        keys.verify("random-0"), keys.verify("random-1"), keys.verify("new")
    )
    assert randoms == [DenyReason.UNKNOWN_KEY] * 2
    assert isinstance(joined, Credential) and joined == await first
    assert fake.calls["verifyApiKey"] == 3


async def test_an_empty_bucket_sheds_in_lookup_without_a_task(parts, fake, metrics):
    sync, cache, keys = parts
    await sync.sync()
    fake.add_key("new", app="orders-app", developer_email=DEV, products=["orders"])
    fake.set_delay("verifyApiKey", 0.05)
    pending = [asyncio.ensure_future(keys.verify(key)) for key in ("new", "random-0", "random-1")]
    await asyncio.sleep(0)  # all three calls under way: the bucket (3) is empty
    assert keys.lookup("random-2") == DenyReason.UNKNOWN_KEY  # shed at once
    assert keys.lookup("new") is None and cache.in_flight("new")  # in flight: joined, not shed
    assert sample(metrics, "api_key_verifications_total", "shed") == 1
    await asyncio.gather(*pending)


async def test_a_key_that_is_not_ascii_skips_the_index(parts, fake):
    sync, _, keys = parts
    await sync.sync()
    assert keys.lookup("kéy") is None
    assert await keys.verify("kéy") == DenyReason.MALFORMED_CREDENTIALS
    assert fake.calls["verifyApiKey"] == 0


async def test_no_early_sync_without_an_index_or_an_app_id(parts, fake):
    _, cache, keys = parts
    assert cache.on_valid is not None
    cache.on_valid({"application_id": "app-1"})  # no index yet
    await keys.verify("known")
    assert not keys._refreshes and fake.calls["app"] == 0


async def test_close_cancels_early_syncs(parts, fake):
    sync, _, keys = parts
    await sync.sync()
    fake.set_delay("app", 10)
    assert keys._verified({"application_id": "slow-app"}) is None
    assert len(keys._refreshes) == 1
    await keys.close()
    assert not keys._refreshes


def test_the_token_bucket_refills_at_its_rate(clock):
    bucket = TokenBucket(2, clock)
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.advance(0.5)
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.advance(100)
    assert [bucket.take() for _ in range(3)] == [True, True, False]  # never more than the rate saved up
