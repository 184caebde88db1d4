"""QuotaManager: the buckets of this replica, charged by Check and synced with Apigee in the background.

Check calls ``charge_now`` (no I/O); when a bucket has no lease and already owes Apigee a request, it
returns None and Check awaits ``charge``, which waits (at most ``wait`` seconds) for that bucket's sync and
then charges again; past the wait the request is admitted on credit. The sync loop (``run``) sends
pending weight every second, refreshes idle buckets once a minute, drops buckets idle for ten minutes,
and backs off per bucket (0.2 s doubling to 30 s, jittered) when Apigee fails. It never waits on a full
queue: at most ``MAX_SYNCS`` syncs run at once and a bucket has at most one. See ``bucket.py`` for the
accounting and the overshoot bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any, Final, Protocol

from authz.clock import Clock
from authz.decision.model import AuthorizedOperation
from authz.errors import ApigeeError
from authz.metrics import Metrics
from authz.quota.bucket import Bucket, Outcome

log = logging.getLogger(__name__)

TICK: Final = 1.0  # the sync loop's period
IDLE_REFRESH: Final = 60.0  # an idle bucket learns Apigee's count this often
IDLE_DROP: Final = 600.0  # a bucket unused this long is dropped (Apigee mode, or its window is over)
MAX_BUCKETS: Final = 100_000
MAX_SYNCS: Final = 10
SYNC_TIMEOUT: Final = 5.0
BACKOFF_FIRST: Final = 0.2
BACKOFF_MAX: Final = 30.0
DEFAULT_WAIT: Final = 0.25


class QuotaAnswer(Protocol):
    @property
    def used(self) -> int: ...

    @property
    def exceeded(self) -> int: ...

    @property
    def expiry(self) -> float: ...  # epoch seconds


class QuotaClient(Protocol):
    async def quotas(
        self, identifier: str, weight: int, interval: int, allow: int, time_unit: str
    ) -> QuotaAnswer: ...


# A request's quota outcome: allowed, and the tightest bucket's numbers (for the rate-limit headers).
QuotaResult = Outcome
FREE: Final = Outcome(True, 0, 0, 0.0)  # no operation of the request carries a quota


class _Sync:
    """One bucket's sync in flight and its backoff."""

    __slots__ = ("task", "failures", "retry_at", "waiting")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.failures = 0
        self.retry_at = 0.0  # monotonic
        self.waiting = 0


class QuotaManager:
    def __init__(
        self,
        metrics: Metrics,
        org: str,
        clock: Clock,
        client: QuotaClient | None = None,
        *,
        wait: float = DEFAULT_WAIT,
        per_id_metrics: bool = False,
        sync_timeout: float = SYNC_TIMEOUT,
    ) -> None:
        self._metrics = metrics
        self._org = org
        self._clock = clock
        self._client = client
        self._wait = wait
        self._sync_timeout = sync_timeout
        self._per_id = per_id_metrics
        self._buckets: dict[str, Bucket] = {}
        self._syncs: dict[str, _Sync] = {}
        self._slots = asyncio.Semaphore(MAX_SYNCS)
        self._counters: dict[tuple[str, bool], Any] = {}
        self._stopped = asyncio.Event()

    @property
    def remote(self) -> bool:
        return self._client is not None

    def __len__(self) -> int:
        return len(self._buckets)

    # --- the request path -------------------------------------------------------------------------

    def charge_now(self, operations: Sequence[AuthorizedOperation], env: str) -> QuotaResult | None:
        """Charge every quota of an authorized request (each bucket once), all or nothing. None: a bucket
        waits for its sync; await ``charge`` instead."""
        if len(operations) == 1:  # the common case, kept lean: it runs on every request
            found = self._one(operations[0], env, late=False)
        else:
            found = self._try(operations, env, late=False)
        return None if isinstance(found, str) else found

    async def charge(self, operations: Sequence[AuthorizedOperation], env: str) -> QuotaResult:
        """``charge_now``, waiting for syncs (at most ``wait`` seconds in all), then on credit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        late = False
        while True:
            found = self._try(operations, env, late=late or loop.time() >= deadline)
            if not isinstance(found, str):
                return found
            sync = self._start_sync(found)
            if sync is None or sync.task is None:
                late = True  # stopping or backing off: nothing to wait for
                continue
            sync.waiting += 1
            try:
                await asyncio.wait_for(asyncio.shield(sync.task), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                pass
            finally:
                sync.waiting -= 1

    def _one(self, op: AuthorizedOperation, env: str, *, late: bool) -> QuotaResult | str:
        quota = op.quota
        if quota is None or not op.quota_id:
            return FREE
        now = self._clock.now()
        bucket = self._buckets.get(op.quota_id)
        if bucket is None or not bucket.same_terms(quota.limit, quota.interval, quota.time_unit):
            bucket = self._bucket(op.quota_id, quota.limit, quota.interval, quota.time_unit, env, now)
        outcome = bucket.apply(now, late=late)
        if outcome is None:
            return op.quota_id
        self._note(op.quota_id, bucket, outcome, env)
        return outcome

    def _try(self, operations: Sequence[AuthorizedOperation], env: str, *, late: bool) -> QuotaResult | str:
        now = self._clock.now()
        taken: dict[str, tuple[Bucket, Outcome]] = {}
        for op in operations:
            quota = op.quota
            if quota is None or not op.quota_id or op.quota_id in taken:
                continue
            bucket = self._bucket(op.quota_id, quota.limit, quota.interval, quota.time_unit, env, now)
            outcome = bucket.apply(now, late=late)
            if outcome is None or not outcome.allowed:
                for done, given in taken.values():
                    done.refund(now, given)
                if outcome is None:
                    return op.quota_id
                self._note(op.quota_id, bucket, outcome, env)
                return outcome
            taken[op.quota_id] = (bucket, outcome)
        tightest = FREE
        for quota_id, (bucket, outcome) in taken.items():
            self._note(quota_id, bucket, outcome, env)
            if tightest is FREE or outcome.remaining < tightest.remaining:
                tightest = outcome
        return tightest

    def _note(self, quota_id: str, bucket: Bucket, outcome: Outcome, env: str) -> None:
        """Metrics for one charged bucket, and a sync when its lease runs low."""
        counter = self._counters.get((env, outcome.allowed))
        if counter is None:
            result = "allowed" if outcome.allowed else "exceeded"
            counter = self._counters[(env, outcome.allowed)] = self._metrics.quota_checks.labels(
                self._org, env, result
            )
        counter.inc()
        if outcome.unsynced:
            self._metrics.quota_admitted_unsynced.labels(self._org, env).inc()
        if self._per_id:
            self._metrics.quota_remaining.labels(self._org, env, quota_id).set(outcome.remaining)
        if bucket.remote and bucket.needs_sync():
            self._start_sync(quota_id)

    def _bucket(self, quota_id: str, limit: int, interval: int, unit: str, env: str, now: float) -> Bucket:
        bucket = self._buckets.get(quota_id)
        if bucket is not None:
            if bucket.same_terms(limit, interval, unit):
                return bucket
            if bucket.interval == interval and bucket.unit == unit:
                bucket.change_limit(limit)  # same window, new limit: counts carry over
                return bucket
            # A new interval or unit is a new calendar: start over (Apigee counts it apart too).
            log.info("quota %s changed to %d per %d %s", _short(quota_id), limit, interval, unit)
        elif len(self._buckets) >= MAX_BUCKETS:
            self._drop_idle(now, force=True)
        bucket = self._buckets[quota_id] = Bucket(limit, interval, unit, now, remote=self.remote)
        self._metrics.quota_buckets.labels(self._org).set(len(self._buckets))
        return bucket

    # --- syncs ------------------------------------------------------------------------------------

    def _start_sync(self, quota_id: str, *, refresh: bool = False) -> _Sync | None:
        """The bucket's sync in flight, starting one if none is and the bucket is not backing off."""
        if self._client is None or self._stopped.is_set():
            return None
        sync = self._syncs.get(quota_id)
        if sync is None:
            sync = self._syncs[quota_id] = _Sync()
        if sync.task is not None:
            return sync
        if self._clock.monotonic() < sync.retry_at:
            return None
        sync.task = asyncio.get_running_loop().create_task(self._sync(quota_id, sync, refresh))
        return sync

    async def _sync(self, quota_id: str, sync: _Sync, refresh: bool) -> None:
        assert self._client is not None
        try:
            async with self._slots:
                bucket = self._buckets.get(quota_id)
                if bucket is None:
                    return
                weight = bucket.begin_sync(self._clock.now(), sync.waiting, reserve=not refresh)
                try:
                    answer = await asyncio.wait_for(
                        self._client.quotas(quota_id, weight, bucket.interval, bucket.limit, bucket.unit),
                        self._sync_timeout,
                    )
                except (ApigeeError, TimeoutError) as exc:
                    bucket.fail_sync(self._clock.now())
                    sync.failures += 1
                    delay = min(BACKOFF_FIRST * 2 ** (sync.failures - 1), BACKOFF_MAX)
                    sync.retry_at = self._clock.monotonic() + delay * random.uniform(0.5, 1.0)  # noqa: S311
                    self._metrics.quota_syncs.labels(self._org, "error").inc()
                    log.warning("quota sync failed (%s); enforcing locally: %s", _short(quota_id), exc)
                    return
                bucket.end_sync(self._clock.now(), answer.used + answer.exceeded, answer.expiry)
                sync.failures, sync.retry_at = 0, 0.0
                self._metrics.quota_syncs.labels(self._org, "ok").inc()
        except asyncio.CancelledError:
            bucket = self._buckets.get(quota_id)
            if bucket is not None and bucket.syncing:
                bucket.fail_sync(self._clock.now())
            raise
        finally:
            sync.task = None

    def sync_due(self) -> None:
        """One pass of the loop: start the syncs that are due and drop idle buckets."""
        now = self._clock.now()
        if self._client is not None:
            for quota_id, bucket in list(self._buckets.items()):
                if bucket.needs_sync():
                    self._start_sync(quota_id)
                elif (
                    not bucket.syncing
                    and now - bucket.last_sync >= IDLE_REFRESH
                    and now - bucket.last_used < IDLE_DROP
                ):
                    self._start_sync(quota_id, refresh=True)
        self._drop_idle(now)

    def _drop_idle(self, now: float, *, force: bool = False) -> None:
        for quota_id, bucket in list(self._buckets.items()):
            idle = now - bucket.last_used >= IDLE_DROP
            over = now >= bucket.window_end
            if bucket.syncing or bucket.unsynced or not (idle or force) or not (bucket.remote or over):
                continue
            del self._buckets[quota_id]
            sync = self._syncs.get(quota_id)
            if sync is not None and sync.task is None:
                del self._syncs[quota_id]
            if force:
                break
        self._metrics.quota_buckets.labels(self._org).set(len(self._buckets))

    async def run(self) -> None:
        """The sync loop, until ``stop``."""
        while not self._stopped.is_set():
            try:
                self.sync_due()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("quota sync pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), TICK)

    async def drain(self) -> None:
        """Wait for the syncs in flight (tests, shutdown)."""
        tasks = [s.task for s in self._syncs.values() if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def flush(self, within: float) -> None:
        """Shutdown: send the weight not synced yet, within ``within`` seconds; then stop the loop."""
        if self._client is not None:
            for quota_id, bucket in list(self._buckets.items()):
                if bucket.unsynced:
                    self._syncs.get(quota_id, _Sync()).retry_at = 0.0
                    self._start_sync(quota_id, refresh=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain(), within)
        self._stopped.set()
        for sync in self._syncs.values():
            if sync.task is not None:
                sync.task.cancel()
        await self.drain()


def _short(quota_id: str) -> str:
    """A quota id names a developer and an app: log its product part only."""
    return quota_id.split("-", 1)[0] + "-..."
