"""AnalyticsClient against FakeApigee's analytics endpoints as an httpx transport (reference §3.4, §3.5)."""

from __future__ import annotations

import gzip
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from authz.apigee.analytics import CREDENTIALS_PAUSE, AnalyticsClient, new_endpoint_http_client
from authz.apigee.signer import BasicAuthorizer
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee

IA = "http://apigee.test/edgemicro"
GOOGLE = "http://googleapis.test"
RECORDS = [{"gateway_flow_id": "f1", "organization": "org", "environment": "test"}, {"gateway_flow_id": "f2"}]
LEGACY_NAME = "date=2024-05-17/time=10-20-00/1715941230-1.gz"


def write_gz(path: Path, records: list[dict]) -> Path:
    path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))
    return path


class Tokens:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        return f"ya29.token-{self.calls}"


@pytest.fixture
def fake():
    return FakeApigee(basic_auth=("k", "s"))


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def http(fake):
    async with httpx.AsyncClient(transport=fake.transport(), timeout=2) as http:
        yield http


def legacy(http, metrics, base: str = IA) -> AnalyticsClient:
    return AnalyticsClient(http, "legacy", base, metrics, authorizer=BasicAuthorizer("k", "s"))


def timed(metrics, method: str, code: str, org: str = "org", env: str = "test") -> float:
    labels = {"org": org, "env": env, "api": "analytics", "code": code, "method": method}
    return metrics.registry.get_sample_value("apigee_requests_seconds_count", labels) or 0


# -- legacy signed URL --------------------------------------------------------------------------------


async def test_legacy_upload(http, fake, metrics, tmp_path):
    client = legacy(http, metrics)
    await client.upload("org", "test", write_gz(tmp_path / "1715941230-1.gz", RECORDS), LEGACY_NAME)
    assert fake.analytics_records("org", "test") == RECORDS
    assert fake.uploads == [("org", "test", LEGACY_NAME)]
    get = fake.last_headers["analytics_url"]
    assert get["authorization"] == BasicAuthorizer("k", "s").authorization()
    put = fake.last_headers["signed_put"]
    assert put["content-type"] == "application/x-gzip"
    assert put["x-amz-server-side-encryption"] == "AES256"
    assert int(put["content-length"]) == (tmp_path / "1715941230-1.gz").stat().st_size
    assert put["authorization"].startswith("Basic ")  # same origin as internal_api: kept, like the Go adapter
    assert timed(metrics, "GET", "200") == 1 and timed(metrics, "PUT", "200") == 1


async def test_legacy_query_string_matches_the_go_adapter(fake, metrics, tmp_path):
    seen: list[httpx.URL] = []

    async def spy(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return await fake.handler(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(spy)) as http:
        await legacy(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    assert seen[0].path == "/edgemicro/analytics/organization/org/environment/test"
    assert seen[0].query.decode() == (
        "encrypt=true&file_content_type=application%2Fx-gzip&relative_file_path=date%3D2024-05-17%2F"
        "time%3D10-20-00%2F1715941230-1.gz&tenant=org~test"
    )  # the encoding of the URL in issue #185


async def test_legacy_put_to_another_host_carries_no_credentials(http, fake, metrics, tmp_path):
    # Get a real signed URL, then have the fake answer it on another host (as S3 would be).
    issued = await http.get(
        f"{IA}/analytics/organization/org/environment/test",
        params={"encrypt": "true", "file_content_type": "application/x-gzip",
                "relative_file_path": LEGACY_NAME, "tenant": "org~test"},
        headers={"Authorization": BasicAuthorizer("k", "s").authorization()},
    )  # fmt: skip
    elsewhere = issued.json()["url"].replace("http://apigee.test/", "https://storage.test/")
    fake.malformed_next("analytics_url", json.dumps({"url": elsewhere}).encode())
    await legacy(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    assert "authorization" not in fake.last_headers["signed_put"]
    assert fake.analytics_records("org", "test") == RECORDS


def test_relative_names(http, metrics):
    when = datetime(2024, 5, 17, 10, 20, 59, tzinfo=UTC).timestamp()
    path = Path("/tmp/x/1715941230-77.gz")
    assert legacy(http, metrics).relative_name("org", "test", path, when) == (
        "date=2024-05-17/time=10-20-00/1715941230-77.gz"
    )
    gcp = AnalyticsClient(http, "gcp", GOOGLE, metrics, token=Tokens())
    name = gcp.relative_name("org", "test", path, when)
    assert re.fullmatch(rf"{int(when)}\.api\.org\.test\.[0-9a-f-]{{36}}\.gz", name)
    assert gcp.relative_name("org", "test", path, when) != name  # a new uuid per attempt
    publisher = AnalyticsClient(http, "axpublisher", IA, metrics, authorizer=BasicAuthorizer("k", "s"))
    assert publisher.relative_name("org", "test", path, when) == "1715941230-77.gz"


# -- GCP datalocation ---------------------------------------------------------------------------------


async def test_gcp_upload(metrics, tmp_path):
    fake = FakeApigee(google_token="ya29.token-1")
    tokens = Tokens()
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        client = AnalyticsClient(http, "gcp", GOOGLE, metrics, token=tokens)
        path = write_gz(tmp_path / "f.gz", RECORDS)
        name = client.relative_name("org", "prod", path, 1715941230)
        await client.upload("org", "prod", path, name)
    assert tokens.calls == 1
    assert fake.last_headers["datalocation"]["authorization"] == "Bearer ya29.token-1"
    assert "authorization" not in fake.last_headers["signed_put"]
    assert "x-amz-server-side-encryption" not in fake.last_headers["signed_put"]
    assert fake.analytics_records("org", "prod") == RECORDS
    assert fake.uploads == [("org", "prod", name)]
    assert timed(metrics, "GET", "200", env="prod") == 1 and timed(metrics, "PUT", "200", env="prod") == 1


async def test_gcp_bad_token_pauses_uploads(metrics, tmp_path):
    fake = FakeApigee(google_token="the-right-one")
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        client = AnalyticsClient(http, "gcp", GOOGLE, metrics, token=Tokens())
        path = write_gz(tmp_path / "f.gz", RECORDS)
        with pytest.raises(ApigeeUnavailable, match="HTTP 401: credentials refused") as caught:
            await client.upload("org", "test", path, client.relative_name("org", "test", path, 1e9))
    assert caught.value.retry_after == CREDENTIALS_PAUSE  # not the file's fault: nothing is quarantined
    assert fake.calls["signed_put"] == 0


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["analytics_url", "signed_put"])
@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_transient_statuses_are_unavailable(http, fake, metrics, tmp_path, endpoint, status):
    fake.fail_next(endpoint, status, headers={"Retry-After": "7"})
    with pytest.raises(ApigeeUnavailable) as caught:
        await legacy(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    assert caught.value.retry_after == 7.0
    assert fake.analytics_records("org", "test") == []


@pytest.mark.parametrize("endpoint,status", [("analytics_url", 404), ("analytics_url", 400),
                                             ("signed_put", 403), ("signed_put", 400),
                                             ("signed_put", 201), ("signed_put", 302)])  # fmt: skip
async def test_other_statuses_are_rejected(http, fake, metrics, tmp_path, endpoint, status):
    fake.fail_next(endpoint, status)
    with pytest.raises(ApigeeRejected) as caught:
        await legacy(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    assert caught.value.status == status
    assert timed(metrics, "GET" if endpoint == "analytics_url" else "PUT", str(status)) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_pause_uploads(fake, metrics, tmp_path, status):
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        client = AnalyticsClient(http, "legacy", IA, metrics, authorizer=BasicAuthorizer("k", "wrong"))
        if status == 403:
            fake.fail_next("analytics_url", 403)
        with pytest.raises(ApigeeUnavailable, match=f"HTTP {status}: credentials refused") as caught:
            await client.upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    assert caught.value.retry_after == CREDENTIALS_PAUSE


async def test_a_used_signed_url_is_rejected(http, fake, metrics, tmp_path):
    issued = await http.get(
        f"{IA}/analytics/organization/org/environment/test",
        params={"encrypt": "true", "file_content_type": "application/x-gzip",
                "relative_file_path": LEGACY_NAME, "tenant": "org~test"},
        headers={"Authorization": BasicAuthorizer("k", "s").authorization()},
    )  # fmt: skip
    client = legacy(http, metrics)
    fake.malformed_next("analytics_url", issued.content, count=2)
    await client.upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    with pytest.raises(ApigeeRejected) as caught:  # an expired signature looks the same
        await client.upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    assert caught.value.status == 403


async def test_transport_errors_are_unavailable_and_timed_as_error(http, fake, metrics, tmp_path):
    path = write_gz(tmp_path / "f.gz", RECORDS)
    fake.drop_next("analytics_url")
    with pytest.raises(ApigeeUnavailable):
        await legacy(http, metrics).upload("org", "test", path, LEGACY_NAME)
    fake.drop_next("signed_put")
    with pytest.raises(ApigeeUnavailable):
        await legacy(http, metrics).upload("org", "test", path, LEGACY_NAME)
    assert timed(metrics, "GET", "error") == 1 and timed(metrics, "PUT", "error") == 1


async def test_timeouts_are_unavailable(metrics, tmp_path):
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as http:
        with pytest.raises(ApigeeUnavailable, match="ReadTimeout"):
            await legacy(http, metrics).upload(
                "org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME
            )


@pytest.mark.parametrize(
    "body",
    [b"<html>busy</html>", b"[]", b"{}", b'{"url": 7}', b'{"url": ""}', b'{"url": "/relative/path"}',
     b'{"url": "ftp://x.test/signed/1"}', b'{"url": "' + b"x" * 70_000 + b'"}'],
)  # fmt: skip
async def test_unusable_signed_url_answers_are_unavailable(http, fake, metrics, tmp_path, body):
    fake.malformed_next("analytics_url", body)
    with pytest.raises(ApigeeUnavailable):
        await legacy(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), LEGACY_NAME)
    assert fake.calls["signed_put"] == 0


async def test_a_missing_file_raises_before_any_call(http, fake, metrics, tmp_path):
    with pytest.raises(FileNotFoundError):
        await legacy(http, metrics).upload("org", "test", tmp_path / "gone.gz", LEGACY_NAME)
    assert sum(fake.calls.values()) == 0


# -- axpublisher --------------------------------------------------------------------------------------


async def test_publish(http, fake, metrics):
    client = AnalyticsClient(http, "axpublisher", IA, metrics, authorizer=BasicAuthorizer("k", "s"))
    await client.publish("org", "prod", RECORDS)
    assert fake.analytics_records("org", "prod") == RECORDS
    assert fake.publishes == [("org", "prod", 2)]
    headers = fake.last_headers["axpublisher"]
    assert headers["authorization"].startswith("Basic ")
    assert headers["content-type"] == "application/json"
    assert timed(metrics, "POST", "200", env="prod") == 1


async def test_publish_logs_rejected_records(http, fake, metrics, caplog):
    client = AnalyticsClient(http, "axpublisher", IA, metrics, authorizer=BasicAuthorizer("k", "s"))
    fake.malformed_next("axpublisher", b'{"accepted": 1, "rejected": 1}')
    await client.publish("org", "test", RECORDS)
    assert "rejected 1 of 2 records" in caplog.text
    fake.malformed_next("axpublisher", b"ok")  # an answer that is not JSON is only logged by the Go adapter
    await client.publish("org", "test", RECORDS)


async def test_publish_errors(http, fake, metrics):
    client = AnalyticsClient(http, "axpublisher", IA, metrics, authorizer=BasicAuthorizer("k", "s"))
    fake.fail_next("axpublisher", 503)
    with pytest.raises(ApigeeUnavailable):
        await client.publish("org", "test", RECORDS)
    fake.fail_next("axpublisher", 400)
    with pytest.raises(ApigeeRejected) as caught:
        await client.publish("org", "test", RECORDS)
    assert caught.value.status == 400
    fake.drop_next("axpublisher")
    with pytest.raises(ApigeeUnavailable):
        await client.publish("org", "test", RECORDS)
    assert fake.analytics_records("org", "test") == []


# -- construction -------------------------------------------------------------------------------------


async def test_kinds_need_their_credentials_and_their_calls(http, metrics, tmp_path):
    with pytest.raises(ValueError, match="token provider"):
        AnalyticsClient(http, "gcp", GOOGLE, metrics)
    for kind in ("legacy", "axpublisher"):
        with pytest.raises(ValueError, match="authorizer"):
            AnalyticsClient(http, kind, IA, metrics, token=Tokens())
    with pytest.raises(ValueError, match="publishes"):
        await AnalyticsClient(http, "axpublisher", IA, metrics, authorizer=BasicAuthorizer("k", "s")).upload(
            "org", "test", tmp_path / "f.gz", "f.gz"
        )
    with pytest.raises(ValueError, match="uploads files"):
        await legacy(http, metrics).publish("org", "test", RECORDS)


# -- standalone endpoint ------------------------------------------------------------------------------

ENDPOINT = "http://collector.test/ingest/analytics/?source=authz"


class Receiver:
    """A test receiver behind ``httpx.MockTransport``: answers ``statuses`` in turn (then 200), and on a
    2xx gunzips the body and keeps its records and headers."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.records: list[dict] = []
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        if 200 <= status < 300:
            assert request.headers["content-encoding"] == "gzip"
            lines = gzip.decompress(request.content).splitlines()
            self.records += [json.loads(line) for line in lines if line.strip()]
        return httpx.Response(status, headers={"Retry-After": "7"} if status in (429, 503) else {})


def endpoint(http, metrics) -> AnalyticsClient:
    return AnalyticsClient(http, "endpoint", ENDPOINT, metrics)


async def test_endpoint_posts_the_staged_file_as_is(metrics, tmp_path):
    receiver = Receiver()
    path = write_gz(tmp_path / "1715941230-0a1b2c3d-2.gz", RECORDS)
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as http:
        client = endpoint(http, metrics)
        name = client.relative_name("org", "prod", path, 1715941299)
        await client.upload("org", "prod", path, name)
    assert name == "1715941230-0a1b2c3d-2.gz"  # the staged name: the same on every retry
    assert receiver.records == RECORDS
    [request] = receiver.requests
    assert (request.method, str(request.url)) == ("POST", ENDPOINT)  # the URL exactly as configured
    assert request.content == path.read_bytes()
    headers = request.headers
    assert headers["content-type"] == "application/x-ndjson"
    assert headers["content-encoding"] == "gzip"
    assert headers["x-apigee-organization"] == "org"
    assert headers["x-apigee-environment"] == "prod"
    assert headers["x-analytics-file"] == name
    assert int(headers["content-length"]) == path.stat().st_size
    assert "authorization" not in headers
    assert timed(metrics, "POST", "200", env="prod") == 1


@pytest.mark.parametrize("status", [201, 202, 204])
async def test_endpoint_any_2xx_confirms(metrics, tmp_path, status):
    receiver = Receiver(status)
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as http:
        await endpoint(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), "f.gz")
    assert receiver.records == RECORDS


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_endpoint_transient_statuses_are_unavailable(metrics, tmp_path, status):
    receiver = Receiver(status)
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as http:
        with pytest.raises(ApigeeUnavailable, match=f"HTTP {status}") as caught:
            await endpoint(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), "f.gz")
    assert caught.value.retry_after == (7.0 if status in (429, 503) else None)
    assert receiver.records == []
    assert timed(metrics, "POST", str(status)) == 1


@pytest.mark.parametrize("status", [400, 404, 413, 302])
async def test_endpoint_other_statuses_are_rejected(metrics, tmp_path, status):
    async with httpx.AsyncClient(transport=httpx.MockTransport(Receiver(status))) as http:
        with pytest.raises(ApigeeRejected) as caught:
            await endpoint(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), "f.gz")
    assert caught.value.status == status


@pytest.mark.parametrize("status", [401, 403])
async def test_endpoint_refusing_us_pauses_uploads(metrics, tmp_path, status):
    async with httpx.AsyncClient(transport=httpx.MockTransport(Receiver(status))) as http:
        with pytest.raises(ApigeeUnavailable, match=f"POST endpoint: HTTP {status}: credentials") as caught:
            await endpoint(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), "f.gz")
    assert caught.value.retry_after == CREDENTIALS_PAUSE  # not the file's fault: nothing is quarantined


async def test_endpoint_transport_errors_are_unavailable_and_timed_as_error(metrics, tmp_path):
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refused)) as http:
        with pytest.raises(ApigeeUnavailable, match="ConnectError"):
            await endpoint(http, metrics).upload("org", "test", write_gz(tmp_path / "f.gz", RECORDS), "f.gz")
        with pytest.raises(FileNotFoundError):  # a file the buffer dropped: no call at all
            await endpoint(http, metrics).upload("org", "test", tmp_path / "gone.gz", "gone.gz")
    assert timed(metrics, "POST", "error") == 1


async def test_only_an_owned_http_client_is_closed(metrics):
    owned = new_endpoint_http_client()
    assert (owned.timeout.read, owned.follow_redirects) == (30.0, False)
    await AnalyticsClient(owned, "endpoint", ENDPOINT, metrics, owns_http=True).aclose()
    assert owned.is_closed
    async with httpx.AsyncClient() as shared:
        await AnalyticsClient(shared, "endpoint", ENDPOINT, metrics).aclose()
        assert not shared.is_closed
