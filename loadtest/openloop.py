"""An open-loop (wrk2-style) HTTP/1.1 load generator for loopback targets.

wrk is closed loop: each connection sends its next request when the previous answer arrives, so a slow
answer also delays (and so hides) the requests that would have been sent meanwhile ("coordinated
omission"), and its percentiles are at saturation. Here requests follow a fixed schedule instead: request
``i`` is due at ``start + i / rate``, whatever happened to the earlier ones. It goes out on an idle
keep-alive connection (requests are never pipelined); when every connection is busy it waits in one queue
and leaves on the first connection that frees up. Its latency is counted from its *due* time to the last
byte of its answer, so time spent queued behind a slow answer is in it, as wrk2 does.

``connections`` should exceed rate x the latency you expect (Little's law) so nothing queues unless the
server is slow: at 1,000 req/s, the default 16 connections cover 16 ms. ``queued`` in the result counts the
requests that had to wait for a connection.

The loop uses a ``select()`` selector: asyncio's default epoll selector sleeps in whole milliseconds, which
would make every request up to 1 ms late at 1,000 req/s; select() sleeps in microseconds. The command
also sets its thread's timer slack to 1 ns (Linux ``prctl``; the default 50 µs would be in every sample).
``send_lag`` reports how late the client's timer dispatched the requests (its own share of the latency).

Bounded: ``rate x duration`` requests, then at most ``drain_timeout`` seconds for the last answers
(unanswered ones count as errors); only loopback addresses are accepted.

Run: ``python -m loadtest.openloop http://127.0.0.1:8080/v1/bench --rate 1000 --duration 10
-H 'x-api-key: KEY' [--json]``; ``--json`` prints one ``OPENLOOP_REPORT {...}`` line (what
``loadtest/bench.py`` reads).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import json
import math
import selectors
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import httptools

DEFAULT_RATE = 1000.0
DEFAULT_CONNECTIONS = 16
DEFAULT_DRAIN_TIMEOUT = 2.0  # seconds the last answers may take after the schedule ended
CONNECT_TIMEOUT = 2.0
RECONNECT_DELAY = 0.05  # seconds before a lost connection is opened again
REPORT_PREFIX = "OPENLOOP_REPORT "
PR_SET_TIMERSLACK = 29  # linux/prctl.h


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    request: bytes  # the whole request, sent as is every time


@dataclass
class OpenLoopResult:
    scheduled: int  # requests the schedule called for (rate x duration)
    count: int  # answers received
    non_2xx: int  # answers whose status was not 2xx
    errors: int  # requests lost with their connection, or unanswered when the drain timeout ran out
    connect_errors: int  # connection attempts that failed (their requests wait for another connection)
    queued: int  # requests that found no idle connection at their due time
    rate: float  # the schedule's rate, req/s
    achieved_rps: float  # answers / (last answer - first due time)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    send_lag_p99_ms: float  # how late the client's timer dispatched the requests, 99th percentile

    def summary(self) -> str:
        return (
            f"{self.count}/{self.scheduled} answered at {self.achieved_rps:.0f} req/s "
            f"(target {self.rate:.0f}), non-2xx {self.non_2xx}, errors {self.errors}, "
            f"connect errors {self.connect_errors}, queued {self.queued} | latency ms p50 {self.p50_ms:.3f} "
            f"p90 {self.p90_ms:.3f} p99 {self.p99_ms:.3f} max {self.max_ms:.3f} | "
            f"send lag p99 {self.send_lag_p99_ms:.3f} ms"
        )


def target_for(url: str, headers: Mapping[str, str] | None = None) -> Target:
    """A GET of ``url`` (``http://`` to a loopback address) with ``headers``.

    Raises:
        ValueError: not an ``http://`` URL, or the host is not a loopback address.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        raise ValueError(f"{url!r}: only http://HOST[:PORT]/PATH URLs")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{url!r}: the load generator only sends to loopback addresses")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [f"GET {path} HTTP/1.1", f"host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return Target(host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying at most one request at a time."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.due: float | None = None  # the due time of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.run.every.add(self)

    def send(self, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(self.run.target.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()  # connection_lost counts the request in flight

    def on_message_complete(self) -> None:  # httptools callback: a whole answer has been parsed
        due, self.due = self.due, None
        if due is None:
            return  # an answer nobody asked for; the next request's would be out of step
        self.run.answered(self, due, self.parser.get_status_code())
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()
        elif self.transport is not None and not self.transport.is_closing():
            self.run.idle_connection(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.run.every.discard(self)
        self.run.lost(self, self.due)
        self.due = None


class _Run:
    """The schedule, the connections and the counts of one run."""

    def __init__(self, target: Target, rate: float, total: int, connections: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.rate = rate
        self.total = total
        self.connections = connections
        self.idle: deque[_Connection] = deque()
        self.every: set[_Connection] = set()  # the connections open now
        self.waiting: deque[float] = deque()  # due times of queued requests
        self.open = 0  # connections opened or being opened
        self.latencies: list[float] = []
        self.send_lags: list[float] = []
        self.non_2xx = self.errors = self.connect_errors = self.queued = 0
        self.start = 0.0
        self.next = 0  # index of the next request to schedule
        self.last_answer = 0.0
        self.settled = asyncio.Event()  # every scheduled request answered or lost
        self.stopping = False

    def finished(self) -> int:
        return len(self.latencies) + self.errors

    async def connect(self) -> None:
        self.open += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self), self.target.host, self.target.port),
                CONNECT_TIMEOUT,
            )
        except (TimeoutError, OSError):
            self.open -= 1
            self.connect_errors += 1
            return
        self.idle_connection(conn)

    def reconnect_later(self) -> None:
        if not self.stopping and self.open < self.connections:
            self.open += 1  # reserved until the attempt starts, so one loss opens one connection
            self.loop.call_later(RECONNECT_DELAY, self._reconnect)

    def _reconnect(self) -> None:
        self.open -= 1
        if not self.stopping:
            self.loop.create_task(self.connect())

    def idle_connection(self, conn: _Connection) -> None:
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)

    def tick(self) -> None:
        """Send every request that is due (on idle connections, else queued), then sleep until the next."""
        now = self.loop.time()
        while self.next < self.total:
            due = self.start + self.next / self.rate
            if due > now:
                self.loop.call_at(due, self.tick)
                return
            self.next += 1
            self.send_lags.append(now - due)  # how late the timer woke: the client's own delay
            if self.idle:
                self.idle.popleft().send(due)
            else:
                self.queued += 1
                self.waiting.append(due)
                if self.open < self.connections:
                    self.reconnect_later()

    def answered(self, conn: _Connection, due: float, status: int) -> None:
        self.last_answer = self.loop.time()
        self.latencies.append(self.last_answer - due)
        if not 200 <= status < 300:
            self.non_2xx += 1
        self.check_settled()

    def lost(self, conn: _Connection, due: float | None) -> None:
        self.open -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if due is not None:
            self.errors += 1
            self.check_settled()
        self.reconnect_later()

    def check_settled(self) -> None:
        if self.finished() >= self.total:
            self.settled.set()

    async def close(self) -> None:
        self.stopping = True
        for conn in list(self.every):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)  # the transports close their sockets in a callback


async def run_open_loop(
    url: str,
    *,
    rate: float = DEFAULT_RATE,
    duration: float,
    connections: int = DEFAULT_CONNECTIONS,
    headers: Mapping[str, str] | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> OpenLoopResult:
    """GET ``url`` ``round(rate x duration)`` times on schedule over ``connections`` keep-alive connections.

    Raises:
        ValueError: a bad URL (see :func:`target_for`), rate, duration or connection count.
        ConnectionError: not one connection could be opened before the start.
    """
    target = target_for(url, headers)
    if rate <= 0 or duration <= 0 or connections < 1:
        raise ValueError("rate and duration must be positive and connections at least 1")
    total = max(1, round(rate * duration))
    run = _Run(target, rate, total, connections)
    await asyncio.gather(*(run.connect() for _ in range(connections)))
    if not run.idle:
        raise ConnectionError(f"could not connect to {target.host}:{target.port}")
    run.connect_errors = 0  # those connections are retried as requests queue
    run.start = run.loop.time()
    run.tick()
    # The schedule ends at start + duration; then the last answers get drain_timeout.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.settled.wait(), duration + drain_timeout)
    await run.close()
    latencies = sorted(run.latencies)
    lags = sorted(run.send_lags)
    unanswered = total - run.finished()  # never sent (no connection) or still in flight
    span = run.last_answer - run.start
    return OpenLoopResult(
        scheduled=total,
        count=len(latencies),
        non_2xx=run.non_2xx,
        errors=run.errors + unanswered,
        connect_errors=run.connect_errors,
        queued=run.queued,
        rate=rate,
        achieved_rps=len(latencies) / span if span > 0 else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p90_ms=percentile(latencies, 0.90) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=(latencies[-1] if latencies else 0.0) * 1000,
        send_lag_p99_ms=max(0.0, percentile(lags, 0.99)) * 1000,
    )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers wake within microseconds (a select() selector; see the docstring)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def reduce_timer_slack() -> bool:
    """Let this thread's timers wake within 1 ns of their time instead of Linux's default 50 µs; False
    where that is not possible (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: a header is 'name: value'")
    return name.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.openloop", description="open-loop HTTP/1.1 load at a fixed rate (loopback)"
    )
    parser.add_argument("url", help="http://127.0.0.1:PORT/PATH")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests a second (default 1000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of schedule (default 10)")
    parser.add_argument(
        "--connections", type=int, default=DEFAULT_CONNECTIONS, help="keep-alive connections (default 16)"
    )
    parser.add_argument(
        "-H", "--header", action="append", type=parse_header, default=[], help="'name: value'"
    )
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT)
    parser.add_argument("--json", action="store_true", help=f"print one '{REPORT_PREFIX}{{...}}' line")
    args = parser.parse_args(argv)
    reduce_timer_slack()
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(
            run_open_loop(
                args.url,
                rate=args.rate,
                duration=args.duration,
                connections=args.connections,
                headers=dict(args.header),
                drain_timeout=args.drain_timeout,
            )
        )
    except (OSError, ValueError) as exc:
        print(f"openloop: {exc}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    print(REPORT_PREFIX + json.dumps(asdict(result)) if args.json else result.summary(), flush=True)
    return 0 if result.errors == 0 and result.non_2xx == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
