"""ManagementClient and KeySync against FakeApigee's management API as an httpx transport."""

from __future__ import annotations

import asyncio
import base64
import logging

import httpx
import pytest

from authz.apigee import management
from authz.apigee.key_index import digest
from authz.apigee.key_sync import KeySync
from authz.apigee.management import PAGE_SIZE, ManagementClient
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

GOOGLE = "http://googleapis.test"
TOKEN = "ya29.management"


@pytest.fixture
def fake():
    return FakeApigee(google_token=TOKEN)


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
async def client(fake, metrics):
    async def token() -> str:
        return TOKEN

    async with httpx.AsyncClient(transport=fake.transport(), timeout=2) as http:
        yield ManagementClient(http, GOOGLE, "org", token, metrics)


def sync_for(client, metrics, clock, tmp_path=None, **kw) -> KeySync:
    path = None if tmp_path is None else str(tmp_path / "keys.json")
    return KeySync(client, "org", metrics, clock, 60.0, path, random=lambda: 0.5, **kw)


def sample(metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"org": "org", **labels}) or 0.0


async def test_every_app_over_several_pages(fake, client):
    fake.apps_page_max = 100  # Google's own maximum: pages end on nextPageToken, not on a short page
    for i in range(205):
        fake.add_key(f"key-{i}", app=f"app-{i}", developer_email="dev@example.com", products=["orders"])
    pages = [page async for page in client.apps()]
    assert [len(p["app"]) for p in pages] == [100, 100, 5]
    assert len({a["appId"] for p in pages for a in p["app"]}) == 205


async def test_developers_over_several_pages_each_once(fake, client):
    for i in range(PAGE_SIZE + 3):
        fake.add_developer(f"dev{i:05d}@example.com")
    emails = [d["email"] async for page in client.developers() for d in page["developer"]]
    assert len(emails) == PAGE_SIZE + 3 == len(set(emails))


async def test_errors_are_unavailable_or_rejected(fake, client):
    fake.fail_next("apps", 503)
    with pytest.raises(ApigeeUnavailable):
        [p async for p in client.apps()]
    fake.fail_next("apps", 403)
    with pytest.raises(ApigeeRejected):
        [p async for p in client.apps()]
    fake.malformed_next("developers", b"[1, 2]")
    with pytest.raises(ApigeeUnavailable, match="not a JSON object"):
        [p async for p in client.developers()]
    assert await client.app("no-such-app") is None


async def test_a_sync_indexes_every_key_as_verify_api_key_decides(fake, client, metrics, clock):
    fake.add_key("good", app="orders-app", developer_email="dev@example.com", products=["orders"])
    fake.add_key("revoked", app="orders-app", developer_email="dev@example.com", products=["orders"])
    fake.revoke_key("revoked")
    sync = sync_for(client, metrics, clock)
    assert await sync.sync()
    assert sync.index is not None and len(sync.index) == 2
    good, revoked = sync.index.get(digest("good")), sync.index.get(digest("revoked"))
    assert good is not None and good.active and good.products == ("orders",)
    assert revoked is not None and not revoked.active
    assert sample(metrics, "key_index_keys") == 2 and sample(metrics, "key_syncs_total", result="ok") == 1
    assert sample(metrics, "key_index_synced_timestamp_seconds") == clock.now()


async def test_a_failed_sync_keeps_the_last_good_index_and_backs_off(fake, client, metrics, clock, caplog):
    fake.add_key("good", app="orders-app", developer_email="dev@example.com", products=["orders"])
    sync = sync_for(client, metrics, clock)
    assert await sync.sync()
    first = sync.index
    fake.fail_next("apps", 503, count=3)
    assert not await sync.sync()
    assert sync.index is first and sample(metrics, "key_syncs_total", result="error") == 1
    assert sync.next_delay() == 1.0
    assert not await sync.sync()
    assert sync.next_delay() == 2.0
    assert "good" not in caplog.text


async def test_the_snapshot_serves_a_cold_start_when_apigee_is_down(fake, client, metrics, clock, tmp_path):
    fake.add_key("good", app="orders-app", developer_email="dev@example.com", products=["orders"])
    assert await sync_for(client, metrics, clock, tmp_path).sync()
    text = (tmp_path / "keys.json").read_text()
    assert "good" not in text.replace(digest("good").hex(), "")  # digests only
    assert oct((tmp_path / "keys.json").stat().st_mode & 0o777) == "0o600"

    fake.fail_next("developers", 503)
    cold = sync_for(client, new_metrics(), clock, tmp_path)
    await cold.restore()
    assert cold.index is not None and cold.source == "snapshot"
    found = cold.index.get(digest("good"))
    assert found is not None and found.active and found.app_name == "orders-app"


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"format": 2}', b'{"format": 1, "org": "other", "syncedAt": 1, "credentials": []}',
     b'{"format": 1, "org": "org", "syncedAt": 1, "credentials": [{"app": 1}]}'],
)  # fmt: skip
async def test_an_unusable_snapshot_is_ignored(fake, client, metrics, clock, tmp_path, caplog, content):
    (tmp_path / "keys.json").write_bytes(content)
    fake.fail_next("developers", 503)
    sync = sync_for(client, metrics, clock, tmp_path)
    with caplog.at_level(logging.ERROR):
        await sync.restore()
    assert sync.index is None and "ignoring the key snapshot" in caplog.text


async def test_refresh_app_adds_a_key_created_since_the_sync(fake, client, metrics, clock):
    fake.add_key("old", app="orders-app", developer_email="dev@example.com", products=["orders"])
    sync = sync_for(client, metrics, clock)
    await sync.sync()
    fake.add_key("new", app="orders-app", developer_email="dev@example.com", products=["orders"])
    assert sync.index is not None and sync.index.get(digest("new")) is None
    app = fake.directory.find_app("dev@example.com", "orders-app")
    await sync.refresh_app(app.app_id)
    found = sync.index.get(digest("new"))
    assert found is not None and found.active


async def test_a_listing_that_does_not_advance_is_refused(fake, client):
    fake.malformed_next("apps", b'{"app": [], "nextPageToken": "same"}', count=2)
    with pytest.raises(ApigeeUnavailable, match="same page token"):
        [p async for p in client.apps()]


async def test_a_developers_page_must_start_at_its_start_key(fake, client, monkeypatch):
    for i in range(PAGE_SIZE + 1):
        fake.add_developer(f"dev{i:05d}@example.com")
    pages = client.developers()
    first = await anext(pages)
    assert len(first["developer"]) == PAGE_SIZE
    fake.malformed_next("developers", b'{"developer": [{"email": "elsewhere@example.com"}]}')
    with pytest.raises(ApigeeUnavailable, match="does not start at its startKey"):
        await anext(pages)


async def test_transport_errors_are_unavailable_and_timed(fake, client, metrics):
    fake.drop_next("app")
    with pytest.raises(ApigeeUnavailable):
        await client.app("x")
    labels = {"env": "", "api": "app", "code": "error", "method": "GET"}
    assert sample(metrics, "apigee_requests_seconds_count", **labels) == 1


async def test_run_syncs_until_stopped(fake, client, metrics, clock):
    fake.add_key("good", app="orders-app", developer_email="dev@example.com", products=["orders"])
    sync = KeySync(client, "org", metrics, clock, 0.01, None)
    task = asyncio.ensure_future(sync.run())
    while sample(metrics, "key_syncs_total", result="ok") < 2:
        await asyncio.sleep(0.01)
    sync.stop()
    await task
    assert sync.index is not None and len(sync.index) == 1


async def test_a_snapshot_that_cannot_be_written_is_counted(fake, client, metrics, clock, tmp_path):
    (tmp_path / "file").write_text("")
    sync = KeySync(client, "org", metrics, clock, 60.0, str(tmp_path / "file" / "keys.json"))
    assert await sync.sync()
    assert sample(metrics, "key_syncs_total", result="snapshot_error") == 1


async def test_no_snapshot_no_index(fake, client, metrics, clock, tmp_path, caplog):
    sync = sync_for(client, metrics, clock, tmp_path)
    with caplog.at_level(logging.INFO):
        await sync.restore()
    assert sync.index is None and sync.source == "none" and "no key snapshot" in caplog.text


async def test_restore_without_a_snapshot_path_does_nothing(fake, client, metrics, clock):
    sync = sync_for(client, metrics, clock)
    await sync.restore()
    assert sync.index is None and sync.generation == 0


async def test_refresh_app_failures_leave_the_index(fake, client, metrics, clock, caplog):
    fake.add_key("good", app="orders-app", developer_email="dev@example.com", products=["orders"])
    sync = sync_for(client, metrics, clock)
    await sync.refresh_app("x")  # no index yet: nothing to add to
    await sync.sync()
    fake.fail_next("app", 500)
    await sync.refresh_app(fake.directory.find_app("dev@example.com", "orders-app").app_id)
    await sync.refresh_app("unknown-app")  # 404: nothing added
    assert sync.index is not None and len(sync.index) == 1 and "key sync of app" in caplog.text


@pytest.mark.parametrize(
    ("body", "problem"),
    [(b"<html>", "not JSON"), (b'{"developer": {}}', "not a list"),
     (b'{"developer": [' + b'{"status": "active"},' * (PAGE_SIZE - 1) + b'{"status": "active"}]}', "no email")],
)  # fmt: skip
async def test_malformed_developer_pages_are_unavailable(fake, client, body, problem):
    fake.malformed_next("developers", body)
    with pytest.raises(ApigeeUnavailable, match=problem):
        [p async for p in client.developers()]


# -- Apigee Edge: Basic auth, apps paged by an inclusive appId startKey ---------------------------------

EDGE = "http://edge.test"
EDGE_USER = ("reader@example.com", "pw:with-colon")


@pytest.fixture
async def edge(fake, metrics):
    fake.management_basic = EDGE_USER
    async with httpx.AsyncClient(transport=fake.transport(), timeout=2) as http:
        yield ManagementClient(http, EDGE, "org", None, metrics, basic=EDGE_USER)


@pytest.mark.parametrize(("count", "sizes"), [(10, [3, 2, 2, 2, 1]), (7, [3, 2, 2, 0]), (2, [2]), (0, [0])])
async def test_edge_lists_every_app_exactly_once(fake, metrics, monkeypatch, count, sizes):
    monkeypatch.setattr(management, "EDGE_APPS_ROWS", 3)
    fake.apps_rows_max = 3
    fake.management_basic = EDGE_USER
    for i in range(count):
        fake.add_key(f"key-{i}", app=f"app-{i}", developer_email="dev@example.com", products=["orders"])
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    hooks = {"request": [record]}
    async with httpx.AsyncClient(transport=fake.transport(), event_hooks=hooks) as http:
        client = ManagementClient(http, EDGE, "org", None, metrics, basic=EDGE_USER)
        pages = [page async for page in client.apps()]
    ids = [a["appId"] for p in pages for a in p["app"]]
    assert [len(p["app"]) for p in pages] == sizes
    assert ids == sorted(fake.directory.apps) and len(set(ids)) == count
    queries = [dict(r.url.params) for r in sent]
    first = {"expand": "true", "includeCred": "true", "rows": "3"}
    assert queries == [first] + [{**first, "startKey": p["app"][-1]["appId"]} for p in pages[:-1]]
    assert all(str(r.url).startswith(f"{EDGE}/v1/organizations/org/apps?") for r in sent)
    labels = {"env": "", "api": "apps", "code": "200", "method": "GET"}
    assert sample(metrics, "apigee_requests_seconds_count", **labels) == len(sizes)


async def test_edge_sends_basic_auth_on_every_call(fake, edge):
    app_id = fake.add_app("orders-app", "dev@example.com")
    expected = "Basic " + base64.b64encode(b"reader@example.com:pw:with-colon").decode()
    assert [len(p["app"]) async for p in edge.apps()] == [1]
    assert [len(p["developer"]) async for p in edge.developers()] == [1]
    found = await edge.app(app_id)
    assert found is not None and found["appId"] == app_id
    for endpoint in ("apps", "developers", "app"):
        assert fake.last_headers[endpoint]["authorization"] == expected
    fake.management_basic = ("reader@example.com", "rotated")
    with pytest.raises(ApigeeRejected) as refused:
        [p async for p in edge.apps()]
    assert refused.value.status == 401 and "pw" not in str(refused.value)


async def test_an_edge_page_must_start_at_its_start_key(fake, edge, monkeypatch):
    monkeypatch.setattr(management, "EDGE_APPS_ROWS", 3)
    for i in range(4):
        fake.add_app(f"app-{i}", "dev@example.com")
    pages = edge.apps()
    assert len((await anext(pages))["app"]) == 3
    fake.malformed_next("apps", b'{"app": [{"appId": "elsewhere"}, {"appId": "later"}]}')
    with pytest.raises(ApigeeUnavailable, match="does not start at its startKey"):
        await anext(pages)


@pytest.mark.parametrize(
    ("body", "problem"),
    [(b'{"app": [{"appId": "a"}, {"appId": "b"}, {"name": "no id"}]}', "last app of a page has no appId"),
     (b'{"app": {}}', "'app' is not a list")],
)  # fmt: skip
async def test_malformed_edge_pages_are_unavailable(fake, edge, monkeypatch, body, problem):
    monkeypatch.setattr(management, "EDGE_APPS_ROWS", 3)
    fake.malformed_next("apps", body)
    with pytest.raises(ApigeeUnavailable, match=problem):
        [p async for p in edge.apps()]


async def test_listings_longer_than_max_pages_are_refused(fake, client, edge, monkeypatch):
    monkeypatch.setattr(management, "MAX_PAGES", 2)
    monkeypatch.setattr(management, "EDGE_APPS_ROWS", 2)
    fake.apps_page_max = 1  # Apigee X: 3 apps, one a page
    for i in range(3):
        fake.add_app(f"app-{i}", "dev@example.com")
    with pytest.raises(ApigeeUnavailable, match="more than 2 pages"):
        [p async for p in edge.apps()]  # Edge: 2 apps, then 1 new of 2 a page: a third page
    fake.management_basic = None
    with pytest.raises(ApigeeUnavailable, match="more than 2 pages"):
        [p async for p in client.apps()]


@pytest.mark.parametrize("basic", [None, EDGE_USER])
async def test_the_client_needs_exactly_one_of_token_and_basic(metrics, basic):
    async def token() -> str:
        return TOKEN

    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="exactly one"):
            ManagementClient(http, EDGE, "org", token if basic else None, metrics, basic=basic)


async def test_a_sync_over_edge_indexes_every_key(fake, edge, metrics, clock, monkeypatch):
    monkeypatch.setattr(management, "EDGE_APPS_ROWS", 3)
    fake.apps_rows_max = 3
    for i in range(8):
        fake.add_key(f"key-{i}", app=f"app-{i}", developer_email=f"dev{i % 2}@example.com", products=["p"])
    fake.revoke_key("key-5")
    sync = sync_for(edge, metrics, clock)
    assert await sync.sync()
    assert sync.index is not None and len(sync.index) == 8
    for i in range(8):
        found = sync.index.get(digest(f"key-{i}"))
        assert found is not None and found.active == (i != 5) and found.app_name == f"app-{i}"
    assert sample(metrics, "key_index_keys") == 8 and sample(metrics, "key_syncs_total", result="ok") == 1


async def test_app_errors_other_than_not_found_raise(fake, client):
    fake.fail_next("app", 403)
    with pytest.raises(ApigeeRejected):
        await client.app("x")


async def test_an_oversized_answer_is_unavailable(fake, client, monkeypatch):
    monkeypatch.setattr(management, "MAX_BODY_BYTES", 10)
    fake.add_app("orders-app", "dev@example.com")
    with pytest.raises(ApigeeUnavailable, match="answer over 10 bytes"):
        [p async for p in client.apps()]


async def test_refresh_app_learns_a_developer_who_signed_up_since_the_listing(fake, client, metrics, clock):
    fake.add_key("old", app="orders-app", developer_email="dev@example.com", products=["orders"])
    sync = sync_for(client, metrics, clock)
    await sync.sync()
    fake.add_key("new", app="first-app", developer_email="Newcomer@Example.com", products=["orders"])
    app = fake.directory.find_app("newcomer@example.com", "first-app")
    await sync.refresh_app(app.app_id)
    found = sync.index.get(digest("new"))
    assert found is not None and found.active and found.developer_email == "newcomer@example.com"
    assert fake.calls["developer"] == 1
    fake.add_key("newer", app="first-app", developer_email="newcomer@example.com", products=["orders"])
    await sync.refresh_app(app.app_id)
    assert fake.calls["developer"] == 1  # known now


async def test_refresh_app_after_a_restart_from_the_snapshot(fake, client, metrics, clock, tmp_path):
    fake.add_key("old", app="orders-app", developer_email="dev@example.com", products=["orders"])
    assert await sync_for(client, metrics, clock, tmp_path).sync()
    restarted = sync_for(client, new_metrics(), clock, tmp_path)
    await restarted.restore()
    fake.add_key("new", app="orders-app", developer_email="dev@example.com", products=["orders"])
    fake.set_developer_status("dev@example.com", "inactive")
    await restarted.refresh_app(fake.directory.find_app("dev@example.com", "orders-app").app_id)
    found = restarted.index.get(digest("new"))
    assert found is not None and not found.active  # the developer as Apigee has it now


async def test_one_developer_by_email_or_id(fake, client):
    developer_id = fake.add_developer("dev@example.com")
    by_email, by_id = await client.developer("DEV@example.com"), await client.developer(developer_id)
    assert by_email == by_id and by_email is not None and by_email["status"] == "active"
    assert await client.developer("nobody@example.com") is None
