"""A no-op HTTP ext_authz server: every request is allowed. The HTTP "Python ceiling" of loadtest/bench.py.

Envoy's ext_authz ``http_service`` sends the original method and path (plus the allowed headers) to the
authorization server and treats a 200 as an allow. This server answers every request with
``HTTP/1.1 200 OK`` and an empty body without looking at it: one asyncio Protocol per connection and
httptools for the parsing, so Envoy + this server bounds what a Python HTTP ext_authz on asyncio can reach
on this machine. Keep-alive and pipelining follow HTTP/1.1: each request is answered when its last byte
is parsed, so pipelined requests are answered in order; a ``Connection: close`` request (or HTTP/1.0
without keep-alive, or an upgrade request) is answered, then the connection closed. Bytes that do not parse
as HTTP/1.1 get a 400 and a close.

Run: ``python -m loadtest.noop_http_authz --port 5002``. Stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import httptools

ALLOW = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class NoopHttpAuthz(asyncio.Protocol):
    """One connection: every complete request gets ALLOW, in the order the requests arrived."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # httptools completed the request (it was answered 200) before it saw the upgrade; the server
            # never switches protocols, so the connection ends there.
            if self.transport is not None:
                self.transport.close()
        except httptools.HttpParserError:
            self.close_with(BAD_REQUEST)

    def on_message_complete(self) -> None:  # httptools callback: a whole request has been parsed
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(ALLOW)
        if not self.parser.should_keep_alive():
            transport.close()

    def close_with(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(NoopHttpAuthz, host, port, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"noop HTTP ext_authz on {host}:{bound}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.noop_http_authz", description="no-op HTTP ext_authz (200 to everything)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
