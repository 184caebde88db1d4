"""Quotas through the real gRPC server: standalone (exact, per process) and Apigee mode (leases reserved
at the FakeApigee's ``/quotas`` on loopback), including two replicas sharing one Apigee counter.

Windows are UTC calendar minutes on the real clock, for the service and the fake alike. A test that
counts requests in one window runs its measurement through ``in_one_minute``: when a minute boundary
passes during it, the window reset mid-run and the counts mean nothing, so it runs once more with the
next app's key (a fresh quota bucket) instead of sleeping to the next minute.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2

from authz.app import Service
from authz.config import load_config
from authz.server import codec
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import apigee_config_yaml, write_policy_secret
from tests.support.catalogs import (
    FREE_KEY,
    QUOTA_DEVELOPER,
    QUOTA_KEYS,
    QUOTA_PRODUCT,
    config_yaml,
    quota_app,
    quota_catalog_yaml,
    quota_id,
    quota_products,
)
from tests.support.check_requests import check_request
from tests.support.minutes import Run, in_one_minute_async

pytestmark = pytest.mark.integration

RATE_LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
T = TypeVar("T")


# --- helpers -------------------------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], T], done: Callable[[T], bool], what: str, deadline: float = 10.0
) -> T:
    """Poll ``probe()`` on the event loop (the service runs on it too) until ``done``; fail at the deadline."""
    end = time.monotonic() + deadline
    while not done(value := probe()):
        if time.monotonic() >= end:
            raise AssertionError(f"{what}: not after {deadline:.0f}s, last {value!r}")
        await asyncio.sleep(0.05)
    return value


async def apigee_count(fake: FakeApigee, identifier: str, at_least: int, minute: float) -> int:
    """Apigee's count for ``identifier`` once it reaches ``at_least``, polled while the syncs settle; or
    whatever it is once ``minute`` (``time.time() // 60`` when the measurement began) is over: the window
    is gone, and ``in_one_minute`` runs the measurement again."""

    def settled(count: int) -> bool:
        return count >= at_least or time.time() // 60 != minute

    return await eventually(lambda: fake.quota_count(identifier), settled, f"Apigee's count of {identifier}")


def request(
    identity: int = 0, path: str = "/v1/orders/1", method: str = "GET", key: str | None = None
) -> Any:
    return check_request(path=path, method=method, key=key or QUOTA_KEYS[identity])


async def checks(service: Service, requests: list[Any]) -> list[Any]:
    """Send ``requests`` one after the other on one channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return [await stub.Check(req, timeout=5) for req in requests]


async def concurrent_checks(service: Service, requests: list[Any]) -> list[Any]:
    """Send ``requests`` all at once on one channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return list(await asyncio.gather(*(stub.Check(req, timeout=5) for req in requests)))


def codes(replies: list[Any]) -> list[int]:
    return [reply.status.code for reply in replies]


def header_list(options: Any) -> list[tuple[str, str]]:
    return [(option.header.key, option.header.value) for option in options]


def client_headers(reply: Any) -> dict[str, str]:
    """The headers an allow adds to the response to the client (each name once)."""
    found = header_list(reply.ok_response.response_headers_to_add)
    assert len({name for name, _ in found}) == len(found), found
    return dict(found)


def assert_no_rate_limit_headers(reply: Any) -> None:
    for options in (reply.ok_response.response_headers_to_add, reply.ok_response.headers):
        assert not [name for name, _ in header_list(options) if name.startswith("ratelimit-")], reply


def assert_quota_exceeded(reply: Any, limit: int, run: Run[Any]) -> None:
    """A 429 quota_exceeded deny with retry-after and the rate-limit headers, each sent once."""
    assert reply.status.code == code_pb2.RESOURCE_EXHAUSTED == 8
    assert reply.status.message == "quota_exceeded"
    denied = reply.denied_response
    assert denied.status.code == 429
    body = json.loads(denied.body)
    assert body["reason"] == "quota_exceeded"
    assert body["error"]
    found = header_list(denied.headers)
    names = [name for name, _ in found]
    assert sorted(names) == sorted(["content-type", "retry-after", *RATE_LIMIT_HEADERS]), found
    headers = dict(found)
    assert headers["content-type"] == "application/json"
    assert headers["ratelimit-limit"] == str(limit)
    assert headers["ratelimit-remaining"] == "0"
    assert re.fullmatch(r"[0-9]+", headers["ratelimit-reset"]), headers
    assert headers["retry-after"] == headers["ratelimit-reset"]
    reset = int(headers["ratelimit-reset"])
    assert 1 <= reset <= 60
    assert reset in run.reset_range(), (reset, run)


def sample(service: Service, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, {"org": "org", **labels})


async def metrics_text(service: Service) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        return response.text


# --- standalone ----------------------------------------------------------------------------------------


@pytest.fixture
async def standalone(tmp_path):
    """standalone(limit=5, extra_auth="") -> a started standalone Service with ``quota_catalog_yaml``."""
    services: list[Service] = []

    async def start_service(limit: int = 5, extra_auth: str = "") -> Service:
        catalog = tmp_path / f"catalog{len(services)}.yaml"
        catalog.write_text(quota_catalog_yaml(limit))
        config = tmp_path / f"config{len(services)}.yaml"
        config.write_text(config_yaml(str(catalog), extra_auth))
        service = Service(load_config(config))
        services.append(service)
        await service.start()
        return service

    yield start_service
    for service in services:
        await service.stop()


async def test_the_sixth_request_of_a_minute_is_429_with_retry_headers(standalone):
    service = await standalone()

    async def seven_identical_requests(identity: int) -> list[Any]:
        return await checks(service, [request(identity)] * 7)  # the same shape: allow-cache hits

    run = await in_one_minute_async(seven_identical_requests)
    replies = run.result
    assert codes(replies) == [code_pb2.OK] * 5 + [code_pb2.RESOURCE_EXHAUSTED] * 2
    for reply in replies[:5]:
        assert codec.metadata_struct(reply)["x-apigee-authorized"] == "true"
        assert_no_rate_limit_headers(reply)  # auth.quota_headers is off by default
    for reply in replies[5:]:  # the window stays used up
        assert_quota_exceeded(reply, 5, run)
    # Every app has its own bucket; apps without a quota have none.
    other = run.identity + 2
    assert codes(await checks(service, [request(other), request(key=FREE_KEY)] * 5)) == [code_pb2.OK] * 10


async def test_requests_of_one_app_share_its_bucket_across_paths_and_methods(standalone):
    service = await standalone()
    shapes = [("/v1/orders/1", "GET"), ("/v1/orders/2", "GET"), ("/v1/orders/1", "POST")]

    async def mixed(identity: int) -> list[Any]:
        requests = [request(identity, path, method) for path, method in shapes * 2]  # 6 requests
        return await checks(service, requests)

    replies = (await in_one_minute_async(mixed)).result
    assert codes(replies) == [code_pb2.OK] * 5 + [code_pb2.RESOURCE_EXHAUSTED]


async def test_quota_headers_on_allowed_responses(standalone):
    service = await standalone(extra_auth="  quota_headers: true")

    async def six(identity: int) -> list[Any]:
        return await checks(service, [request(identity)] * 6)

    run = await in_one_minute_async(six)
    allowed, refused = run.result[:5], run.result[5]
    assert codes(allowed) == [code_pb2.OK] * 5
    remaining = []
    for reply in allowed:
        headers = client_headers(reply)
        assert sorted(headers) == sorted(RATE_LIMIT_HEADERS)
        assert headers["ratelimit-limit"] == "5"
        assert int(headers["ratelimit-reset"]) in run.reset_range()
        remaining.append(headers["ratelimit-remaining"])
        # For the client only: nothing about the quota goes upstream.
        assert not [
            name for name, _ in header_list(reply.ok_response.headers) if name.startswith("ratelimit")
        ]
    assert remaining == ["4", "3", "2", "1", "0"]
    assert_quota_exceeded(refused, 5, run)
    # An allow without a quota has nothing to tell.
    (free,) = await checks(service, [request(key=FREE_KEY)])
    assert free.status.code == code_pb2.OK
    assert_no_rate_limit_headers(free)


async def test_concurrent_checks_admit_exactly_the_limit(standalone):
    service = await standalone(limit=50)

    async def burst(identity: int) -> list[Any]:
        paths = [f"/v1/orders/{i % 9}" for i in range(200)]  # cache hits and misses mixed
        return await concurrent_checks(service, [request(identity, path) for path in paths])

    run = await in_one_minute_async(burst)
    found = codes(run.result)
    print(f"standalone, 200 concurrent checks, limit 50: {found.count(code_pb2.OK)} admitted")
    assert found.count(code_pb2.OK) == 50
    assert found.count(code_pb2.RESOURCE_EXHAUSTED) == 150
    for reply in run.result:
        if reply.status.code != code_pb2.OK:
            assert_quota_exceeded(reply, 50, run)


async def test_allow_unauthorized_lets_a_request_over_quota_through_marked_unauthorized(standalone):
    service = await standalone(extra_auth="  allow_unauthorized: true")

    async def six(identity: int) -> list[Any]:
        return await checks(service, [request(identity)] * 6)

    run = await in_one_minute_async(six)
    assert codes(run.result) == [code_pb2.OK] * 6
    for reply in run.result[:5]:
        metadata = codec.metadata_struct(reply)
        assert metadata["x-apigee-authorized"] == "true"
        assert "x-apigee-unauthorized-reason" not in metadata
    over = run.result[5]
    metadata = codec.metadata_struct(over)
    assert "x-apigee-authorized" not in metadata
    assert metadata["x-apigee-unauthorized-reason"] == "quota_exceeded"
    assert metadata["x-apigee-application"] == quota_app(run.identity)  # the rest of the metadata stays
    assert not over.HasField("denied_response")
    headers = client_headers(over)  # the client still learns that its quota is used up
    assert headers["ratelimit-limit"] == "5"
    assert headers["ratelimit-remaining"] == "0"
    assert sample(service, "auth_allowed_unauthorized_total", env="test", reason="quota_exceeded") == 1.0
    assert sample(service, "auth_denied_total", env="test", code="429", reason="quota_exceeded") is None


async def test_quota_metrics(standalone):
    async def six_on_a_new_service(identity: int) -> Service:
        service = await standalone(extra_auth="  quota_metrics_per_id: true")
        await checks(service, [request(identity)] * 6)
        return service

    run = await in_one_minute_async(six_on_a_new_service)
    text = await metrics_text(run.result)
    assert 'quota_checks_total{env="test",org="org",result="allowed"} 5.0' in text
    assert 'quota_checks_total{env="test",org="org",result="exceeded"} 1.0' in text
    assert 'quota_buckets{org="org"} 1.0' in text
    assert f'quota_remaining{{env="test",org="org",quota="{quota_id(run.identity)}"}} 0.0' in text
    assert 'auth_denied_total{code="429",env="test",org="org",reason="quota_exceeded"} 1.0' in text
    assert 'auth_requests_seconds_count{code="429",env="test",org="org"} 1.0' in text
    assert 'auth_requests_seconds_count{code="200",env="test",org="org"} 5.0' in text
    for key in (*QUOTA_KEYS, FREE_KEY):
        assert key not in text


async def test_no_per_id_gauge_by_default(standalone):
    service = await standalone()
    await checks(service, [request(0)])
    text = await metrics_text(service)
    assert 'quota_checks_total{env="test",org="org",result="allowed"} 1.0' in text
    assert "quota_remaining{" not in text  # quota ids name developers and apps: opt-in only
    assert QUOTA_DEVELOPER not in text


# --- Apigee mode ---------------------------------------------------------------------------------------


@pytest.fixture
async def apigee(tmp_path):
    """A FakeApigee on loopback with ``quota_products(5)`` and the metered and free apps."""
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(policy_jwks=secret.jwks)
    fake.set_products(quota_products(5))
    for index, key in enumerate(QUOTA_KEYS):
        fake.add_key(key, app=quota_app(index), developer_email=QUOTA_DEVELOPER, products=[QUOTA_PRODUCT])
    fake.add_key(FREE_KEY, app="free-app", developer_email=QUOTA_DEVELOPER, products=["free"])
    async with await fake.serve() as server:
        yield fake, server.remote_service_url


@pytest.fixture
async def replica(apigee, tmp_path):
    """replica(extra_auth="") -> a started Service in Apigee mode against the fake (a replica of its own)."""
    _, url = apigee
    services: list[Service] = []

    async def start_service(extra_auth: str = "") -> Service:
        n = len(services)
        config = tmp_path / f"config{n}.yaml"
        config.write_text(apigee_config_yaml(url, str(tmp_path / f"tmp{n}"), extra_auth=extra_auth))
        service = Service(load_config(config, policy_secret_dir=str(tmp_path / "policy-secret")))
        services.append(service)
        await service.start()
        return service

    yield start_service
    for service in services:
        await service.stop()


async def test_apigee_mode_sixth_request_is_429_and_apigee_counts_the_admitted(replica, apigee):
    fake, _ = apigee
    service = await replica()
    assert codes(await checks(service, [request(key=FREE_KEY)])) == [code_pb2.OK]  # products and keys load

    async def six(identity: int) -> tuple[list[Any], int]:
        minute = time.time() // 60
        replies = await checks(service, [request(identity)] * 6)
        return replies, await apigee_count(fake, quota_id(identity), 5, minute)

    run = await in_one_minute_async(six)
    replies, count = run.result
    assert codes(replies) == [code_pb2.OK] * 5 + [code_pb2.RESOURCE_EXHAUSTED]
    assert_quota_exceeded(replies[5], 5, run)
    # Apigee's counter, under the Go adapter's identifier, holds every admitted request (and the
    # reservations, which count too); with a limit of 5 no reservation goes past what is left.
    assert count == 5
    assert fake.calls["quotas"] >= 1
    assert sample(service, "quota_syncs_total", result="ok") >= 1
    assert sample(service, "quota_syncs_total", result="error") is None


async def test_apigee_mode_failing_quotas_enforces_locally_and_counts_unsynced(replica, apigee):
    fake, _ = apigee
    service = await replica()
    assert codes(await checks(service, [request(key=FREE_KEY)])) == [code_pb2.OK]
    fake.fail_next("quotas", 503, count=10_000)  # every sync in this test fails

    def unsynced() -> float:
        return sample(service, "quota_admitted_unsynced_total", env="test") or 0.0

    async def seven(identity: int) -> tuple[list[Any], float]:
        before = unsynced()
        replies = await checks(service, [request(identity)] * 7)
        return replies, unsynced() - before

    run = await in_one_minute_async(seven)
    replies, admitted_unsynced = run.result
    assert codes(replies) == [code_pb2.OK] * 5 + [code_pb2.RESOURCE_EXHAUSTED] * 2
    assert_quota_exceeded(replies[5], 5, run)
    assert_quota_exceeded(replies[6], 5, run)
    assert admitted_unsynced == 5  # every admission, none of them paid at Apigee
    assert fake.quota_count(quota_id(run.identity)) == 0  # Apigee never counted any of it
    assert sample(service, "quota_syncs_total", result="error") >= 1
    assert sample(service, "quota_syncs_total", result="ok") is None


async def test_apigee_mode_sends_the_offline_admissions_when_apigee_is_back(replica, apigee):
    fake, _ = apigee
    service = await replica()
    assert codes(await checks(service, [request(key=FREE_KEY)])) == [code_pb2.OK]
    fake.fail_next("quotas", 503, count=2)  # the first sync and one retry fail

    async def offline_then_back(identity: int) -> tuple[list[Any], int, list[Any]]:
        minute = time.time() // 60
        offline = await checks(service, [request(identity)] * 4)
        # The sync loop retries with backoff; the weight admitted offline reaches Apigee.
        count = await apigee_count(fake, quota_id(identity), 4, minute)
        online = await checks(service, [request(identity)] * 2)
        return offline, count, online

    run = await in_one_minute_async(offline_then_back)
    offline, count, online = run.result
    assert codes(offline) == [code_pb2.OK] * 4
    assert count == 4  # the four admissions; nothing reserved with a single request left
    assert sample(service, "quota_syncs_total", result="error") == 2.0
    assert sample(service, "quota_syncs_total", result="ok") >= 1
    # Back online, the bucket stands on Apigee's count: one request is left in the window.
    assert codes(online) == [code_pb2.OK, code_pb2.RESOURCE_EXHAUSTED]


# --- two replicas, one Apigee ------------------------------------------------------------------------

TWO_REPLICA_LIMIT = 100
TWO_REPLICA_REQUESTS = 400
TWO_REPLICA_BATCH = 20


@dataclass(frozen=True)
class Split:
    per_replica: list[int]  # admitted by each replica
    counted: int  # Apigee's count once the syncs settled (admitted weight plus reservations)

    @property
    def admitted(self) -> int:
        return sum(self.per_replica)


async def two_replicas(replica, fake: FakeApigee, extra_auth: str = "") -> Callable[[int], Awaitable[Split]]:
    """Two replicas against ``fake`` with the metered product at TWO_REPLICA_LIMIT per minute, and the
    measurement for ``in_one_minute``: TWO_REPLICA_REQUESTS checks of one app, each sent to a replica
    picked at random, in concurrent batches of TWO_REPLICA_BATCH."""
    fake.set_products(quota_products(TWO_REPLICA_LIMIT))
    replicas = [await replica(extra_auth), await replica(extra_auth)]
    for service in replicas:  # products loaded on both
        assert codes(await checks(service, [request(key=FREE_KEY)])) == [code_pb2.OK]
    rng = random.Random(20240611)  # a reproducible split

    async def measure(identity: int) -> Split:
        minute = time.time() // 60
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") for s in replicas]
        stubs = [external_auth_pb2_grpc.AuthorizationStub(channel) for channel in channels]
        per_replica = [0, 0]
        try:
            for _ in range(TWO_REPLICA_REQUESTS // TWO_REPLICA_BATCH):
                targets = [rng.randrange(2) for _ in range(TWO_REPLICA_BATCH)]
                replies = await asyncio.gather(
                    *(
                        stubs[t].Check(request(identity, f"/v1/orders/{i}"), timeout=5)
                        for i, t in enumerate(targets)
                    )
                )
                for target, reply in zip(targets, replies, strict=True):
                    assert reply.status.code in (code_pb2.OK, code_pb2.RESOURCE_EXHAUSTED), reply
                    per_replica[target] += reply.status.code == code_pb2.OK
        finally:
            for channel in channels:
                await channel.close()
        counted = await apigee_count(fake, quota_id(identity), sum(per_replica), minute)
        return Split(per_replica, counted)

    return measure


def report(what: str, split: Split) -> None:
    print(
        f"two replicas, {what}, limit {TWO_REPLICA_LIMIT}, {TWO_REPLICA_REQUESTS} requests: admitted "
        f"{split.admitted} ({split.per_replica[0]} + {split.per_replica[1]}); Apigee's count {split.counted}"
    )


async def test_two_replicas_share_one_apigee_counter_within_the_documented_bound(replica, apigee):
    """The issue's overshoot measurement: two replicas, one Apigee counter, limit 100 per minute, 400
    requests split at random between the replicas in concurrent batches. The documented bound is
    ``limit + replicas`` admitted (one unpaid request per replica); reservations that are never spent
    can refuse a little early."""
    fake, _ = apigee
    # The bound holds while syncs answer within quota_sync_wait; a generous wait keeps a busy CI machine
    # (everything here shares one event loop) from turning slow syncs into the case of the next test.
    split = (await in_one_minute_async(await two_replicas(replica, fake, "  quota_sync_wait: 3s"))).result
    report("Apigee on loopback", split)
    assert split.admitted <= TWO_REPLICA_LIMIT + 2
    assert split.admitted >= TWO_REPLICA_LIMIT - 10
    # Every admitted request reached Apigee's counter (with the reservations, which Apigee counts too).
    assert split.counted >= split.admitted


async def test_two_replicas_with_apigee_slower_than_the_sync_wait_each_enforce_the_limit(replica, apigee):
    """When Apigee's /quotas answers slower than ``auth.quota_sync_wait`` (250 ms), requests waiting for a
    sync are admitted on credit (README, Quotas), and the ``limit + replicas`` bound no longer holds:
    each replica still enforces the whole limit from what it knows, so the window admits at most
    ``replicas x limit``, as while Apigee is down."""
    fake, _ = apigee
    fake.set_delay("quotas", 0.5)
    split = (await in_one_minute_async(await two_replicas(replica, fake))).result
    report("Apigee answering in 500 ms", split)
    assert max(split.per_replica) <= TWO_REPLICA_LIMIT
    assert split.admitted >= TWO_REPLICA_LIMIT - 10
    assert split.counted >= split.admitted


async def test_a_quota_change_under_load_migrates_the_bucket(tmp_path):
    """A new limit arrives (catalog reload) while checks run: no error, the counts carry over."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(quota_catalog_yaml(5))
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(str(catalog)))
    service = Service(load_config(config))
    await service.start()
    try:
        limits = iter((12, 5, 12))  # a second run (minute boundary) starts from 5 again

        async def change_under_load(identity: int) -> list[Any]:
            if identity:
                catalog.write_text(quota_catalog_yaml(next(limits)))
                await eventually(service.current_catalog, lambda c: c is not None, "catalog")
            before = service.current_catalog()
            paths = [f"/v1/orders/{i % 5}" for i in range(40)]
            load = asyncio.ensure_future(concurrent_checks(service, [request(identity, p) for p in paths]))
            catalog.write_text(quota_catalog_yaml(next(limits)))  # while the checks run
            replies = await load
            await eventually(service.current_catalog, lambda c: c is not before, "the reloaded catalog")
            return replies + await concurrent_checks(service, [request(identity)] * 20)

        found = codes((await in_one_minute_async(change_under_load)).result)
        assert set(found) <= {code_pb2.OK, code_pb2.RESOURCE_EXHAUSTED}  # never an error
        assert found.count(code_pb2.OK) == 12  # one bucket across the change: 12 in all, not 5 + 12
    finally:
        await service.stop()


async def test_a_429_from_the_allow_cache_is_logged_with_method_and_path(standalone, caplog):
    service = await standalone()
    caplog.set_level("INFO", logger="authz.server.check")

    async def six(identity: int) -> list[Any]:
        return await checks(service, [request(identity)] * 6)  # the 6th is an allow-cache hit

    run = await in_one_minute_async(six)
    assert codes(run.result)[-1] == code_pb2.RESOURCE_EXHAUSTED
    denials = [r.getMessage() for r in caplog.records if "quota_exceeded" in r.getMessage()]
    assert denials == ["denied: quota_exceeded GET api=orders-api path=/v1/orders/1 request_id=-"]
    assert QUOTA_KEYS[run.identity] not in caplog.text
