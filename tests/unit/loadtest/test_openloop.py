"""loadtest/openloop.py against in-process HTTP servers on loopback: counts and ordering, never durations."""

import asyncio
import json

import httptools
import pytest

from loadtest import openloop
from loadtest.noop_http_authz import NoopHttpAuthz
from loadtest.openloop import OpenLoopResult, percentile, run_open_loop, target_for


class Answering(asyncio.Protocol):
    """Answers every request with ``response``, after ``delay`` seconds; records the requests' headers."""

    def __init__(self, response: bytes, delay: float = 0.0, seen: list[dict[bytes, bytes]] | None = None):
        self.response = response
        self.delay = delay
        self.seen = seen if seen is not None else []
        self.parser = httptools.HttpRequestParser(self)
        self.headers: dict[bytes, bytes] = {}

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_header(self, name, value):
        self.headers[name.lower()] = value

    def on_message_complete(self):
        self.seen.append(self.headers)
        self.headers = {}
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.answer)
        else:
            self.answer()

    def answer(self):
        if not self.transport.is_closing():
            self.transport.write(self.response)
            if b"connection: close" in self.response:
                self.transport.close()


async def serve(factory):
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/bench"


def assert_percentiles(result: OpenLoopResult):
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.achieved_rps > 0


async def test_every_scheduled_request_is_answered_by_the_noop_server():
    server, url = await serve(NoopHttpAuthz)
    async with server:
        result = await run_open_loop(url, rate=2000, duration=0.1, connections=8)
    assert (result.scheduled, result.count, result.non_2xx, result.errors) == (200, 200, 0, 0)
    assert result.connect_errors == 0
    assert_percentiles(result)


async def test_headers_are_sent_on_every_request():
    seen: list[dict[bytes, bytes]] = []
    server, url = await serve(lambda: Answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", seen=seen))
    async with server:
        result = await run_open_loop(url, rate=1000, duration=0.02, headers={"x-api-key": "k1"})
    assert result.count == 20
    assert len(seen) == 20
    assert all(h[b"x-api-key"] == b"k1" and h[b"host"].startswith(b"127.0.0.1:") for h in seen)


async def test_non_2xx_answers_are_counted():
    body = b'{"error": "no"}'
    response = b"HTTP/1.1 403 Forbidden\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    server, url = await serve(lambda: Answering(response))
    async with server:
        result = await run_open_loop(url, rate=1000, duration=0.05, connections=4)
    assert (result.count, result.non_2xx, result.errors) == (50, 50, 0)


async def test_a_slow_server_queues_requests_on_one_connection_and_each_is_still_answered():
    # One connection and answers that each take 5 ms at 1 request per ms: requests must wait for the
    # connection, so some are queued, and their latency counts from their due time.
    server, url = await serve(lambda: Answering(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", delay=0.005))
    async with server:
        result = await run_open_loop(url, rate=1000, duration=0.02, connections=1)
    assert (result.count, result.errors) == (20, 0)
    assert result.queued > 0
    assert_percentiles(result)


async def test_connections_the_server_closes_are_opened_again():
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    server, url = await serve(lambda: Answering(response))
    async with server:
        result = await run_open_loop(url, rate=1000, duration=0.03, connections=2)
    assert (result.count, result.non_2xx, result.errors) == (30, 0, 0)


async def test_requests_left_unanswered_when_the_drain_timeout_runs_out_are_errors():
    server, url = await serve(lambda: Answering(b"", delay=0.0))  # reads requests, never answers
    async with server:
        result = await run_open_loop(url, rate=1000, duration=0.01, connections=4, drain_timeout=0.05)
    assert (result.scheduled, result.count, result.errors) == (10, 0, 10)
    assert result.p99_ms == 0.0


async def test_no_connection_at_all_raises():
    server, url = await serve(NoopHttpAuthz)
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionError):
        await run_open_loop(url, rate=1000, duration=0.01)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:80/",
        "http://192.168.1.1/",
        "http://example.com/",
        "https://127.0.0.1/",
        "ftp://127.0.0.1/",
    ],
)
def test_only_loopback_http_urls_are_accepted(url):
    with pytest.raises(ValueError):
        target_for(url)


def test_the_request_is_a_keep_alive_get_with_the_headers():
    target = target_for("http://127.0.0.1:8080/v1/bench?x=1", {"x-api-key": "k"})
    assert (target.host, target.port) == ("127.0.0.1", 8080)
    assert target.request == b"GET /v1/bench?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nx-api-key: k\r\n\r\n"
    assert target_for("http://localhost/").request.startswith(b"GET / HTTP/1.1\r\nhost: localhost\r\n")


def test_nearest_rank_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (0.5, 0.9, 0.99, 1.0)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        asyncio.run(run_open_loop("http://127.0.0.1:1/", rate=0, duration=1))


def test_the_command_prints_one_json_report(capsys):
    async def main_with_server():
        server, url = await serve(NoopHttpAuthz)
        async with server:
            return await asyncio.to_thread(
                openloop.main, [url, "--rate", "1000", "--duration", "0.02", "--json", "-H", "x-api-key: k"]
            )

    assert asyncio.run(main_with_server()) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(openloop.REPORT_PREFIX)
    report = json.loads(line.removeprefix(openloop.REPORT_PREFIX))
    assert (report["scheduled"], report["count"], report["errors"], report["non_2xx"]) == (20, 20, 0, 0)
