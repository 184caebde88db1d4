"""Buffer: this replica's analytics records, durable on disk from a flush until the uploader confirms them.

One gzip file per tenant (``org~env``) open in ``temp/``, rotated into ``staging/``; the directory layout,
its lock and the salvage of files left behind are ``layout``'s.

Format: one gzip member per file, what the Go adapter uploads (a reader that stops after the first member
of a concatenation would silently lose the rest). A flush compresses its lines, ends with Z_SYNC_FLUSH (the
deflate stream is byte-aligned, everything so far decodable) and fsyncs: a crash leaves a member without
its trailer, which ``recover`` reads up to the last complete line. A failed write (ENOSPC) is rolled back,
the compressor restored from a copy taken before it and the file truncated to its last good length, so the
file stays one valid stream and the next flush tries again. Rotation writes the trailer, fsyncs, renames
into staging and fsyncs both directories.

``put`` runs on the event loop and does no I/O. File work runs in a worker thread, one operation at a
time, under a lock held by a shielded task, so a cancelled caller never leaves two threads on one file.
``staged``/``done``/``quarantine`` (the uploader's side) are synchronous: an index lookup, an unlink, a
rename. Must not import grpc, envoy or httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from authz.analytics import gzipfile
from authz.analytics.layout import Layout, StagedFile, Tenant, tenant_dir, tenant_of
from authz.clock import Clock
from authz.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_FLUSH_INTERVAL: Final = 1.0
DEFAULT_COLLECTION_INTERVAL: Final = 120.0  # the Go adapter's analytics.collection_interval
DEFAULT_MAX_BYTES: Final = 1 << 30
DEFAULT_MAX_PENDING: Final = 10_000
DEFAULT_MAX_FILES: Final = 1024  # staged files kept: analytics.file_limit, as in the Go adapter

# --- the buffer ----------------------------------------------------------------------------------


@dataclass
class _Flushed:
    tenant: Tenant
    lines: int
    error: str | None = None  # a drop reason
    opened: gzipfile.OpenFile | None = None


class Buffer:
    def __init__(
        self, temp_dir: str | Path, org: str, metrics: Metrics, clock: Clock, *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        collection_interval: float = DEFAULT_COLLECTION_INTERVAL, max_bytes: int = DEFAULT_MAX_BYTES,
        max_pending: int = DEFAULT_MAX_PENDING, max_files: int = DEFAULT_MAX_FILES,
    ) -> None:  # fmt: skip
        self._layout = Layout(temp_dir)
        self.root = self._layout.root
        self._org = org
        self._metrics = metrics
        self._clock = clock
        self._flush_interval = flush_interval
        self._collection_interval = collection_interval
        self._max_bytes = max_bytes
        self._max_files = max_files
        self._max_pending = max_pending
        self._pending: dict[Tenant, list[bytes]] = {}
        self._count = 0  # lines pending or being written: the memory bound
        self._tenants: set[Tenant] = set()  # validated
        self._open: dict[Tenant, gzipfile.OpenFile] = {}
        self._stuck: dict[Path, int] = {}  # temp files that failed to close or rename: salvaged at rotation
        self._staged: dict[Path, StagedFile] = {}
        self._lock = asyncio.Lock()
        self._stopped = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drops: dict[str, Any] = {}
        self._failing: set[str] = set()  # why the last flush dropped lines (logged once per run)

    @property
    def pending(self) -> int:
        """Lines accepted by ``put`` and not yet on disk."""
        return self._count

    # --- the request path ---------------------------------------------------------------------------

    def put(self, tenant: Tenant, line: bytes) -> bool:
        """Queue one NDJSON line (a JSON record and ``\\n``) for tenant; never blocks, no I/O.

        False when refused, counted in ``analytics_records_dropped``: queue_full (``max_pending`` lines
        wait already), invalid (a tenant unfit for a directory name, not exactly one line), shutdown.
        """
        if self._count >= self._max_pending:
            return self._drop("queue_full")
        lines = self._pending.get(tenant)
        if lines is None:
            if self._closed:
                return self._drop("shutdown")
            if tenant not in self._tenants:
                if tenant_dir(tenant) is None:
                    return self._drop("invalid")
                self._tenants.add(tenant)
            lines = self._pending[tenant] = []
        if len(line) < 2 or line.find(b"\n") != len(line) - 1:
            return self._drop("invalid")
        lines.append(line)
        self._count += 1
        return True

    def _drop(self, reason: str, records: int = 1) -> Literal[False]:
        counter = self._drops.get(reason)
        if counter is None:
            counter = self._drops[reason] = self._metrics.analytics_dropped.labels(self._org, reason)
        counter.inc(records)
        return False

    # --- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Every flush_interval: flush, stage the files older than collection_interval; until close()."""
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._flush_interval)
            if self._stopped.is_set():
                break  # close() does the last flush
            try:
                await self.rotate(due_only=True)
            except Exception:  # the loop must outlive any one bad pass
                log.exception("analytics flush failed")

    async def flush(self) -> None:
        """Write every pending line to its tenant's open file and fsync: the lines are then accepted."""
        await self._exclusive(self._flush)

    async def rotate(self, *, due_only: bool = False) -> None:
        """Flush, then close the open files (only those older than collection_interval when due_only)
        and move them to staging; apply the disk cap."""
        await self._exclusive(lambda: self._rotate(due_only))

    async def close(self) -> None:
        """Shutdown: refuse new lines, end ``run``, flush and stage every open file."""
        self._closed = True
        self._stopped.set()
        try:
            await self.rotate()
        finally:
            self._layout.unlock()

    async def recover(self) -> None:
        """At start, before ``run``: take the directory (one process per temp_dir), index staging/, and
        salvage every file left in temp/ into staging for its own tenant (its directory's name); a file
        with nothing readable goes to quarantine.

        Raises:
            ListenError: another process (or service) holds this temp_dir.
        """
        self._layout.lock()
        await self._exclusive(self._recover)

    async def _exclusive(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run op under the lock in a task of its own: cancelling the caller never stops file work half
        way (a worker thread cannot be stopped), and the next operation waits for it."""

        async def locked() -> T:
            async with self._lock:
                return await op()

        task = asyncio.ensure_future(locked())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_failure)  # nobody awaits it any more
            raise

    async def _flush(self) -> None:
        batches, self._pending = self._pending, {}
        if not batches:
            return
        room = self._temp_bytes() < self._max_bytes
        try:
            results = await asyncio.to_thread(
                self._append_batches, batches, room, self._clock.now(), self._clock.monotonic()
            )
        finally:
            self._count -= sum(map(len, batches.values()))
        failed: dict[str, int] = {}
        for result in results:
            if result.opened is not None:
                self._open[result.tenant] = result.opened
            current = self._open.get(result.tenant)
            if current is not None and current.broken:
                del self._open[result.tenant]
                self._stuck[current.path] = current.size
            if result.error is None:
                accepted = self._metrics.analytics_records.labels(self._org, result.tenant[1], "accepted")
                accepted.inc(result.lines)
            else:
                failed[result.error] = failed.get(result.error, 0) + result.lines
                self._drop(result.error, result.lines)
        for reason, records in failed.items():
            if reason not in self._failing:  # the first of a run of failures
                log.warning("analytics: %d records dropped (%s) writing to %s", records, reason, self.root)
        if self._failing and not failed:
            log.info("analytics: writing to %s again", self.root)
        self._failing = set(failed)
        await self._apply_cap()

    def _append_batches(
        self, batches: dict[Tenant, list[bytes]], room: bool, now: float, mono: float
    ) -> list[_Flushed]:
        """In the worker thread: append each tenant's lines to its open file (opened if need be)."""
        results = []
        for tenant, lines in batches.items():
            result = _Flushed(tenant, len(lines))
            results.append(result)
            if not room:  # the open files alone fill the cap: nothing staged is left to delete
                result.error = "overflow"
                continue
            f = self._open.get(tenant)
            try:
                if f is None:
                    f = result.opened = self._layout.new_file(tenant, now, mono)
                f.append(b"".join(lines), len(lines))
            except OSError as exc:
                log.debug("analytics write for %s~%s failed: %s", *tenant, exc)
                result.error = "disk_full"
                if f is not None and f.broken:
                    with contextlib.suppress(OSError):
                        os.close(f.fd)
        return results

    async def _rotate(self, due_only: bool) -> None:
        await self._flush()
        mono = self._clock.monotonic()
        closing = [
            f for f in self._open.values() if not due_only or mono - f.opened >= self._collection_interval
        ]
        for f in closing:
            del self._open[f.tenant]
        stuck, self._stuck = self._stuck, {}
        if closing or stuck:
            staged, reopened, self._stuck = await asyncio.to_thread(self._stage, closing, stuck)
            for f in reopened:
                self._open[f.tenant] = f
            self._add(staged)
        await self._apply_cap()

    def _stage(
        self, closing: list[gzipfile.OpenFile], stuck: dict[Path, int]
    ) -> tuple[list[StagedFile], list[gzipfile.OpenFile], dict[Path, int]]:
        """In the worker thread: finish each file and rename it into staging; salvage the stuck ones
        (their good bytes only). Returns the files staged, those still open, those still stuck."""
        staged: list[StagedFile] = []
        reopened: list[gzipfile.OpenFile] = []
        failed: dict[Path, int] = {}
        for f in closing:
            try:
                if f.records:
                    f.append(b"", 0, last=True)
            except OSError as exc:
                log.warning("analytics: cannot close %s: %s", f.path, exc)
                if not f.broken:
                    reopened.append(f)  # still a good stream: appended to, and closed at the next rotation
                    continue
            os.close(f.fd)
            try:
                if f.broken:
                    failed[f.path] = f.size
                elif f.records:
                    staged.append(self._layout.publish(f))
                else:  # every write to it failed
                    f.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("analytics: cannot stage %s: %s", f.path, exc)
                failed[f.path] = f.size
        for path, size in stuck.items():
            try:
                tenant = tenant_of(path.parent.name)
                assert tenant is not None  # a file this buffer opened
                result = self._layout.salvage(path, tenant, size)
            except OSError as exc:
                log.warning("analytics: cannot salvage %s: %s", path, exc)
                failed[path] = size
                continue
            if isinstance(result, StagedFile):
                staged.append(result)
            elif result == "corrupt":
                self._metrics.analytics_quarantined.labels(self._org, "corrupt").inc()
        return staged, reopened, failed

    async def _recover(self) -> None:
        in_use = {f.path for f in self._open.values()} | set(self._stuck)
        staged, corrupt = await asyncio.to_thread(self._layout.scan, in_use)
        if corrupt:
            self._metrics.analytics_quarantined.labels(self._org, "corrupt").inc(corrupt)
        self._add(staged)
        log.info("analytics: %d files staged, %d quarantined after recovery", len(self._staged), corrupt)
        await self._apply_cap()

    # --- the uploader's side --------------------------------------------------------------------------

    def staged(self) -> list[StagedFile]:
        """The files waiting for upload, oldest first."""
        return sorted(self._staged.values(), key=lambda f: (f.created, f.path.name))

    def done(self, file: StagedFile) -> None:
        """The upload of file was confirmed: delete it (it may be gone already, dropped by the disk cap)."""
        file.path.unlink(missing_ok=True)  # an error leaves it listed: uploaded twice rather than lost
        self._staged.pop(file.path, None)
        self._gauges()

    def quarantine(self, file: StagedFile, reason: str) -> None:
        """Set file aside in quarantine/ (kept, never listed again); its records count as dropped.

        The caller counts the file in ``analytics_files_quarantined`` under its reason (the uploader
        does); the buffer counts only those it quarantines itself (``corrupt``, at recovery).
        """
        if file.path not in self._staged:
            return  # dropped by the disk cap, or done
        self._layout.set_aside(file.path, file.tenant)
        del self._staged[file.path]
        self._drop("quarantined", file.records)
        log.info("analytics: %s set aside (%s), %d records", file.path, reason, file.records)
        self._gauges()

    # --- disk cap and gauges ----------------------------------------------------------------------------

    def _add(self, files: list[StagedFile]) -> None:
        for f in files:
            self._staged[f.path] = f

    def _temp_bytes(self) -> int:
        return sum(f.size for f in self._open.values()) + sum(self._stuck.values())

    async def _apply_cap(self) -> None:
        """Delete the oldest staged files until temp and staging fit in max_bytes and at most max_files
        are staged (never an open file)."""
        staged = self.staged()
        excess = self._temp_bytes() + sum(f.bytes for f in staged) - self._max_bytes
        victims = list(_until(staged if excess > 0 else [], excess))
        victims += staged[len(victims) : max(len(staged) - self._max_files, len(victims))]
        for f in victims:
            del self._staged[f.path]
        if victims:
            await asyncio.to_thread(_unlink_all, [f.path for f in victims])
            records = sum(f.records for f in victims)
            self._drop("overflow", records)
            log.warning(
                "analytics: disk cap (%d bytes, %d files) reached: %d oldest staged files gone (%d records)",
                self._max_bytes, self._max_files, len(victims), records,
            )  # fmt: skip
        self._gauges()

    def _gauges(self) -> None:
        org = self._org
        files = self._staged.values()
        self._metrics.analytics_staged_files.labels(org).set(len(files))
        self._metrics.analytics_staged_bytes.labels(org).set(self._temp_bytes() + sum(f.bytes for f in files))
        oldest = min((f.created for f in files), default=None)
        age = 0.0 if oldest is None else max(self._clock.now() - oldest, 0.0)
        self._metrics.analytics_oldest_staged.labels(org).set(age)


def _until(files: list[StagedFile], excess: int) -> Iterator[StagedFile]:
    for f in files:
        if excess <= 0:
            return
        yield f
        excess -= f.bytes


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("analytics file operation failed", exc_info=exc)
