"""loadtest/noop_http_authz.py: 200 to every request, in order, over keep-alive and pipelined connections."""

import asyncio

from loadtest.noop_http_authz import ALLOW, BAD_REQUEST, NoopHttpAuthz


async def exchange(request: bytes) -> bytes:
    """Send ``request`` (any number of requests) on one connection; everything read until the server closes
    or goes quiet."""
    server = await asyncio.get_running_loop().create_server(NoopHttpAuthz, "127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(request)
        await writer.drain()
        received = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.5)
            except TimeoutError:
                break  # still open: keep-alive
            if not chunk:
                received += b"<closed>"
                break
            received += chunk
        writer.close()
        await writer.wait_closed()
    return received


async def test_pipelined_requests_are_answered_in_order_on_a_kept_alive_connection():
    requests = (
        b"GET /a HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n\r\n"
        b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
        b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    assert await exchange(requests) == ALLOW * 3


async def test_a_request_split_across_reads_is_answered_once():
    server = await asyncio.get_running_loop().create_server(NoopHttpAuthz, "127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"GET /a HTTP/1.1\r\nho")
        await writer.drain()
        writer.write(b"st: x\r\n\r\n")
        assert await reader.readexactly(len(ALLOW)) == ALLOW
        writer.close()
        await writer.wait_closed()


async def test_connection_close_is_answered_then_closed():
    requests = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    assert await exchange(requests) == ALLOW * 2 + b"<closed>"


async def test_http_1_0_without_keep_alive_is_closed():
    assert await exchange(b"GET / HTTP/1.0\r\n\r\n") == ALLOW + b"<closed>"


async def test_garbage_gets_a_400_and_a_close():
    assert await exchange(b"\x00\x01 not http\r\n\r\n") == BAD_REQUEST + b"<closed>"


async def test_an_upgrade_request_is_answered_without_switching_protocols_then_closed():
    request = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    assert await exchange(request) == ALLOW + b"<closed>"
