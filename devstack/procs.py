"""Child processes for the local stack, the e2e tests and the bench: free ports, start, wait, stop.

Every process is started with its output going to a log file and is stopped by its own PID (SIGTERM, then
SIGKILL after a timeout), never by name. Readiness waits poll an external process with short sleeps and
a deadline, and give up early, with the tail of the log, if the process has died.

Imports only the standard library, so it works before the service package is importable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

POLL_INTERVAL = 0.05  # seconds between readiness probes
LOG_TAIL_LINES = 40

# Loopback only, and never through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StartupError(RuntimeError):
    """A child process exited, or did not become ready in time. The message carries its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """True if a server could listen on 127.0.0.1:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers (Envoy, grpc) do, so that TIME_WAIT leftovers of a previous run don't count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Proc:
    """One child process whose stdout and stderr go to ``<log_dir>/<name>.log``.

    Use it as a context manager, or call :meth:`stop` yourself.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with self.log_path.open("ab") as log:
            # The child keeps its own copy of the descriptor; ours can close.
            self._popen = subprocess.Popen(  # noqa: S603 - argv is built by our own code
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                # Its own process group: a Ctrl-C in the terminal reaches the parent only, which then
                # stops the children in order.
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs."""
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log file ('' if there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self, what: str = "start") -> None:
        """Raise StartupError with the log tail if the process has exited."""
        code = self._popen.poll()
        if code is not None:
            raise StartupError(
                f"{self.name} exited with code {code} before it could {what} "
                f"(log {self.log_path}):\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM this PID, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
        return self._popen.wait()

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, returncode={self.returncode})"


def http_get(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``url`` (with ``headers``) and return (status, body); HTTP error statuses are returned, not raised.

    Raises:
        OSError: the connection failed (refused, reset, timed out).
    """
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def wait_http_ok(
    url: str, timeout: float, proc: Proc | None = None, expect_body: bytes | None = None
) -> None:
    """Poll ``url`` until it answers 200 (and its body contains ``expect_body``, if given).

    Raises:
        StartupError: ``proc`` exited, or the deadline passed; the message has ``proc``'s log tail.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if proc is not None:
            proc.check_alive(f"answer {url}")
        try:
            status, body = http_get(url, timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200 and (expect_body is None or expect_body in body):
                return
            last = f"HTTP {status}: {body[:200]!r}"
        if time.monotonic() >= deadline:
            tail = f" (log {proc.log_path}):\n{proc.log_tail()}" if proc is not None else ""
            raise StartupError(f"{url} not ready after {timeout:.1f}s, last: {last}{tail}")
        time.sleep(POLL_INTERVAL)


def wait_port_open(port: int, timeout: float, proc: Proc | None = None, host: str = "127.0.0.1") -> None:
    """Poll until a TCP connect to host:port succeeds.

    Raises:
        StartupError: ``proc`` exited, or the deadline passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            proc.check_alive(f"listen on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                tail = f" (log {proc.log_path}):\n{proc.log_tail()}" if proc is not None else ""
                raise StartupError(f"{host}:{port} not open after {timeout:.1f}s: {exc}{tail}") from exc
        time.sleep(POLL_INTERVAL)
