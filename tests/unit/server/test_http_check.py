"""The HTTP check port over loopback: keep-alive, pipelining in order, HEAD, and the bounds it enforces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httptools
import pytest

from authz.clock import SystemClock
from authz.decision.model import Policy
from authz.metrics import new_metrics
from authz.server import http_check, http_codec
from authz.server.check import Checker
from authz.server.http_check import HttpCheckServer
from authz.standalone.catalog_file import parse_catalog
from tests.support.catalogs import ORDERS_KEY, catalog_yaml

ALLOWED = f"GET /v1/orders/1 HTTP/1.1\r\nhost: orders-api\r\nx-api-key: {ORDERS_KEY}\r\n\r\n".encode()
NO_KEY = b"GET /v1/orders/1 HTTP/1.1\r\nhost: orders-api\r\n\r\n"
HEAD_NO_KEY = b"HEAD /v1/orders/1 HTTP/1.1\r\nhost: orders-api\r\n\r\n"


class Client:
    """A raw HTTP/1.1 connection that reads whole responses (status, headers, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._responses: list[tuple[int, dict[str, str], bytes]] = []
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self._responses.append((self._parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""

    async def responses(self, count: int) -> list[tuple[int, dict[str, str], bytes]]:
        while len(self._responses) < count:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, f"closed after {len(self._responses)} responses"
            self._parser.feed_data(data)
        found, self._responses = self._responses[:count], self._responses[count:]
        return found

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(65536), 5) == b""


OPEN: list[Client] = []


@pytest.fixture
async def server() -> AsyncIterator[HttpCheckServer]:
    catalog = parse_catalog(catalog_yaml(), "catalog.yaml", "org")
    checker = Checker(http_codec, lambda: catalog, Policy("org", "test"), new_metrics(), SystemClock())
    checks = HttpCheckServer(checker)
    checks.port = await checks.start("127.0.0.1", 0)  # type: ignore[attr-defined]
    yield checks
    await checks.stop(1.0)
    while OPEN:
        client = OPEN.pop()
        client.writer.close()
        await client.writer.wait_closed()


async def connect(server: HttpCheckServer) -> Client:
    client = Client(*await asyncio.open_connection("127.0.0.1", server.port))  # type: ignore[attr-defined]
    OPEN.append(client)
    return client


async def test_pipelined_checks_are_answered_in_order_on_one_connection(server):
    client = await connect(server)
    client.writer.write(ALLOWED)  # first: a miss, decided in a task and cached
    assert [r[0] for r in await client.responses(1)] == [200]
    # A deny (never cached: a task) ahead of a cached allow (answered at once): the allow waits its turn.
    client.writer.write(NO_KEY + ALLOWED + NO_KEY + ALLOWED + ALLOWED)
    answers = await client.responses(5)
    assert [status for status, _, _ in answers] == [401, 200, 401, 200, 200]
    assert answers[0][2] == b'{"error": "An API key is required.", "reason": "missing_credentials"}'
    assert answers[1][1]["x-envoy-auth-headers-to-remove"] == "x-api-key"
    assert answers[1][1]["x-apigee-api"] == "orders-api"


async def test_head_gets_status_and_headers_without_a_body(server):
    client = await connect(server)
    client.writer.write(HEAD_NO_KEY + ALLOWED)
    reader = client.reader
    raw = b""
    while raw.count(b"HTTP/1.1 ") < 2 or not raw.endswith(b"\r\n\r\n"):
        raw += await asyncio.wait_for(reader.read(65536), 5)
    head, allow = raw.split(b"HTTP/1.1 200", 1)
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"content-length: 69\r\n" in head and head.endswith(b"\r\n\r\n")  # the deny's length, no body
    assert allow.endswith(b"\r\n\r\n")


async def test_connection_close_is_honoured_after_the_answer(server):
    client = await connect(server)
    client.writer.write(NO_KEY.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"))
    assert [r[0] for r in await client.responses(1)] == [401]
    assert await client.closed()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /v1/orders HTTP/1.1\r\nhost: orders-api\r\ncontent-length: 5\r\n\r\nhello", 413),
        (
            b"POST /v1/orders HTTP/1.1\r\nhost: o\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            413,
        ),
        (
            b"GET /x HTTP/1.1\r\nhost: o\r\nx-big: " + b"a" * (http_check.MAX_HEAD_BYTES + 1) + b"\r\n\r\n",
            431,
        ),
        (b"GET /x HTTP/1.1\r\nhost: o\r\n" + b"x-h: 1\r\n" * (http_check.MAX_HEADERS + 1) + b"\r\n", 431),
        (b"GET /x HTTP/1.1\r\nhost o\r\n\r\n", 400),
        (
            b"GET /v1/orders/1 HTTP/1.1\r\nhost: orders-api\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
            401,
        ),
    ],
    ids=[
        "body",
        "chunked-body",
        "huge-header",
        "too-many-headers",
        "garbage",
        "upgrade-is-checked-then-closed",
    ],
)
async def test_requests_it_will_not_check_get_a_deny_status_and_the_connection_closes(
    server, request_bytes, status
):
    client = await connect(server)
    client.writer.write(ALLOWED + request_bytes)  # the answer owed before the refusal still goes out
    assert [r[0] for r in await client.responses(2)] == [200, status]
    assert await client.closed()


async def test_the_sweep_closes_slow_heads_and_idle_connections_only(server):
    slow, idle = await connect(server), await connect(server)
    slow.writer.write(b"GET /v1/orders/1 HTTP/1.1\r\nhost: orders-api\r\n")  # the head never ends
    idle.writer.write(ALLOWED)
    await idle.responses(1)
    while not any(c.started is not None for c in server.connections):
        await asyncio.sleep(0)  # the server has not read the partial head yet
    now = time.monotonic()
    server.sweep(now)
    assert len(server.connections) == 2  # nothing is late yet
    server.sweep(now + http_check.HEAD_TIMEOUT + 1)
    assert await slow.closed()
    assert len(server.connections) == 1
    server.sweep(now + http_check.IDLE_TIMEOUT + 1)
    assert await idle.closed()


async def test_stop_closes_connections(server):
    client = await connect(server)
    client.writer.write(ALLOWED)
    await client.responses(1)
    await server.stop(1.0)
    assert await client.closed()
