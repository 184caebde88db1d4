"""``authz serve --workers N``: N worker processes sharing the ports, under one supervisor process.

Why processes: one grpc.aio event loop saturates one core (see the README's benchmark); a pod with more
CPUs serves more checks with more processes. The kernel spreads connections over the workers: each binds
the gRPC port (and ``global.http_authz_address``) with SO_REUSEPORT. A single process keeps
``grpc.so_reuseport`` at 0, so a second ``authz serve`` on a used port still fails.

The supervisor (this module; it imports no grpc):

1. Loads and validates the config once (``cli``; exit 2 with the ConfigError), and the local catalog
   standalone. Then a pre-flight: it binds each shared port without SO_REUSEPORT and closes it, so a second
   ``authz serve --workers N`` on the same ports fails (exit 1) instead of joining the first one's group.
   Between that check and the workers' binds another process could take a port: the workers then fail
   to start and so does the supervisor. Port 0 cannot be shared (each worker would get its own): refused.
2. Starts worker k as ``python -m authz serve ... --worker k/N --worker-socket PATH`` (a new interpreter,
   never a fork of a process that imported grpc), in its own process group (a Ctrl-C in a terminal
   reaches the supervisor only, which forwards it once), with a pipe on its stdin that the supervisor
   never writes: when the supervisor dies, even by SIGKILL, the worker reads EOF and drains.
3. Serves ``global.metrics_address`` itself (``authz.server.fleet``): the workers' metrics merged with a
   ``worker`` label, readiness = every worker ready, liveness = every worker answers. Prometheus multiprocess
   mode was the alternative; it does not fit this service's custom collectors (the lock-free
   ``LoopHistogram``) and gauges, and it would need a shared mmap directory; merging scrapes keeps every
   worker's metrics exactly what a single process exposes.
4. SIGTERM or SIGINT: readiness goes false, SIGTERM goes to every worker, which drains as a single process
   does; after ``graceful_shutdown_timeout`` + STOP_MARGIN a worker still running is killed by its PID. The
   exit code is 0 only if every worker exited 0. A second SIGINT kills the workers and exits at once.
5. A worker that exits on its own while the fleet runs is restarted with backoff (RESTART_MIN doubling to
   RESTART_MAX; back to RESTART_MIN after STABLE_AFTER of running), logged and counted in
   ``worker_restarts_total``: the other workers keep serving meanwhile, readiness is false until it is
   back, and liveness fails while it is down, so Kubernetes restarts the pod if it stays down (its
   liveness probe is the backstop for a worker that cannot come back). A worker that exits before the
   fleet ever started (a bad catalog, a port taken) is fatal: the supervisor stops the others and exits
   with that worker's code, as a single process would fail.

State per worker (also in the README, "Several workers in one pod"):

* Quota buckets are in memory, per worker. In Apigee mode each worker syncs with Apigee like a replica,
  so the shared count converges as with N replicas (at most limit + N per window, see "Quotas").
  Standalone, each worker enforces the whole limit on the connections it serves: up to N x the limit per
  pod. Dividing the limit by N is not sound: the kernel spreads connections, not requests, so with one
  busy Envoy connection one worker can see all of an app's traffic and would enforce limit / N.
* Analytics: each worker has its own buffer directory (``authz.analytics.adopt``); worker 0 adopts the
  files of workers numbered N or more at start (after scaling down), so nothing is lost.
* The product and key-index snapshots under ``temp_dir`` are shared: each is written to a temp file and
  renamed, so a reader sees a whole file, and the last writer wins with an equally valid snapshot.
* Each worker polls the catalog, syncs keys and refreshes JWKS on its own: N x the control-plane calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from authz.config import Config
from authz.config_values import Address
from authz.errors import ConfigError, ListenError
from authz.metrics import new_supervisor_metrics
from authz.server.fleet import Fleet, get
from authz.server.http import server_ssl_context

log = logging.getLogger(__name__)

MAX_WORKERS = 64
STOP_MARGIN = 15.0  # after the grace period: a worker's quota flush (5 s) and analytics upload (5 s), + 5 s
RESTART_MIN = 0.5  # seconds before restarting a worker that exited
RESTART_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long restarts after RESTART_MIN again
START_POLL = 0.1  # seconds between probes of a starting worker's socket
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


@dataclass(frozen=True)
class Role:
    """What the supervisor tells a worker: its index, the number of workers, and its private socket."""

    index: int
    count: int
    socket: str


def worker_count(value: str) -> int:
    """``--workers`` / ``AUTHZ_WORKERS``: an integer from 1 to MAX_WORKERS (an argparse type)."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"expected an integer from 1 to {MAX_WORKERS}, got {value!r}")
    return count


def parse_role(value: str, socket_path: str) -> Role:
    """``--worker K/N`` with ``--worker-socket PATH``.

    Raises:
        ValueError: not K/N with 0 <= K < N <= MAX_WORKERS, or no socket.
    """
    index, _, count = value.partition("/")
    role = Role(int(index), worker_count(count), socket_path)
    if not 0 <= role.index < role.count or not socket_path:
        raise ValueError(f"--worker takes K/N with 0 <= K < N and needs --worker-socket, got {value!r}")
    return role


def tag_logs(index: int) -> None:
    """Prefix the worker's log lines with ``worker K:`` (all workers write to the supervisor's stderr)."""

    def tag(record: logging.LogRecord) -> bool:
        record.msg, record.args = f"worker {index}: {record.getMessage()}", ()
        return True

    for handler in logging.getLogger("authz").handlers:
        handler.addFilter(tag)


def preflight(config: Config) -> None:
    """Fail now if a shared port is taken: bind it without SO_REUSEPORT, then close.

    Raises:
        ConfigError: a shared port is 0.
        ListenError: a port is in use (by a single authz, another supervisor's workers, anything).
    """
    shared: list[tuple[str, Address]] = [("global.api_address", config.global_.api_address)]
    if config.global_.http_authz_address is not None:
        shared.append(("global.http_authz_address", config.global_.http_authz_address))
    for key, address in shared:
        if address.port == 0:
            raise ConfigError(config.path, key, "port 0 cannot be shared by --workers: give a fixed port")
        try:
            _bind_and_close(address)
        except OSError as exc:
            raise ListenError(f"cannot listen on {address} ({key}): {exc.strerror}") from None


def _bind_and_close(address: Address) -> None:
    """As grpc binds (SO_REUSEADDR, so TIME_WAIT leftovers do not count; ``[::]`` dual-stack when the
    host is empty), but without SO_REUSEPORT."""
    if address.host:
        family, _, _, _, where = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    else:
        family, where = socket.AF_INET6, ("::", address.port)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 in this network namespace: grpc then binds 0.0.0.0
        family, where = socket.AF_INET, ("0.0.0.0", address.port)  # noqa: S104 - the configured wildcard
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not address.host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(where)


@dataclass
class _Slot:
    index: int
    socket: str
    proc: asyncio.subprocess.Process | None = None
    code: int | None = None  # the last exit code
    answered: bool = False  # its socket answered once: it started


class Supervisor:
    """Runs ``count`` workers with ``worker_argv`` (``serve`` and its flags, without ``--workers``)."""

    def __init__(self, config: Config, worker_argv: list[str], count: int) -> None:
        self.config = config
        self.count = count
        self._argv = worker_argv
        self.metrics = new_supervisor_metrics()
        self.exit_code = 0
        self._stop: asyncio.Event | None = None
        self._slots: list[_Slot] = []
        self._dir = ""

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    @property
    def started(self) -> bool:
        """Every worker answered once (the fleet started): from then on an exit is restarted."""
        return all(slot.answered for slot in self._slots)

    def _answered(self, index: int) -> None:
        self._slots[index].answered = True

    async def run(self) -> int:
        """Until SIGTERM or SIGINT (or a worker that cannot start); returns the exit code."""
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        preflight(self.config)
        self._dir = _private_dir(self.config.global_.temp_dir)
        try:
            return await self._run()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _run(self) -> int:
        self._slots = [_Slot(k, os.path.join(self._dir, f"worker-{k}.sock")) for k in range(self.count)]
        fleet = Fleet([s.socket for s in self._slots], self.metrics, lambda: self.stopping, self._answered)
        address, tls = self.config.global_.metrics_address, server_ssl_context(self.config.global_.tls)
        try:
            server = await fleet.start(address.http_host(), address.port, tls)
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {address} (global.metrics_address): {exc.strerror}"
            ) from None
        port = server.sockets[0].getsockname()[1]
        log.info("supervisor: %d workers, metrics and probes on port %d", self.count, port)
        keepers = [asyncio.create_task(self._keep(slot), name=f"worker-{slot.index}") for slot in self._slots]
        starting = asyncio.create_task(self._all_started())
        assert self._stop is not None
        await self._stop.wait()
        starting.cancel()
        limit = self.config.global_.graceful_shutdown_timeout + STOP_MARGIN
        _, late = await asyncio.wait(keepers, timeout=limit)
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.error(
                    "worker %d (pid %d) still running after %.0fs: killed", slot.index, slot.proc.pid, limit
                )
                slot.proc.kill()
        if late:
            await asyncio.wait(late)
        server.close()
        await server.wait_closed()
        failed = [s.index for s in self._slots if s.code != 0]
        if failed and self.exit_code == 0:
            log.error("workers %s did not exit cleanly", failed)
            self.exit_code = 1
        log.info("supervisor stopped (exit code %d)", self.exit_code)
        return self.exit_code

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process:
        argv = [sys.executable, "-m", "authz", *self._argv]
        argv += ["--worker", f"{slot.index}/{self.count}", "--worker-socket", slot.socket]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.socket)  # a dead worker's; a live answer on it must come from the new one
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, process_group=0)
        slot.proc = proc
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        if self.stopping:
            proc.send_signal(signal.SIGTERM)
        return proc

    async def _keep(self, slot: _Slot) -> None:
        """Run the slot's worker; restart it with backoff after an unexpected exit, until stopping."""
        backoff = RESTART_MIN
        while True:
            began = time.monotonic()
            try:
                proc = await self._spawn(slot)
            except OSError as exc:  # no memory, no descriptors: like a worker that died at once
                log.error("worker %d cannot be started: %s", slot.index, exc)
                slot.code = code = 1
            else:
                slot.code = code = await proc.wait()
            if self.stopping:
                return
            if not self.started:  # the fleet never served: a restart would fail the same way
                log.error("worker %d exited with code %d while starting: stopping", slot.index, code)
                self._halt(code if code > 0 else 1)
                return
            if time.monotonic() - began >= STABLE_AFTER:
                backoff = RESTART_MIN
            log.error("worker %d exited (%s): restarting in %.1fs", slot.index, _how(code), backoff)
            self.metrics.worker_restarts.labels(str(slot.index)).inc()
            assert self._stop is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            if self.stopping:
                return
            backoff = min(backoff * 2, RESTART_MAX)

    async def _all_started(self) -> None:
        """Until every worker's socket has answered once (polling a child's endpoint: bounded by the
        children's own start, and cancelled when stopping)."""
        while not self.started:
            for slot in self._slots:
                if not slot.answered:
                    with contextlib.suppress(OSError, TimeoutError, ValueError):
                        await get(slot.socket, "/livez")
                        slot.answered = True
            if not self.started:
                await asyncio.sleep(START_POLL)
        log.info("all %d workers started", self.count)

    def _halt(self, code: int) -> None:
        """Stop the fleet: readiness goes false, every worker gets SIGTERM."""
        assert self._stop is not None
        if self.exit_code == 0:
            self.exit_code = code
        self._stop.set()
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.send_signal(signal.SIGTERM)

    def _on_signal(self, signum: int) -> None:
        if self.stopping:
            if signum == signal.SIGINT:
                log.warning("second interrupt: killing the workers, exiting now")
                for slot in self._slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        slot.proc.kill()
                os._exit(130)
            return
        log.info("received %s: draining %d workers", signal.Signals(signum).name, self.count)
        self._halt(0)


def _how(code: int) -> str:
    """An exit code as the log says it: ``code 1``, ``signal SIGKILL``."""
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _private_dir(temp_dir: str) -> str:
    """A 0700 directory for the workers' sockets: under temp_dir (writable in the container, whose root
    filesystem is read-only), else the system's temp directory when that path would be too long."""
    base: str | None = temp_dir
    try:
        os.makedirs(temp_dir, mode=0o700, exist_ok=True)
    except OSError:
        base = None
    if base is not None and len(os.path.join(os.path.abspath(base), "sockets-xxxxxxxx", "worker-64.sock")) > (
        MAX_SOCKET_PATH
    ):
        base = None
    return tempfile.mkdtemp(prefix="sockets-" if base else "authz-sockets-", dir=base)


async def supervise(config: Config, worker_argv: list[str], count: int) -> int:
    """Run the supervisor until it stops; returns the exit code."""
    return await Supervisor(config, worker_argv, count).run()
