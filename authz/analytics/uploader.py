"""Uploader: sends the staged analytics files to Apigee, each to its own tenant, and deletes none unconfirmed.

It reads the files from a ``StagedSource`` (the buffer) and hands each one to ``AnalyticsClient``: a
signed-URL upload (``gcp``, ``legacy``), one POST of the file to ``analytics.endpoint`` (``endpoint``, in
standalone mode, where "Apigee" below means that endpoint) or, for ``axpublisher``, its NDJSON lines in
POSTs of ``batch_size`` records. A file goes to the (org, env) it was written for, never the current
config's (the Go adapter re-queues every tenant's files under the current one after a restart, reference
§6). ``source.done(file)`` runs only after Apigee confirmed the upload (exactly 200 on the PUT, 200 on every
axpublisher POST, any 2xx from the endpoint).

Failures, per file, never fatal to the loop:

* transient (``ApigeeUnavailable``: transport, timeout, 5xx, 408, 429; an unreadable file; a bug): retry after
  a capped exponential backoff, 0.2 s doubling to 60 s, jittered down by up to half, and never sooner than
  Apigee's ``Retry-After``. The first transient error of a pass also stops that pass and holds the other
  files until the same time, so an Apigee outage costs about ``workers`` requests per backoff step instead
  of one per staged file;
* permanent (``ApigeeRejected``: 4xx other than 408/429, a PUT answered other than 200): retried with the
  same backoff, and at the ``PERMANENT_ATTEMPTS``-th (3rd) the file is quarantined (``source.quarantine(file,
  "permanent_error")``), so one stray 403 from a signed URL is not fatal; an ``axpublisher`` file that is
  not gzip NDJSON objects is quarantined at once as ``"corrupt"``;
* refused credentials (401/403 on our own authenticated call, raised by the client as transient with a
  5-minute ``Retry-After``): every upload pauses, nothing is quarantined, since the files are fine;
* gone (``FileNotFoundError``: the buffer dropped it by its overflow policy): forgotten.

Metrics: ``analytics_uploads{org,env,result=ok|transient_error|permanent_error}`` per attempt and
``analytics_records{org,env,status="uploaded"}`` by the file's record count, under the file's tenant.
``analytics_files_quarantined{org,reason}`` and the records dropped with a quarantined file are counted by
``source.quarantine()``: the buffer quarantines corrupt files on its own too, and only it knows whether the
file was still there to set aside, so counting here as well would count twice.

Lifecycle: ``run()`` until ``stop()`` (a pass every ``poll_interval`` or on ``notify()``, sooner when a
backoff ends); ``drain()`` runs one pass now (tests); ``final_attempt(timeout)`` at shutdown tries every
staged file once, without backoff or retries, and leaves the rest staged. Backoff times are read from the
injected ``Clock`` (monotonic), so tests move a FakeClock and call ``drain()`` with no sleeps.
Imports no httpx: all HTTP is in ``authz.apigee.analytics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import random as _random
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from authz.apigee.analytics import AnalyticsClient
from authz.clock import Clock
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import Metrics

log = logging.getLogger(__name__)

BACKOFF_FIRST: Final = 0.2
BACKOFF_MAX: Final = 60.0
PERMANENT_ATTEMPTS: Final = 3  # permanent failures of one file before it is quarantined
PUBLISH_BATCH: Final = 1000  # axpublisher records per POST
ATTEMPT_TIMEOUT: Final = 300.0  # one file, both calls; httpx's timeout is per socket operation only
POLL_INTERVAL: Final = 1.0  # how often run() looks for newly staged files
MIN_WAIT: Final = 0.05  # run() never spins faster than this


class StagedFile(Protocol):
    """A closed gzip NDJSON file waiting for upload (read-only attributes; a frozen dataclass fits)."""

    @property
    def path(self) -> Path: ...

    @property
    def tenant(self) -> tuple[str, str]:
        """(org, env) the records were written for."""
        ...

    @property
    def records(self) -> int: ...

    @property
    def bytes(self) -> int: ...


F = TypeVar("F", bound=StagedFile)


class StagedSource(Protocol[F]):
    """What the uploader needs from the buffer. Calls are synchronous and quick (a listing, an unlink,
    a rename); the uploader calls them from the event loop."""

    def staged(self) -> Sequence[F]:
        """The files staged now, oldest first. A file stays listed until ``done`` or ``quarantine``."""
        ...

    def done(self, file: F) -> None:
        """Apigee confirmed the upload: delete the file."""
        ...

    def quarantine(self, file: F, reason: str) -> None:
        """Set the file aside (kept on disk, never listed again) and count it in
        ``analytics_files_quarantined{org,reason}``; ``reason`` is ``permanent_error`` or ``corrupt``."""
        ...


@dataclass(frozen=True)
class RetryState:
    """Why and until when a file waits; ``due`` is on the clock's monotonic scale."""

    failures: int  # failed attempts in a row, of any kind
    permanent_failures: int
    delay: float  # the wait computed after the last failure, seconds
    due: float


@dataclass
class _Retry:
    failures: int = 0
    permanent: int = 0
    delay: float = 0.0
    due: float = float("-inf")
    published: int = 0  # axpublisher: records of the file Apigee already accepted


class _CorruptFile(Exception):
    pass


Outcome = Literal["ok", "transient", "permanent", "quarantined", "gone"]


class Uploader(Generic[F]):
    def __init__(
        self, source: StagedSource[F], client: AnalyticsClient, org: str, metrics: Metrics, clock: Clock, *,
        workers: int = 2, batch_size: int = PUBLISH_BATCH, attempt_timeout: float = ATTEMPT_TIMEOUT,
        poll_interval: float = POLL_INTERVAL, random: Callable[[], float] = _random.random,
    ) -> None:  # fmt: skip
        if workers < 1 or batch_size < 1:
            raise ValueError("workers and batch_size must be at least 1")
        self._source = source
        self._client = client
        self._org = org
        self._metrics = metrics
        self._clock = clock
        self._workers = workers
        self._batch = batch_size
        self._attempt_timeout = attempt_timeout
        self._poll = poll_interval
        self._random = random
        self._retries: dict[Path, _Retry] = {}
        self._in_flight: set[Path] = set()
        self._hold_until = float("-inf")  # monotonic; set by a transient error, cleared by a success
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()

    # --- control ----------------------------------------------------------------------------------

    def retry_state(self, path: Path) -> RetryState | None:
        """The backoff of a staged file that failed (None when it has not, or is no longer staged)."""
        state = self._retries.get(path)
        if state is None or state.failures == 0:
            return None
        return RetryState(state.failures, state.permanent, state.delay, state.due)

    def notify(self) -> None:
        """A file was staged: run a pass now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """End ``run()``; an upload in flight is abandoned and its file stays staged."""
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        """Upload until ``stop()``; never dies on an error."""
        while not self._stopped.is_set():
            self._wake.clear()
            work = asyncio.create_task(self._pass(final=False))
            stopped = asyncio.create_task(self._stopped.wait())
            try:
                await asyncio.wait((work, stopped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                work.cancel()
                stopped.cancel()
                await asyncio.gather(work, stopped, return_exceptions=True)
            if not work.cancelled() and work.exception() is not None:
                log.error("analytics upload pass failed", exc_info=work.exception())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_wait()):
                    await self._wake.wait()  # notify() or stop()

    async def drain(self) -> int:
        """One pass now: try every staged file whose backoff is over. Returns the files confirmed."""
        return await self._pass(final=False)

    async def final_attempt(self, timeout: float) -> int:  # noqa: ASYNC109 (the budget is the point)
        """Shutdown: one attempt per staged file, ignoring backoff, no retries, within ``timeout`` seconds.

        What is not confirmed in time stays staged for the next start. Returns the files confirmed.
        """
        tally = [0]
        try:
            async with asyncio.timeout(timeout):
                await self._pass(final=True, tally=tally)
        except TimeoutError:
            log.warning("analytics (%s): final upload attempt stopped after %.1f s", self._org, timeout)
        left = len(self._staged())
        if left:
            log.warning("analytics (%s): %d files left staged for the next start", self._org, left)
        return tally[0]

    # --- passes -----------------------------------------------------------------------------------

    def _staged(self) -> list[F]:
        try:
            return list(self._source.staged())
        except Exception:
            log.exception("analytics (%s): cannot list the staged files", self._org)
            return []

    def _eligible(self, file: F, final: bool) -> bool:
        """Not in flight, and (unless this is the final attempt) past its backoff and any hold."""
        if file.path in self._in_flight:
            return False
        if final:
            return True
        now = self._clock.monotonic()
        state = self._retries.get(file.path)
        return now >= self._hold_until and (state is None or now >= state.due)

    async def _pass(self, *, final: bool, tally: list[int] | None = None) -> int:
        staged = self._staged()
        paths = {file.path for file in staged}
        for path in [p for p in self._retries if p not in paths and p not in self._in_flight]:
            del self._retries[path]  # uploaded, quarantined or dropped elsewhere
        queue = deque(file for file in staged if self._eligible(file, final))
        counted = tally if tally is not None else [0]
        stop = False

        async def worker() -> None:
            nonlocal stop
            while queue and not stop:
                file = queue.popleft()
                if not self._eligible(file, final):
                    continue  # taken by a concurrent pass, or held since the queue was made
                self._in_flight.add(file.path)
                try:
                    outcome = await self._attempt(file)
                finally:
                    self._in_flight.discard(file.path)
                if outcome == "ok":
                    counted[0] += 1
                elif outcome == "transient" and not final:
                    stop = True  # Apigee is struggling: the rest waits for the backoff

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self._workers, len(queue))):
                group.create_task(worker())
        return counted[0]

    def _idle_wait(self) -> float:
        """Seconds until run() should look again: the next backoff's end, at most ``poll_interval``."""
        now = self._clock.monotonic()
        dues = [max(s.due, self._hold_until) for p, s in self._retries.items() if p not in self._in_flight]
        if self._hold_until > now:
            dues.append(self._hold_until)  # files held by another file's transient error
        if not dues:
            return self._poll
        return min(max(min(dues) - now, MIN_WAIT), self._poll)

    # --- one file ---------------------------------------------------------------------------------

    async def _attempt(self, file: F) -> Outcome:
        """Try one file once. Never raises but CancelledError: every failure ends in an Outcome."""
        org, env = file.tenant
        state = self._retries.setdefault(file.path, _Retry())
        try:
            async with asyncio.timeout(self._attempt_timeout):
                if self._client.kind == "axpublisher":
                    await self._publish(file, state)
                else:
                    name = self._client.relative_name(org, env, file.path, self._clock.now())
                    await self._client.upload(org, env, file.path, name)
        except FileNotFoundError:
            self._retries.pop(file.path, None)
            log.info("analytics file %s is gone (dropped before its upload)", file.path.name)
            return "gone"
        except _CorruptFile as exc:
            self._retries.pop(file.path, None)
            self._quarantine(file, "corrupt", str(exc))
            return "quarantined"
        except ApigeeRejected as exc:
            self._count(org, env, "permanent_error")
            state.permanent += 1
            if state.permanent >= PERMANENT_ATTEMPTS:
                self._retries.pop(file.path, None)
                self._quarantine(file, "permanent_error", str(exc))
                return "quarantined"
            self._back_off(state, None)
            log.warning(
                "analytics upload of %s to %s~%s refused (%d of %d before quarantine), retry in %.1f s: %s",
                file.path.name, org, env, state.permanent, PERMANENT_ATTEMPTS, state.delay, exc,
            )  # fmt: skip
            return "permanent"
        except Exception as exc:  # ApigeeUnavailable, TimeoutError, an unreadable file, or a bug
            self._count(org, env, "transient_error")
            hint = exc.retry_after if isinstance(exc, ApigeeUnavailable) else None
            self._back_off(state, hint)
            self._hold_until = state.due
            expected = isinstance(exc, ApigeeUnavailable | OSError)  # TimeoutError is an OSError
            log.warning(
                "analytics upload of %s to %s~%s failed (%d in a row), retry in %.1f s: %s",
                file.path.name, org, env, state.failures, state.delay, str(exc) or type(exc).__name__,
                exc_info=not expected,  # a traceback only for a bug
            )  # fmt: skip
            return "transient"
        self._retries.pop(file.path, None)
        self._hold_until = float("-inf")
        self._count(org, env, "ok")
        self._metrics.analytics_records.labels(org, env, "uploaded").inc(file.records)
        log.debug("analytics file %s uploaded to %s~%s (%d records)", file.path.name, org, env, file.records)
        try:
            self._source.done(file)
        except Exception:
            log.exception("analytics file %s uploaded but not deleted: it will be sent again", file.path)
        return "ok"

    async def _publish(self, file: F, state: _Retry) -> None:
        """axpublisher: POST the file's records in batches, resuming after the last accepted batch."""
        org, env = file.tenant
        records = await asyncio.to_thread(_read_records, file.path)
        for start in range(state.published, len(records), self._batch):
            batch = records[start : start + self._batch]
            await self._client.publish(org, env, batch)
            state.published = start + len(batch)

    def _back_off(self, state: _Retry, hint: float | None) -> None:
        state.failures += 1
        base = min(BACKOFF_FIRST * 2.0 ** min(state.failures - 1, 32), BACKOFF_MAX)
        delay = base * (0.5 + 0.5 * self._random())
        state.delay = max(delay, hint) if hint is not None else delay  # Apigee's Retry-After wins
        state.due = self._clock.monotonic() + state.delay

    def _quarantine(self, file: F, reason: str, why: str) -> None:
        org, env = file.tenant
        log.error("analytics file %s for %s~%s quarantined (%s): %s", file.path, org, env, reason, why)
        try:
            self._source.quarantine(file, reason)
        except Exception:
            log.exception("cannot quarantine analytics file %s", file.path)

    def _count(self, org: str, env: str, result: str) -> None:
        self._metrics.analytics_uploads.labels(org, env, result).inc()


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a gzip NDJSON file. Raises OSError when unreadable, _CorruptFile when malformed."""
    raw = path.read_bytes()
    try:
        lines = gzip.decompress(raw).splitlines()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _CorruptFile(f"not a complete gzip file: {exc}") from exc
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise _CorruptFile(f"line {number} is not JSON") from exc
        if not isinstance(record, dict):
            raise _CorruptFile(f"line {number} is not a JSON object")
        records.append(record)
    return records
