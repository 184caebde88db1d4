"""The HTTP side port: /metrics (Prometheus), /livez, /readyz and /healthz (= ready, as the Go adapter).

A deliberately small asyncio HTTP/1.0-style server: one GET per connection, bounded request size and time,
no request bodies. It serves operators and probes, not traffic. ``HttpPort`` is the server; what it
answers is a subclass's ``answer``: ``HttpEndpoints`` for one service, and with ``authz serve --workers N``
the supervisor's merged view (``authz.server.fleet``), for which each worker serves its own
``HttpEndpoints`` on a private unix socket. Imports no grpc (the supervisor uses it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authz.config import ServerTLS
from authz.metrics import Metrics

if TYPE_CHECKING:
    from authz.server.health import Health  # imports grpc_health; the supervisor must not

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 5.0

Answer = tuple[int, str, bytes]  # HTTP status, content type, body

NOT_FOUND: Answer = (404, "text/plain", b"not found\n")
NOT_ALLOWED: Answer = (405, "text/plain", b"method not allowed\n")
ALIVE: Answer = (200, "text/plain", b"ok\n")
READY_PATHS = ("/readyz", "/healthz")


def server_ssl_context(tls: ServerTLS) -> ssl.SSLContext | None:
    """The TLS context of the HTTP ports (metrics, probes, HTTP checks); None when ``global.tls`` is off."""
    if not tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


class HttpPort:
    """Read one request head, answer it, close."""

    async def answer(self, method: str, path: str) -> Answer:
        raise NotImplementedError

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method not in ("GET", "HEAD"):
                status, content_type, body = NOT_ALLOWED
            else:
                status, content_type, body = await self.answer(method, path.split("?", 1)[0])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, content_type, body, method = 400, "text/plain", b"bad request\n", "GET"
        except Exception:
            log.exception("metrics endpoint error")
            status, content_type, body, method = 500, "text/plain", b"error\n", "GET"
        header = (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(header.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> asyncio.Server:
        return await asyncio.start_server(
            self.handle, host or None, port, limit=MAX_REQUEST_BYTES, ssl=tls, reuse_address=True
        )

    async def start_unix(self, path: str) -> asyncio.Server:
        """On a unix socket (a worker's private port for its supervisor; the directory is 0700)."""
        return await asyncio.start_unix_server(self.handle, path, limit=MAX_REQUEST_BYTES)


class HttpEndpoints(HttpPort):
    def __init__(self, health: Health, metrics: Metrics) -> None:
        self._health = health
        self._metrics = metrics

    def route(self, method: str, path: str) -> Answer:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return NOT_ALLOWED
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)
        if path == "/livez":
            return ALIVE
        if path in READY_PATHS:
            components = self._health.components()
            status = 200 if all(components.values()) else 503
            body = {**components, **self._health.details()}
            return status, "application/json", json.dumps(body).encode() + b"\n"
        return NOT_FOUND

    async def answer(self, method: str, path: str) -> Answer:
        return self.route(method, path)
