"""The HTTP check port (``global.http_authz_address``): Envoy's ext_authz ``http_service`` transport.

An asyncio Protocol over httptools (llhttp, the parser uvicorn uses). Every request on this port is a check:
``http_codec`` reads it, ``check.Checker`` decides, the answer's bytes go back. No decision logic here.

* Keep-alive and pipelining: answers leave in request order. An allow-cache hit is answered inside
  ``data_received`` (``Checker.check_now``); anything else runs as a task, and answers queue behind it.
* Bounded: a request head over ``MAX_HEAD_BYTES`` or ``MAX_HEADERS`` lines gets 431; a request with a body
  (Envoy sends none unless ``with_request_body`` is set) gets 413; a parse error gets 400. Each closes
  the connection, and each is a deny to Envoy: never an allow.
* Slow clients: a sweep every second closes a connection whose request head has taken more than
  ``HEAD_TIMEOUT``, or that was idle for ``IDLE_TIMEOUT`` (keep Envoy's own idle timeout below it, so Envoy
  never sends on a connection this side is closing); at most ``MAX_PIPELINED`` answers wait per
  connection before it stops reading, and it stops reading while the socket's write buffer is full.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque

import httptools

from authz.server import http_codec
from authz.server.check import Checker

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # Envoy's default max_request_headers_kb is 60
MAX_HEADERS = 200  # Envoy's default max_headers_count is 100
MAX_PIPELINED = 64
HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
SWEEP_INTERVAL = 1.0

_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_LARGE = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


class _Refused(Exception):
    """Raised from a parser callback (httptools wraps it in HttpParserCallbackError)."""


class _Connection(asyncio.Protocol):
    """One Envoy connection: parse, check, answer in order."""

    def __init__(self, server: HttpCheckServer) -> None:
        self._server = server
        self._checker = server.checker
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        # owed answers in request order, each with whether its request was a HEAD (answered without body)
        self._pending: deque[tuple[asyncio.Task[bytes] | bytes, bool]] = deque()
        self.started: float | None = None  # monotonic time a request head began; None between requests
        self.last_active = time.monotonic()
        self._paused = False
        self._write_paused = False
        self._closing = False  # close once the owed answers are sent
        self._refusal: bytes | None = None  # the answer to a request refused in a parser callback

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        for entry, _ in self._pending:
            if not isinstance(entry, bytes):
                entry.remove_done_callback(self._flush)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # checked like any request; the connection then ends
            self._pause()
            self._closing = True
            self._flush()
        except httptools.HttpParserError:
            self._refuse(self._refusal or _BAD_REQUEST)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    # -- httptools callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.started = time.monotonic()
        self._url.clear()
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        if len(self._headers) >= MAX_HEADERS:
            self._refused(_HEAD_TOO_LARGE)
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._refused(_TOO_LARGE)  # a check carries no body (Envoy's with_request_body is not supported)

    def on_message_complete(self) -> None:
        self.started = None
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        path = b"".join(self._url).decode("utf-8", "replace")
        request = http_codec.check_request(method, path, self._headers)
        head = method == "HEAD"
        if not parser.should_keep_alive():
            self._closing = True
        answer = self._checker.check_now(request)
        if answer is not None and not self._pending and not self._closing:
            self._write(answer, head)
            return
        if answer is None:
            task = asyncio.get_running_loop().create_task(self._checker.check(request))
            task.add_done_callback(self._flush)
            self._pending.append((task, head))
        else:
            self._pending.append((answer, head))
        if len(self._pending) >= MAX_PIPELINED:
            self._paused = True
            self._pause()
        self._flush()

    # -- internals -------------------------------------------------------------------------------------
    def _refused(self, answer: bytes) -> None:
        self._refusal = answer
        raise _Refused

    def _grow(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refused(_HEAD_TOO_LARGE)

    @property
    def busy(self) -> bool:
        """A request is arriving or an answer is owed."""
        return self.started is not None or bool(self._pending)

    def in_flight(self) -> list[asyncio.Task[bytes]]:
        return [entry for entry, _ in self._pending if not isinstance(entry, bytes)]

    def _flush(self, _task: object = None) -> None:
        """Send every answer at the head of the queue that is ready, in request order."""
        pending = self._pending
        while pending:
            entry, head = pending[0]
            if isinstance(entry, bytes):
                answer = entry
            elif entry.done():
                answer = entry.result()  # check never raises: it answers 503 instead
            else:
                return
            pending.popleft()
            self._write(answer, head)
        if self._closing:
            self.close()
        elif self._paused:
            self._paused = False
            self._resume()

    def _write(self, answer: bytes, head: bool) -> None:
        if self._transport is not None:
            self._transport.write(http_codec.without_body(answer) if head else answer)

    def _refuse(self, answer: bytes) -> None:
        """Answer a request this port will not check, then close (after the answers owed before it)."""
        self._pause()
        self._closing = True
        self._pending.append((answer, False))
        self._flush()

    def _pause(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._transport is not None and not self._paused and not self._write_paused:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class HttpCheckServer:
    """The listening port: connections, the slow-client sweep, start and stop."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(
        self, host: str | None, port: int, tls: ssl.SSLContext | None = None, *, reuse_port: bool = False
    ) -> int:
        """Listen; returns the bound port. Raises OSError when the address cannot be bound. ``reuse_port``:
        the workers of ``authz serve --workers N`` share the port (SO_REUSEPORT)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host or None, port, ssl=tls, reuse_port=reuse_port
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="http-check-sweep")
        port_bound: int = self._server.sockets[0].getsockname()[1]
        return port_bound

    async def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight checks ``grace`` seconds, then close every connection."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        owed = [task for connection in self.connections for task in connection.in_flight()]
        if owed:
            await asyncio.wait(owed, timeout=grace)
        for connection in list(self.connections):
            connection.close()
        await self._server.wait_closed()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Close connections whose request head is late (slow clients) or that sat idle too long."""
        for connection in list(self.connections):
            slow = connection.started is not None and now - connection.started > HEAD_TIMEOUT
            if slow or (not connection.busy and now - connection.last_active > IDLE_TIMEOUT):
                connection.close()
