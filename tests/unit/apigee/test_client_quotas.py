"""ApigeeClient.quotas against the stateful fake's server-side counting (reference §3.3)."""

from datetime import UTC, datetime

import httpx
import pytest

from authz.apigee.client import ApigeeClient, QuotaResponse
from authz.apigee.signer import BasicAuthorizer
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee

NOW = datetime(2024, 5, 17, 12, 30, 15, 250000, tzinfo=UTC).timestamp()
MINUTE_END = datetime(2024, 5, 17, 12, 31, tzinfo=UTC).timestamp()
BUCKET = "httpbin-product-test-integration@test.com-httpbin-app"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def fake(clock):
    return FakeApigee(basic_auth=("k", "s"), clock=clock)


@pytest.fixture
def sent():
    return []


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def client(fake, sent, metrics):
    async def recording(request: httpx.Request) -> httpx.Response:
        sent.append(await request.aread())
        return await fake.handler(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(recording), timeout=2) as http:
        yield ApigeeClient(
            http, "http://apigee.test/remote-service/", BasicAuthorizer("k", "s"), metrics, "org", "test"
        )


async def test_counts_across_calls_in_one_window(client, fake, sent, metrics):
    first = await client.quotas(BUCKET, 3, 1, 4, "minute")
    assert first == QuotaResponse(allowed=4, used=3, exceeded=0, expiry=MINUTE_END, timestamp=NOW)
    second = await client.quotas(BUCKET, 2, 1, 4, "minute")
    assert second == QuotaResponse(allowed=4, used=4, exceeded=1, expiry=MINUTE_END, timestamp=NOW)
    assert (await client.quotas("another-bucket", 1, 1, 4, "minute")).used == 1  # buckets are separate
    assert fake.calls["quotas"] == 3
    assert fake.last_headers["quotas"]["authorization"].startswith("Basic ")
    assert fake.last_headers["quotas"]["content-type"] == "application/json"
    labels = {"org": "org", "env": "test", "api": "quotas", "code": "200", "method": "POST"}
    assert metrics.registry.get_sample_value("apigee_requests_seconds_count", labels) == 3.0


async def test_request_body_is_the_go_adapters(client, sent):
    await client.quotas(BUCKET, 3, 1, 5, "MINUTE")
    assert sent == [
        b'{"identifier":"httpbin-product-test-integration@test.com-httpbin-app",'
        b'"weight":3,"interval":1,"allow":5,"timeUnit":"minute"}'
    ]


async def test_expiry_time_milliseconds_become_seconds(client, fake, clock):
    hour = await client.quotas(BUCKET, 1, 2, 5, "hour")
    assert hour.expiry == datetime(2024, 5, 17, 14, tzinfo=UTC).timestamp()  # 2-hour calendar windows
    month = await client.quotas("monthly", 1, 1, 5, "month")
    assert month.expiry == datetime(2024, 6, 1, tzinfo=UTC).timestamp()
    assert month.timestamp == NOW


async def test_a_new_window_resets_the_count(client, clock):
    assert (await client.quotas(BUCKET, 5, 1, 4, "minute")).exceeded == 1
    clock.now = MINUTE_END  # the first instant of the next window
    after = await client.quotas(BUCKET, 1, 1, 4, "minute")
    assert after == QuotaResponse(allowed=4, used=1, exceeded=0, expiry=MINUTE_END + 60, timestamp=MINUTE_END)
    clock.now = MINUTE_END + 59.999
    assert (await client.quotas(BUCKET, 0, 1, 4, "minute")).used == 1  # weight 0 only reads


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
async def test_retryable_statuses_are_unavailable(client, fake, status):
    fake.fail_next("quotas", status, headers={"Retry-After": "7"})
    with pytest.raises(ApigeeUnavailable) as info:
        await client.quotas(BUCKET, 1, 1, 5, "minute")
    assert info.value.retry_after == 7.0
    assert (await client.quotas(BUCKET, 1, 1, 5, "minute")).used == 1  # the failed call counted nothing


async def test_transport_errors_are_unavailable(client, fake):
    fake.drop_next("quotas")
    with pytest.raises(ApigeeUnavailable):
        await client.quotas(BUCKET, 1, 1, 5, "minute")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 302])
async def test_other_statuses_are_rejected(client, fake, status):
    fake.fail_next("quotas", status)
    with pytest.raises(ApigeeRejected) as info:
        await client.quotas(BUCKET, 1, 1, 5, "minute")
    assert info.value.status == status


async def test_the_fakes_own_rejections(client, fake):
    with pytest.raises(ApigeeRejected) as info:
        await client.quotas(BUCKET, 1, 1, 5, "week")  # a unit the proxy's Quota policy does not know
    assert info.value.status == 400
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        wrong = ApigeeClient(
            http, "http://apigee.test/remote-service", BasicAuthorizer("k", "x"), new_metrics(), "o", "e"
        )
        with pytest.raises(ApigeeRejected) as info:
            await wrong.quotas(BUCKET, 1, 1, 5, "minute")
    assert info.value.status == 401


GOOD = '"allowed":5,"used":1,"exceeded":0,"expiryTime":1715949060000'
GARBAGE = [
    b"<html>maintenance</html>",
    b"",
    b"[]",
    b'"ok"',
    b"null",
    b"{}",
    b'{"allowed":5,"used":1,"exceeded":0}',  # no expiryTime
    b'{"allowed":"5","used":1,"exceeded":0,"expiryTime":1715949060000}',
    b'{"allowed":5,"used":true,"exceeded":0,"expiryTime":1715949060000}',
    b'{"allowed":5,"used":1,"exceeded":null,"expiryTime":1715949060000}',
    b'{"allowed":5,"used":1,"exceeded":0,"expiryTime":1715949060000.5}',
    b'{"allowed":5,"used":1,"exceeded":0,"expiryTime":"1715949060000"}',
    ("{" + GOOD + ',"timestamp":"now"}').encode(),
    ("{" + GOOD + ',"timestamp":false}').encode(),
    b"\xff\xfe{}",
]


@pytest.mark.parametrize("body", GARBAGE)
async def test_garbage_200_bodies_are_unavailable(client, fake, body):
    fake.malformed_next("quotas", body)
    with pytest.raises(ApigeeUnavailable):
        await client.quotas(BUCKET, 1, 1, 5, "minute")


@pytest.mark.parametrize(
    ("body", "timestamp"),
    [
        ("{" + GOOD + "}", 0.0),
        ("{" + GOOD + ',"timestamp":null}', 0.0),
        ("{" + GOOD + ',"timestamp":1715949015250,"extra":[1]}', NOW),
    ],
)
async def test_timestamp_is_optional(client, fake, body, timestamp):
    fake.malformed_next("quotas", body.encode())
    assert await client.quotas(BUCKET, 1, 1, 5, "minute") == QuotaResponse(5, 1, 0, MINUTE_END, timestamp)
