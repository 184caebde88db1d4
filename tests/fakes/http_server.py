"""A small asyncio HTTP/1.1 server that feeds each request to an async httpx handler.

It lets one handler (`async def handler(request: httpx.Request) -> httpx.Response`, the same callable that
`httpx.MockTransport` takes) also answer over real loopback sockets. Test-only: it binds loopback addresses
only, keeps connections alive, reads `Content-Length` bodies only (no chunked requests, at most 1 MiB) and
writes every response with a `Content-Length`. A handler that raises `ConnectionDropped` makes the server
close the connection without answering. Imports only the stdlib and httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable
from types import TracebackType

import httpx

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]

MAX_BODY = 1 << 20
MAX_HEADERS = 100
MAX_REQUESTS_PER_CONNECTION = 100_000  # bounds the keep-alive loop
IDLE_TIMEOUT = 60.0  # seconds a kept-alive connection may sit idle between requests
_HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


class ConnectionDropped(httpx.ConnectError):
    """Raised by a handler to drop the connection. Over `MockTransport` the client sees a ConnectError."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"test servers bind loopback addresses only, not {host!r}")


class LoopbackServer:
    """A running server; `async with await LoopbackServer.start(handler) as server: ...`."""

    def __init__(self, handler: Handler, server: asyncio.Server, host: str, port: int) -> None:
        self._handler = handler
        self._server = server
        self._connections: set[asyncio.Task[None]] = set()
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    @classmethod
    async def start(cls, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> LoopbackServer:
        _check_loopback(host)
        holder: list[LoopbackServer] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._connection(reader, writer)

        server = await asyncio.start_server(on_connect, host, port)
        bound_port = server.sockets[0].getsockname()[1]
        holder.append(cls(handler, server, host, bound_port))
        return holder[0]

    async def close(self) -> None:
        """Stop listening and drop every open connection (in-flight requests are cancelled)."""
        self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def __aenter__(self) -> LoopbackServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                try:
                    request = await _read_request(reader, self.base_url)
                except _BadRequest as exc:
                    await _write(writer, _text(exc.status, str(exc)), keep_alive=False, head=False)
                    return
                if request is None:
                    return
                try:
                    response = await self._handler(request)
                except ConnectionDropped:
                    return
                except Exception as exc:  # a bug in the handler: answer 500 rather than hang the client
                    await _write(writer, _text(500, repr(exc)), keep_alive=False, head=False)
                    return
                keep_alive = _wants_keep_alive(request)
                await _write(writer, response, keep_alive=keep_alive, head=request.method == "HEAD")
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _text(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, text=message + "\n")


async def _read_request(reader: asyncio.StreamReader, base_url: str) -> httpx.Request | None:
    """Read one request; None on a clean EOF before a request line."""
    try:
        line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
    except ValueError as exc:  # longer than the reader's 64 KiB limit
        raise _BadRequest(414, "request line too long") from exc
    if not line:
        return None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for _ in range(MAX_HEADERS + 1):
        try:
            raw = await reader.readline()
        except ValueError as exc:
            raise _BadRequest(431, "header line too long") from exc
        if raw in (b"\r\n", b"\n", b""):
            break
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers.append((name, value.strip()))
    else:
        raise _BadRequest(431, "too many headers")
    lookup = {name.lower(): value for name, value in headers}
    if "transfer-encoding" in lookup:
        raise _BadRequest(501, "only Content-Length request bodies are supported")
    try:
        length = int(lookup.get("content-length", "0"))
    except ValueError as exc:
        raise _BadRequest(400, "bad Content-Length") from exc
    if length < 0:
        raise _BadRequest(400, "bad Content-Length")
    if length > MAX_BODY:
        raise _BadRequest(413, "request body larger than 1 MiB")
    body = await reader.readexactly(length) if length else b""
    origin = f"http://{lookup['host']}" if lookup.get("host") else base_url
    request = httpx.Request(method, origin + target, headers=headers, content=body or None)
    request.extensions["http_version"] = version.encode()
    return request


def _wants_keep_alive(request: httpx.Request) -> bool:
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if request.extensions.get("http_version") == b"HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


async def _write(
    writer: asyncio.StreamWriter, response: httpx.Response, *, keep_alive: bool, head: bool
) -> None:
    body = await response.aread()
    lines = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}".encode("latin-1")]
    lines += [k + b": " + v for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
    lines.append(f"Content-Length: {len(body)}".encode())
    if not keep_alive:
        lines.append(b"Connection: close")
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body))
    await writer.drain()
