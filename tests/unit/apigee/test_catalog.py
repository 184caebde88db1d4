"""ApigeeCatalog against the stateful fake of the remote-service API, with a real ApigeeClient."""

import asyncio
import json
import logging
import os
import stat

import httpx
import pytest

from authz.apigee.catalog import SNAPSHOT_FORMAT, ApigeeCatalog
from authz.apigee.client import ApigeeClient
from authz.apigee.signer import BasicAuthorizer
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

ORG = "org"
LOGGER = "authz.apigee.catalog"


def product(name, *resources, **extra):
    return {"name": name, "environments": ["test"], "apiResources": list(resources or ["/"]),
            "attributes": [{"name": "apigee-remote-service-targets", "value": "httpbin.org"}], **extra}  # fmt: skip


PRODUCTS = [product("httpbin-product", "/headers", quota="5", quotaInterval="1", quotaTimeUnit="minute"),
            product("orders", "/v1/orders/**")]  # fmt: skip


@pytest.fixture
def fake():
    fake = FakeApigee(basic_auth=("k", "s"))
    fake.set_products(PRODUCTS)
    return fake


@pytest.fixture
async def http(fake):
    async with httpx.AsyncClient(transport=fake.transport(), timeout=2) as http:
        yield http


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
def snapshot(tmp_path):
    return str(tmp_path / "state" / "products.json")


@pytest.fixture
def make(http, clock, metrics, snapshot):
    def make(snapshot_path=snapshot, refresh_rate=120.0, random=lambda: 0.5, clock=clock, metrics=metrics):
        client = ApigeeClient(
            http, "http://apigee.test/remote-service", BasicAuthorizer("k", "s"), metrics, ORG, "test"
        )
        return ApigeeCatalog(client, ORG, metrics, clock, refresh_rate, snapshot_path, random=random)

    return make


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, {"org": ORG, **labels})


def reloads(metrics, result):
    return sample(metrics, "catalog_reloads_total", result=result) or 0.0


async def test_first_load_installs_the_catalog(make, fake, metrics, clock):
    catalog = make()
    assert catalog.current() is None
    await catalog.load()
    current = catalog.current()
    assert set(current.products) == {"httpbin-product", "orders"}
    assert current.products["httpbin-product"].quota.limit == 5
    assert current.credentials == {}
    assert current.loaded_at == clock.now()
    assert not catalog.from_snapshot
    assert "if-none-match" not in fake.last_headers["products"]
    assert sample(metrics, "products_cached") == 2
    assert sample(metrics, "catalog_from_snapshot") == 0
    assert sample(metrics, "catalog_loaded_timestamp_seconds") == clock.now()
    assert reloads(metrics, "ok") == 1


async def test_304_keeps_the_same_catalog_object(make, fake, metrics, clock, caplog):
    catalog = make()
    await catalog.load()
    first = catalog.current()
    clock.advance(120)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert await catalog.refresh()
    assert catalog.current() is first
    assert fake.last_headers["products"]["if-none-match"] == fake.products_etag
    assert reloads(metrics, "unchanged") == 1
    assert sample(metrics, "catalog_loaded_timestamp_seconds") == clock.now()  # confirmed current
    assert "unchanged (304)" in caplog.text


async def test_changed_products_swap_the_catalog(make, fake, metrics):
    catalog = make()
    await catalog.load()
    first = catalog.current()
    fake.set_products([product("new-one")])
    assert await catalog.refresh()
    assert catalog.current() is not first
    assert set(catalog.current().products) == {"new-one"}
    assert set(first.products) == {"httpbin-product", "orders"}  # the old snapshot was not mutated
    assert sample(metrics, "products_cached") == 1


def _fail_5xx(fake):
    fake.fail_next("products", 503)


def _fail_429(fake):
    fake.fail_next("products", 429, headers={"Retry-After": "1"})


def _fail_401(fake):
    fake.fail_next("products", 401)


def _drop(fake):
    fake.drop_next("products")


def _html(fake):
    fake.malformed_next("products", b"<html>maintenance</html>", content_type="text/html")


def _truncated(fake):
    fake.malformed_next("products", b'{"apiProduct": [{"name": "x", "environ')


def _wrong_shape(fake):
    fake.malformed_next("products", b'{"apiProduct": {"name": "x"}}')


@pytest.mark.parametrize("fault", [_fail_5xx, _fail_429, _fail_401, _drop, _html, _truncated, _wrong_shape])
async def test_a_failed_poll_keeps_the_last_good_catalog_and_backs_off(make, fake, metrics, fault, caplog):
    catalog = make()
    await catalog.load()
    good = catalog.current()
    assert catalog.next_delay() == 120.0
    fake.set_products([product("should-not-appear")])
    fault(fake)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not await catalog.refresh()
    assert catalog.current() is good
    assert reloads(metrics, "error") == 1
    assert catalog.next_delay() == 1.0
    assert "keeping the last good catalog" in caplog.text
    assert "Basic" not in caplog.text
    assert await catalog.refresh()  # the fault was one-shot: the next poll installs the change
    assert set(catalog.current().products) == {"should-not-appear"}
    assert catalog.next_delay() == 120.0


async def test_backoff_doubles_up_to_the_refresh_rate_and_resets(make, fake):
    catalog = make(refresh_rate=10.0)
    fake.fail_next("products", 503, count=6)
    delays = []
    for _ in range(6):
        assert not await catalog.refresh()
        delays.append(catalog.next_delay())
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert await catalog.refresh()
    assert catalog.next_delay() == 10.0


async def test_backoff_starts_at_the_refresh_rate_when_smaller_and_is_jittered(make, fake):
    draws = iter([0.0, 1.0])
    catalog = make(refresh_rate=0.5, random=lambda: next(draws))
    fake.fail_next("products", 503)
    await catalog.refresh()
    assert catalog.next_delay() == pytest.approx(0.45)  # -10 %
    assert catalog.next_delay() == pytest.approx(0.55)  # +10 %


async def test_invalid_products_are_skipped_and_the_rest_kept(make, fake, caplog):
    fake.set_products([
        product("bad-pattern", "/a/**/b"),
        product("bad-quota", quota="abc"),
        product("good", "/v1/*/items"),
        {"displayName": "no name"},
    ])  # fmt: skip
    catalog = make()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await catalog.load()
    assert set(catalog.current().products) == {"good"}
    assert "'bad-pattern' skipped" in caplog.text
    assert "'bad-quota' skipped" in caplog.text


async def test_null_quota_strings_and_unknown_fields(make, fake):
    group = {"operationConfigType": "remoteservice", "operationConfigs": [
        {"apiSource": "quota-demo", "operations": [{"resource": "/get", "methods": ["GET"]}],
         "quota": {"limit": "null", "interval": "null", "timeUnit": "null"}, "newField": 1}]}  # fmt: skip
    fake.set_products([
        product("nulls", quota="null", quotaInterval="null", quotaTimeUnit="null", approvalType="auto",
                createdAt=1700000000000, someFutureField={"nested": [1, 2]}),
        product("grouped", operationGroup=group),
    ])  # fmt: skip
    catalog = make()
    await catalog.load()
    products = catalog.current().products
    assert products["nulls"].quota is None
    assert products["grouped"].operation_configs[0].quota is None
    assert products["grouped"].operation_configs[0].api_source == "quota-demo"


async def test_duplicate_names_last_one_wins(make, fake, caplog):
    fake.set_products([product("dup", "/first"), product("dup", "/second")])
    catalog = make()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await catalog.load()
    assert [r.resource for r in catalog.current().products["dup"].api_resources] == ["/second"]
    assert "more than once" in caplog.text


async def test_an_empty_product_list_is_installed_with_a_warning(make, fake, metrics, caplog):
    catalog = make()
    await catalog.load()
    fake.set_products([])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await catalog.refresh()
    assert catalog.current() is not None and catalog.current().products == {}
    assert sample(metrics, "products_cached") == 0
    assert "no products; the previous catalog had 2" in caplog.text


async def test_304_while_holding_no_catalog_refetches_without_the_etag(make, fake):
    fake.fail_next("products", 304, body=b"", headers={"ETag": "stale"})
    catalog = make()
    await catalog.load()
    assert fake.calls["products"] == 2
    assert set(catalog.current().products) == {"httpbin-product", "orders"}
    fake.fail_next("products", 304, count=2, body=b"")
    fresh = make(snapshot_path=None)
    await fresh.load()
    assert fresh.current() is None  # a 304 to a request without If-None-Match is not an answer


async def test_a_good_answer_writes_a_private_snapshot(make, fake, snapshot, clock):
    await make().load()
    assert stat.S_IMODE(os.stat(snapshot).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(snapshot)).st_mode) == 0o700
    with open(snapshot) as file:
        document = json.load(file)
    assert document["format"] == SNAPSHOT_FORMAT and document["org"] == ORG
    assert document["etag"] == fake.products_etag and document["fetchedAt"] == clock.now()
    assert [p["name"] for p in document["apiProduct"]] == ["httpbin-product", "orders"]
    assert os.listdir(os.path.dirname(snapshot)) == ["products.json"]  # no temp file left behind


async def test_cold_start_during_an_outage_serves_the_snapshot_until_apigee_answers(
    make, fake, metrics, clock, caplog
):
    await make(metrics=new_metrics()).load()  # an earlier run wrote the snapshot
    fetched_at = clock.now()
    clock.advance(3600)
    fake.drop_next("products")
    catalog = make()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await catalog.load()
    assert set(catalog.current().products) == {"httpbin-product", "orders"}
    assert catalog.from_snapshot
    assert sample(metrics, "catalog_from_snapshot") == 1
    assert sample(metrics, "catalog_loaded_timestamp_seconds") == fetched_at
    assert sample(metrics, "products_cached") == 2
    assert reloads(metrics, "error") == 1
    assert "fetched 3600 s ago" in caplog.text

    fake.fail_next("products", 503)
    assert not await catalog.refresh()
    assert catalog.from_snapshot
    fake.set_products([product("recovered")])
    assert await catalog.refresh()
    assert fake.last_headers["products"]["if-none-match"]  # the snapshot's ETag
    assert set(catalog.current().products) == {"recovered"}
    assert not catalog.from_snapshot
    assert sample(metrics, "catalog_from_snapshot") == 0
    assert sample(metrics, "catalog_loaded_timestamp_seconds") == clock.now()


async def test_a_304_for_the_snapshot_etag_confirms_the_snapshot(make, fake, metrics):
    await make(metrics=new_metrics()).load()
    fake.fail_next("products", 503)
    catalog = make()
    await catalog.load()
    from_disk = catalog.current()
    assert catalog.from_snapshot
    assert await catalog.refresh()
    assert fake.last_headers["products"]["if-none-match"] == fake.products_etag
    assert catalog.current() is from_disk
    assert not catalog.from_snapshot
    assert sample(metrics, "catalog_from_snapshot") == 0


def _document(**changes):
    good = {"format": SNAPSHOT_FORMAT, "org": ORG, "fetchedAt": 1.0, "etag": None, "apiProduct": []}
    return json.dumps({**good, **changes}).encode()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        _document(format=999),
        _document(org="other"),
        _document(apiProduct={}),
        _document(apiProduct=["x"]),
        _document(fetchedAt=True),
        _document(etag=5),
    ],
    ids=["garbage", "binary", "not-object", "format", "org", "products", "product", "fetched-at", "etag"],
)
async def test_an_unusable_snapshot_is_logged_and_ignored(make, fake, snapshot, metrics, content, caplog):
    os.makedirs(os.path.dirname(snapshot))
    with open(snapshot, "wb") as file:
        file.write(content)
    fake.fail_next("products", 503)
    catalog = make()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        await catalog.load()
    assert catalog.current() is None
    assert not catalog.from_snapshot
    assert "ignoring the products snapshot" in caplog.text


async def test_no_catalog_without_apigee_or_snapshot(make, fake, tmp_path):
    fake.fail_next("products", 503, count=2)
    missing = make()
    await missing.load()
    assert missing.current() is None
    disabled = make(snapshot_path=None)
    await disabled.load()
    assert disabled.current() is None
    assert not list(tmp_path.iterdir())


async def test_the_snapshot_is_not_read_when_apigee_answers(make, fake, snapshot, metrics):
    await make(metrics=new_metrics()).load()
    fake.set_products([product("live")])
    catalog = make()
    await catalog.load()
    assert set(catalog.current().products) == {"live"}
    assert not catalog.from_snapshot


async def test_a_snapshot_write_failure_is_counted_and_serving_goes_on(make, fake, tmp_path, metrics, caplog):
    (tmp_path / "a-file").write_text("")
    catalog = make(snapshot_path=str(tmp_path / "a-file" / "products.json"))  # cannot create the directory
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        await catalog.load()
    assert set(catalog.current().products) == {"httpbin-product", "orders"}
    assert reloads(metrics, "snapshot_error") == 1
    assert "cannot write the products snapshot" in caplog.text
    (tmp_path / "taken" / "sub").mkdir(parents=True)
    catalog = make(snapshot_path=str(tmp_path / "taken"))  # cannot replace a directory
    await catalog.load()
    assert catalog.current() is not None
    assert reloads(metrics, "snapshot_error") == 2
    assert sorted(os.listdir(tmp_path)) == ["a-file", "taken"]  # the temp file was removed


async def test_no_snapshot_path_writes_nothing(make, tmp_path):
    catalog = make(snapshot_path=None)
    await catalog.load()
    assert catalog.current() is not None
    assert not list(tmp_path.iterdir())


class _BrokenClock(FakeClock):
    def __init__(self):
        super().__init__()
        self.broken = False

    def now(self):
        if self.broken:
            raise RuntimeError("clock went away")
        return super().now()


async def test_an_unexpected_error_is_logged_and_keeps_the_catalog(make, fake, metrics, caplog):
    clock = _BrokenClock()
    catalog = make(clock=clock)
    await catalog.load()
    good = catalog.current()
    fake.set_products([product("changed")])
    clock.broken = True
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not await catalog.refresh()
    assert catalog.current() is good
    assert reloads(metrics, "error") == 1
    assert "clock went away" in caplog.text


async def _until(condition):
    async with asyncio.timeout(2):
        while not condition():
            await asyncio.sleep(0.005)


async def test_run_polls_through_failures_and_stops_promptly(make, fake):
    catalog = make(refresh_rate=0.01)
    fake.fail_next("products", 503, count=3)
    task = asyncio.create_task(catalog.run())
    await _until(lambda: catalog.current() is not None)
    assert fake.calls["products"] == 4
    await _until(lambda: fake.calls["products"] >= 6)  # then 304s
    catalog.stop()
    async with asyncio.timeout(1):
        await task


async def test_stop_interrupts_the_wait_and_a_poll_in_flight(make, fake):
    waiting = make(refresh_rate=3600)
    task = asyncio.create_task(waiting.run())
    await asyncio.sleep(0.01)
    waiting.stop()
    async with asyncio.timeout(1):
        await task
    fake.set_delay("products", 30)
    polling = make(refresh_rate=0.01)
    task = asyncio.create_task(polling.run())
    await _until(lambda: fake.calls["products"] >= 1)
    polling.stop()
    async with asyncio.timeout(1):
        await task
    assert polling.current() is None


@pytest.mark.parametrize(("header", "delay"), [("30", 30.0), ("0", 1.0), ("99999", 600.0), ("soon", 1.0)])
async def test_retry_after_lengthens_the_backoff(make, fake, header, delay):
    catalog = make()
    fake.fail_next("products", 429, headers={"Retry-After": header})
    assert not await catalog.refresh()
    assert catalog.next_delay() == delay
    assert await catalog.refresh()
    assert catalog.next_delay() == 120.0  # the hint is forgotten after a success
