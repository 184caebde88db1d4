"""Uploader: staged gzip NDJSON files to FakeApigee (an httpx transport), driven by drain() + FakeClock."""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from authz.analytics.uploader import BACKOFF_MAX, PERMANENT_ATTEMPTS, Uploader
from authz.apigee.analytics import CREDENTIALS_PAUSE, AnalyticsClient
from authz.apigee.signer import BasicAuthorizer
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

IA = "http://apigee.test/edgemicro"
GOOGLE = "http://googleapis.test"


@dataclass(frozen=True)
class Staged:
    path: Path
    tenant: tuple[str, str]
    records: int
    bytes: int


class Source:
    """The buffer's side, in memory: a list of files written under tmp_path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: list[Staged] = []
        self.quarantined: list[tuple[Staged, str]] = []
        self.done_calls = 0
        self.fail_done = False

    def add(self, org: str, env: str, records: list[dict] | int, name: str | None = None) -> Staged:
        if isinstance(records, int):
            records = [{"gateway_flow_id": f"{org}-{env}-{i}", "organization": org, "environment": env}
                       for i in range(records)]  # fmt: skip
        path = self.directory / (name or f"{len(self.files) + 1:04d}-{org}~{env}.gz")
        path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))
        file = Staged(path, (org, env), len(records), path.stat().st_size)
        self.files.append(file)
        return file

    def staged(self) -> list[Staged]:
        return list(self.files)

    def done(self, file: Staged) -> None:
        self.done_calls += 1
        if self.fail_done:
            raise OSError("read-only file system")
        self.files.remove(file)
        file.path.unlink()

    def quarantine(self, file: Staged, reason: str) -> None:
        self.files.remove(file)
        self.quarantined.append((file, reason))


class Tokens:
    async def __call__(self) -> str:
        return "ya29.t"


@pytest.fixture
def fake():
    return FakeApigee(basic_auth=("k", "s"))


@pytest.fixture
def source(tmp_path):
    return Source(tmp_path)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def http(fake):
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        yield http


def make(source, http, metrics, clock, kind="legacy", **options) -> Uploader:
    if kind == "gcp":
        client = AnalyticsClient(http, "gcp", GOOGLE, metrics, token=Tokens())
    else:
        client = AnalyticsClient(http, kind, IA, metrics, authorizer=BasicAuthorizer("k", "s"))
    options.setdefault("random", lambda: 1.0)  # no jitter: the full backoff step
    return Uploader(source, client, "org", metrics, clock, **options)


def uploads(metrics, result: str, org: str = "org", env: str = "test") -> float:
    labels = {"org": org, "env": env, "result": result}
    return metrics.registry.get_sample_value("analytics_uploads_total", labels) or 0


def uploaded_records(metrics, org: str = "org", env: str = "test") -> float:
    labels = {"org": org, "env": env, "status": "uploaded"}
    return metrics.registry.get_sample_value("analytics_records_total", labels) or 0


def quarantined(metrics, reason: str) -> float:
    labels = {"org": "org", "reason": reason}
    return metrics.registry.get_sample_value("analytics_files_quarantined_total", labels) or 0


async def until(condition) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.001)


def ids(fake, org="org", env="test") -> list[str]:
    return [r["gateway_flow_id"] for r in fake.analytics_records(org, env)]


# -- uploads and attribution --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["legacy", "gcp", "axpublisher"])
async def test_each_file_goes_to_its_own_tenant(fake, source, http, metrics, clock, kind):
    # Files left by earlier configs (another env, another org) next to the current tenant's.
    source.add("org", "test", 3)
    source.add("org", "prod", 2)
    source.add("other-org", "test", 1)
    uploader = make(source, http, metrics, clock, kind)
    assert await uploader.drain() == 3
    assert ids(fake) == ["org-test-0", "org-test-1", "org-test-2"]
    assert ids(fake, "org", "prod") == ["org-prod-0", "org-prod-1"]
    assert ids(fake, "other-org", "test") == ["other-org-test-0"]
    if kind != "axpublisher":
        assert sorted(u[:2] for u in fake.uploads) == [
            ("org", "prod"),
            ("org", "test"),
            ("other-org", "test"),
        ]
    assert source.files == [] and list(source.directory.iterdir()) == []
    assert uploads(metrics, "ok") == uploads(metrics, "ok", env="prod") == 1
    assert uploads(metrics, "ok", org="other-org") == 1
    assert uploaded_records(metrics) == 3 and uploaded_records(metrics, env="prod") == 2
    assert uploaded_records(metrics, org="other-org") == 1
    assert await uploader.drain() == 0


async def test_legacy_relative_path_uses_the_clock_and_the_file_name(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1, name="1800000000-42.gz")
    await make(source, http, metrics, clock).drain()
    # FakeClock starts at 1_800_000_000 = 2027-01-15 08:00:00 UTC
    assert fake.uploads == [("org", "test", f"date=2027-01-15/time=08-00-00/{file.path.name}")]


async def test_workers_upload_concurrently_and_never_take_a_file_twice(fake, source, metrics, clock):
    started: list[str] = []
    release = asyncio.Event()

    async def gated(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            started.append(request.url.params["relative_file_path"].rsplit("/", 1)[1])
            await release.wait()
        return await fake.handler(request)

    for _ in range(2):
        source.add("org", "test", 1)
    async with httpx.AsyncClient(transport=httpx.MockTransport(gated)) as http:
        uploader = make(source, http, metrics, clock, workers=2)
        draining = asyncio.create_task(uploader.drain())
        await until(lambda: len(started) == 2)  # both PUTs in flight at once
        assert sorted(started) == ["0001-org~test.gz", "0002-org~test.gz"]
        assert await uploader.drain() == 0  # files in flight are not taken twice
        release.set()
        assert await draining == 2
    assert len(fake.uploads) == 2 and source.files == []


# -- transient errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["analytics_url", "signed_put"])
async def test_transient_error_then_success_loses_nothing(fake, source, http, metrics, clock, endpoint):
    file = source.add("org", "test", 4)
    uploader = make(source, http, metrics, clock)
    fake.fail_next(endpoint, 503)
    assert await uploader.drain() == 0
    assert source.files == [file] and file.path.exists()  # never deleted unconfirmed
    state = uploader.retry_state(file.path)
    assert (state.failures, state.permanent_failures, state.delay) == (1, 0, 0.2)
    assert state.due == clock.monotonic() + 0.2
    calls = sum(fake.calls.values())
    assert await uploader.drain() == 0 and sum(fake.calls.values()) == calls  # still backing off
    clock.advance(0.2)
    assert await uploader.drain() == 1
    assert ids(fake) == [f"org-test-{i}" for i in range(4)]
    assert uploads(metrics, "transient_error") == 1 and uploads(metrics, "ok") == 1
    assert uploaded_records(metrics) == 4
    assert uploader.retry_state(file.path) is None and source.files == []


async def test_backoff_doubles_with_jitter_and_is_capped(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    draws = iter([1.0, 1.0, 1.0, 0.0] + [1.0] * 20)
    uploader = make(source, http, metrics, clock, random=lambda: next(draws))
    delays = []
    for _ in range(12):
        fake.fail_next("analytics_url", 502)
        await uploader.drain()
        delays.append(uploader.retry_state(file.path).delay)
        clock.advance(delays[-1])
    assert delays[:5] == [0.2, 0.4, 0.8, 0.8, 3.2]  # the 4th drew the most jitter: half of 1.6
    assert delays[-1] == BACKOFF_MAX and max(delays) == BACKOFF_MAX
    assert uploads(metrics, "transient_error") == 12 and source.files == [file]


async def test_retry_after_is_honoured(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock)
    fake.fail_next("analytics_url", 429, headers={"Retry-After": "30"})
    await uploader.drain()
    assert uploader.retry_state(file.path).delay == 30.0  # not the 0.2 s first step
    clock.advance(29.9)
    assert await uploader.drain() == 0
    assert fake.calls["analytics_url"] == 1
    clock.advance(0.1)
    assert await uploader.drain() == 1


async def test_retry_after_shorter_than_the_backoff_does_not_shorten_it(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock)
    delays = []
    for _ in range(4):
        fake.fail_next("signed_put", 503, headers={"Retry-After": "1"})
        await uploader.drain()
        delays.append(uploader.retry_state(file.path).delay)
        clock.advance(delays[-1])
    assert delays == [1.0, 1.0, 1.0, 1.6]


async def test_an_outage_holds_the_other_files(fake, source, http, metrics, clock):
    for _ in range(3):
        source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock, workers=1)
    fake.fail_next("analytics_url", 503)
    assert await uploader.drain() == 0
    assert fake.calls["analytics_url"] == 1  # not one failing call per staged file
    assert await uploader.drain() == 0 and fake.calls["analytics_url"] == 1
    clock.advance(0.2)
    assert await uploader.drain() == 3
    assert uploads(metrics, "ok") == 3


async def test_transport_errors_are_transient(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock)
    fake.drop_next("signed_put")
    await uploader.drain()
    assert uploader.retry_state(file.path).failures == 1 and source.files == [file]
    assert uploads(metrics, "transient_error") == 1


# -- permanent errors ---------------------------------------------------------------------------------


async def test_permanent_403_is_quarantined_after_three_attempts(fake, source, http, metrics, clock):
    file = source.add("org", "test", 2)
    uploader = make(source, http, metrics, clock)
    fake.fail_next("signed_put", 403, count=PERMANENT_ATTEMPTS)
    for attempt in range(1, PERMANENT_ATTEMPTS):
        assert await uploader.drain() == 0
        state = uploader.retry_state(file.path)
        assert (state.permanent_failures, source.quarantined) == (attempt, [])
        clock.advance(state.delay)
    assert await uploader.drain() == 0
    assert source.quarantined == [(file, "permanent_error")]
    assert file.path.exists()  # set aside, not deleted
    assert uploads(metrics, "permanent_error") == PERMANENT_ATTEMPTS
    assert quarantined(metrics, "permanent_error") == 0  # counted by source.quarantine(), not twice
    assert uploaded_records(metrics) == 0 and fake.uploads == []
    assert uploader.retry_state(file.path) is None
    clock.advance(3600)
    assert await uploader.drain() == 0 and fake.calls["signed_put"] == PERMANENT_ATTEMPTS  # never again


async def test_one_stray_403_is_not_fatal(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock)
    fake.fail_next("signed_put", 403)
    await uploader.drain()
    clock.advance(uploader.retry_state(file.path).delay)
    assert await uploader.drain() == 1
    assert source.quarantined == []


async def test_refused_credentials_pause_uploads_instead_of_quarantining(source, metrics, clock):
    fake = FakeApigee(basic_auth=("k", "other-secret"))
    files = [source.add("org", "test", 1), source.add("org", "test", 1)]
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        uploader = make(source, http, metrics, clock)
        for _ in range(PERMANENT_ATTEMPTS + 1):
            await uploader.drain()
            clock.advance(BACKOFF_MAX)  # less than the credentials pause: nothing is tried again
        assert fake.calls["analytics_url"] == 2  # one refused pass (two workers) holds every file
        assert source.quarantined == [] and source.files == files  # nothing set aside: the files are fine
        clock.advance(CREDENTIALS_PAUSE)
        await uploader.drain()
    assert fake.calls["analytics_url"] == 4  # tried again once the pause is over


async def test_a_put_answered_other_than_200_is_not_confirmed(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock)
    fake.fail_next("signed_put", 204)
    assert await uploader.drain() == 0
    assert source.files == [file] and uploader.retry_state(file.path).permanent_failures == 1


# -- the source ---------------------------------------------------------------------------------------


async def test_a_file_dropped_by_the_buffer_is_forgotten(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    kept = source.add("org", "test", 1)
    file.path.unlink()  # the buffer's overflow policy removed it after listing
    uploader = make(source, http, metrics, clock)
    assert await uploader.drain() == 1
    assert uploader.retry_state(file.path) is None
    assert uploads(metrics, "transient_error") == 0 and source.quarantined == []
    assert source.files == [file] and kept not in source.files


async def test_done_failing_is_logged_and_the_upload_still_counts(fake, source, http, metrics, clock, caplog):
    source.add("org", "test", 2)
    source.fail_done = True
    uploader = make(source, http, metrics, clock)
    assert await uploader.drain() == 1
    assert "will be sent again" in caplog.text
    assert uploads(metrics, "ok") == 1 and uploaded_records(metrics) == 2


async def test_a_source_that_cannot_list_is_logged(http, metrics, clock, caplog):
    class Broken(Source):
        def staged(self):
            raise OSError("EIO")

    uploader = make(Broken(Path(".")), http, metrics, clock)
    assert await uploader.drain() == 0
    assert "cannot list the staged files" in caplog.text


# -- axpublisher --------------------------------------------------------------------------------------


async def test_axpublisher_batches_and_resumes_after_the_last_accepted_batch(fake, source, metrics, clock):
    posts = 0

    async def second_post_fails(request: httpx.Request) -> httpx.Response:
        nonlocal posts
        posts += 1
        if posts == 2:
            return httpx.Response(503)
        return await fake.handler(request)

    file = source.add("org", "test", 2500)
    async with httpx.AsyncClient(transport=httpx.MockTransport(second_post_fails)) as http:
        uploader = make(source, http, metrics, clock, "axpublisher", batch_size=1000)
        assert await uploader.drain() == 0
        assert fake.publishes == [("org", "test", 1000)] and source.files == [file]
        clock.advance(0.2)
        assert await uploader.drain() == 1
    assert fake.publishes == [("org", "test", 1000)] * 2 + [("org", "test", 500)]
    assert ids(fake) == [f"org-test-{i}" for i in range(2500)]  # each record once
    assert uploaded_records(metrics) == 2500


@pytest.mark.parametrize(
    "content",
    [b"not gzip", gzip.compress(b'{"a": 1}\nnot json\n'), gzip.compress(b'{"a": 1}\n[2]\n'),
     gzip.compress(b'{"a": 1}\n' * 50)[:-10], gzip.compress(b"\xff\xfe\n")],
)  # fmt: skip
async def test_axpublisher_quarantines_a_corrupt_file_at_once(fake, source, http, metrics, clock, content):
    file = source.add("org", "test", 1)
    file.path.write_bytes(content)
    await make(source, http, metrics, clock, "axpublisher").drain()
    assert source.quarantined == [(file, "corrupt")]
    assert fake.publishes == []


async def test_axpublisher_skips_blank_lines(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    file.path.write_bytes(gzip.compress(b'{"gateway_flow_id": "x"}\n\n{"gateway_flow_id": "y"}'))
    await make(source, http, metrics, clock, "axpublisher").drain()
    assert ids(fake) == ["x", "y"]


# -- shutdown and the loop ----------------------------------------------------------------------------


async def test_final_attempt_tries_every_file_once_ignoring_backoff(fake, source, http, metrics, clock):
    first = source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock)
    fake.fail_next("signed_put", 503)
    await uploader.drain()  # `first` now backs off
    second = source.add("org", "prod", 1)
    third = source.add("org", "test", 1)
    fake.fail_next("analytics_url", 503, count=2)  # first and second fail again: no retry
    assert await uploader.final_attempt(5) == 1
    assert source.files == [first, second] and third.path.exists() is False
    assert fake.calls["analytics_url"] == 4


async def test_final_attempt_is_bounded(source, metrics, clock):
    source.add("org", "test", 1)
    hang = asyncio.Event()

    async def stuck(request: httpx.Request) -> httpx.Response:
        await hang.wait()
        raise AssertionError("unreachable")

    async with httpx.AsyncClient(transport=httpx.MockTransport(stuck)) as http:
        uploader = make(source, http, metrics, clock)
        assert await uploader.final_attempt(0.01) == 0
    assert len(source.files) == 1  # left staged for the next start


async def test_attempt_timeout_is_transient(source, metrics, clock):
    file = source.add("org", "test", 1)

    async def stuck(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with httpx.AsyncClient(transport=httpx.MockTransport(stuck)) as http:
        uploader = make(source, http, metrics, clock, attempt_timeout=0.01)
        assert await uploader.drain() == 0
    assert uploader.retry_state(file.path).failures == 1
    assert uploads(metrics, "transient_error") == 1


async def test_run_uploads_on_notify_and_stops(fake, source, http, metrics, clock):
    uploader = make(source, http, metrics, clock, poll_interval=60)
    task = asyncio.create_task(uploader.run())
    await asyncio.sleep(0)  # the first pass finds nothing; the loop now waits up to 60 s
    source.add("org", "test", 2)
    uploader.notify()
    await until(lambda: source.files == [])
    assert ids(fake) == ["org-test-0", "org-test-1"]
    uploader.stop()
    await asyncio.wait_for(task, 5)


async def test_stop_abandons_an_upload_in_flight(source, metrics, clock):
    file = source.add("org", "test", 1)
    entered = asyncio.Event()

    async def stuck(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with httpx.AsyncClient(transport=httpx.MockTransport(stuck)) as http:
        uploader = make(source, http, metrics, clock)
        task = asyncio.create_task(uploader.run())
        await asyncio.wait_for(entered.wait(), 5)
        uploader.stop()
        await asyncio.wait_for(task, 5)
    assert source.files == [file] and file.path.exists()


async def test_options_are_checked(source, http, metrics, clock):
    client = AnalyticsClient(http, "legacy", IA, metrics, authorizer=BasicAuthorizer("k", "s"))
    with pytest.raises(ValueError):
        Uploader(source, client, "org", metrics, clock, workers=0)
    with pytest.raises(ValueError):
        Uploader(source, client, "org", metrics, clock, batch_size=0)


async def test_run_retries_after_the_backoff(fake, source, http, metrics, clock):
    uploader = make(source, http, metrics, clock, poll_interval=60)
    file = source.add("org", "test", 1)
    fake.fail_next("analytics_url", 503)
    task = asyncio.create_task(uploader.run())
    await until(lambda: uploader.retry_state(file.path) is not None)
    clock.advance(0.2)  # run() looks again when the backoff ends, not at the 60 s poll
    await until(lambda: source.files == [])
    uploader.stop()
    await asyncio.wait_for(task, 5)
    assert uploads(metrics, "transient_error") == 1 and uploads(metrics, "ok") == 1


async def test_the_state_of_a_file_removed_elsewhere_is_forgotten(fake, source, http, metrics, clock):
    file = source.add("org", "test", 1)
    uploader = make(source, http, metrics, clock)
    fake.fail_next("signed_put", 503)
    await uploader.drain()
    assert uploader.retry_state(file.path) is not None
    source.files.remove(file)  # dropped by the buffer's overflow policy
    await uploader.drain()
    assert uploader.retry_state(file.path) is None


async def test_a_failing_quarantine_is_logged(fake, source, http, metrics, clock, caplog):
    class Stuck(Source):
        def quarantine(self, file, reason):
            raise OSError("EROFS")

    stuck = Stuck(source.directory)
    stuck.add("org", "test", 1).path.write_bytes(b"garbage")
    await make(stuck, http, metrics, clock, "axpublisher").drain()
    assert "cannot quarantine" in caplog.text
