"""QuotaManager against the stateful fake of Apigee's /quotas (httpx transport) and a fake clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import httpx
import pytest

from authz.apigee.client import ApigeeClient
from authz.apigee.signer import BasicAuthorizer
from authz.decision.model import AuthorizedOperation, Quota
from authz.metrics import Metrics, new_metrics
from authz.quota.manager import MAX_SYNCS, QuotaManager, QuotaResult
from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

START = 1_800_000_010.0  # 10 s into a minute (1_800_000_000 is a multiple of 60 since 2019-01-01)
MINUTE_END = 1_800_000_060.0


def op(
    limit: int = 50, quota_id: str = "p-test-dev@example.com-app", unit: str = "minute"
) -> AuthorizedOperation:
    return AuthorizedOperation("p", "api", Quota(limit, 1, unit), quota_id=quota_id)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def fake(clock: FakeClock) -> FakeApigee:
    return FakeApigee(basic_auth=("k", "s"), clock=clock.now)


@pytest.fixture
async def http(fake: FakeApigee) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=fake.transport(), timeout=2) as client:
        yield client


def manager(
    http: httpx.AsyncClient, clock: FakeClock, metrics: Metrics | None = None, **kw: object
) -> QuotaManager:
    metrics = metrics or new_metrics()
    client = ApigeeClient(
        http, "http://apigee.test/remote-service", BasicAuthorizer("k", "s"), metrics, "org", "test"
    )
    return QuotaManager(metrics, "org", clock, client, **kw)  # type: ignore[arg-type]


async def request(quotas: QuotaManager, *ops: AuthorizedOperation) -> QuotaResult:
    """What Check does: the synchronous charge, else the waiting one."""
    return quotas.charge_now(ops, "test") or await quotas.charge(ops, "test")


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_standalone_is_exact_under_concurrency(clock: FakeClock) -> None:
    quotas = QuotaManager(new_metrics(), "org", clock)
    results = await asyncio.gather(*(request(quotas, op(50)) for _ in range(200)))
    assert sum(r.allowed for r in results) == 50
    refused = [r for r in results if not r.allowed]
    assert refused[0] == QuotaResult(False, 50, 0, MINUTE_END)
    clock.advance(MINUTE_END - START)
    assert (await request(quotas, op(50))).allowed  # a new window


async def test_apigee_mode_is_exact_under_concurrency(
    http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    metrics = new_metrics()
    quotas = manager(http, clock, metrics)
    results = await asyncio.gather(*(request(quotas, op(50)) for _ in range(200)))
    assert sum(r.allowed for r in results) == 50
    await quotas.drain()
    assert value(metrics, "quota_checks_total", org="org", env="test", result="allowed") == 50
    assert value(metrics, "quota_checks_total", org="org", env="test", result="exceeded") == 150
    assert fake.calls["quotas"] >= 1


async def test_a_request_is_charged_all_or_nothing(clock: FakeClock) -> None:
    quotas = QuotaManager(new_metrics(), "org", clock)
    wide, narrow = op(10, "wide"), op(1, "narrow")
    assert (await request(quotas, wide, narrow)) == QuotaResult(True, 1, 0, MINUTE_END)  # the tightest
    assert not (await request(quotas, wide, narrow)).allowed
    assert (await request(quotas, wide)) == QuotaResult(
        True, 10, 8, MINUTE_END
    )  # the refused one took nothing
    same = op(10, "wide")
    assert (await request(quotas, wide, same)).remaining == 7  # one bucket is charged once per request


async def test_operations_without_a_quota_are_free(clock: FakeClock) -> None:
    quotas = QuotaManager(new_metrics(), "org", clock)
    free = AuthorizedOperation("p", "api", None)
    assert quotas.charge_now((free,), "test") == QuotaResult(True, 0, 0, 0.0)
    assert len(quotas) == 0


@pytest.mark.parametrize("seed", range(5))
async def test_two_replicas_stay_within_the_bound(
    seed: int, http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    """Two replicas, one fake Apigee, 100 per minute, traffic split at random between them: the total
    admitted is at most limit + replicas (one unpaid request each), and close to the limit."""
    replicas = [manager(http, clock), manager(http, clock)]
    rng = random.Random(seed)
    admitted = 0
    for _ in range(60):  # a burst of concurrent requests every 0.75 s of the minute
        calls = [request(rng.choice(replicas), op(100)) for _ in range(rng.randint(1, 8))]
        admitted += sum(r.allowed for r in await asyncio.gather(*calls))
        for quotas in replicas:
            quotas.sync_due()
            await quotas.drain()
        clock.advance(0.75)
        if clock.now() >= MINUTE_END:
            break
    print(f"two replicas admitted {admitted} of a limit of 100")
    assert 90 <= admitted <= 100 + len(replicas)


async def test_apigee_down_enforces_locally_and_catches_up(
    http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    metrics = new_metrics()
    quotas = manager(http, clock, metrics)
    fake.fail_next("quotas", 503, count=100)
    results = [await request(quotas, op(5)) for _ in range(8)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 3  # the limit still holds per replica
    await quotas.drain()
    assert value(metrics, "quota_admitted_unsynced_total", org="org", env="test") == 5
    assert value(metrics, "quota_syncs_total", org="org", result="error") >= 1
    fake._fails["quotas"].clear()  # Apigee is back
    clock.advance(31)  # past the longest backoff
    quotas.sync_due()
    await quotas.drain()
    assert fake.quota_count("p-test-dev@example.com-app") == 5  # the weight admitted offline arrived


async def test_a_sync_that_hangs_delays_a_request_at_most_the_wait(
    http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    quotas = manager(http, clock, wait=0.05)
    fake.set_delay("quotas", 30)
    assert (await request(quotas, op(5))).allowed  # on credit, the sync starts
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await request(quotas, op(5))).allowed  # waited for the sync, then admitted on credit
    assert loop.time() - started < 1.0
    await quotas.flush(0.01)


async def test_a_new_window_at_apigee_resets_the_count(
    http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    quotas = manager(http, clock)
    for _ in range(3):
        await request(quotas, op(3))
    quotas.sync_due()
    await quotas.drain()
    assert not (await request(quotas, op(3))).allowed
    clock.advance(MINUTE_END - START)
    assert (await request(quotas, op(3))).allowed
    quotas.sync_due()
    await quotas.drain()
    assert fake.quota_count("p-test-dev@example.com-app") >= 1


async def test_a_changed_limit_migrates_the_bucket(clock: FakeClock) -> None:
    quotas = QuotaManager(new_metrics(), "org", clock)
    assert (await request(quotas, op(2))).allowed
    assert (await request(quotas, op(2))).allowed
    assert not (await request(quotas, op(2))).allowed
    assert (await request(quotas, op(3))) == QuotaResult(True, 3, 0, MINUTE_END)  # counts carried over
    hourly = op(3, unit="hour")
    assert (await request(quotas, hourly)) == QuotaResult(True, 3, 2, 1_800_003_600.0)  # a new calendar


async def test_the_loop_never_jams_while_apigee_hangs(
    http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    quotas = manager(http, clock, wait=0.01)
    fake.set_delay("quotas", 30)
    for i in range(3 * MAX_SYNCS):
        assert (await request(quotas, op(5, f"id-{i}"))).allowed
    for _ in range(1000):  # let the syncs reach the fake (a few loop turns each)
        if fake.calls["quotas"] >= MAX_SYNCS:
            break
        await asyncio.sleep(0)
    quotas.sync_due()  # returns at once although every sync hangs
    for _ in range(100):
        await asyncio.sleep(0)
    assert fake.calls["quotas"] == MAX_SYNCS  # the others queue for a slot
    await quotas.flush(0.01)


async def test_idle_buckets_are_dropped(clock: FakeClock, http: httpx.AsyncClient) -> None:
    local = QuotaManager(new_metrics(), "org", clock)
    await request(local, op(5, unit="day"))
    clock.advance(601)
    local.sync_due()
    assert len(local) == 1  # standalone: its day is not over, dropping it would forget the count
    remote = manager(http, clock)
    await request(remote, op(5))
    remote.sync_due()
    await remote.drain()
    clock.advance(601)
    remote.sync_due()
    assert len(remote) == 0


async def test_per_id_gauges_only_when_asked(clock: FakeClock) -> None:
    metrics = new_metrics()
    await request(QuotaManager(metrics, "org", clock), op(5, "a"))
    assert (
        metrics.registry.get_sample_value("quota_remaining", {"org": "org", "env": "test", "quota": "a"})
        is None
    )
    metrics = new_metrics()
    await request(QuotaManager(metrics, "org", clock, per_id_metrics=True), op(5, "a"))
    assert (
        metrics.registry.get_sample_value("quota_remaining", {"org": "org", "env": "test", "quota": "a"}) == 4
    )


async def test_flush_sends_unsynced_weight_at_shutdown(
    http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    quotas = manager(http, clock)
    runner = asyncio.create_task(quotas.run())
    fake.fail_next("quotas", 503)
    await request(quotas, op(5))
    await quotas.drain()  # the first sync failed: the weight waits for the next one
    await quotas.flush(1.0)
    await runner
    assert fake.quota_count("p-test-dev@example.com-app") == 1


async def test_a_sync_that_times_out_counts_as_failed_and_keeps_its_weight(
    http: httpx.AsyncClient, clock: FakeClock, fake: FakeApigee
) -> None:
    metrics = new_metrics()
    quotas = manager(http, clock, metrics, wait=0.01, sync_timeout=0.02)
    fake.set_delay("quotas", 30)
    assert (await request(quotas, op(2))).allowed
    await quotas.drain()  # the sync gave up after 20 ms
    assert value(metrics, "quota_syncs_total", org="org", result="error") == 1
    assert (await request(quotas, op(2))).allowed  # offline: enforced locally, no waiting
    assert not (await request(quotas, op(2))).allowed
    fake.set_delay("quotas", 0)
    clock.advance(1)  # past the first backoff
    quotas.sync_due()
    await quotas.drain()
    assert fake.quota_count("p-test-dev@example.com-app") == 2  # both admissions reached Apigee
