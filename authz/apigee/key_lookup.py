"""IndexedKeys: API keys answered from the key index first, ``/verifyApiKey`` only for keys it lacks.

The ``KeySource`` of Apigee mode when ``tenant.key_sync_interval`` is set. Lookup order:

1. **Index hit**: decided here with no I/O. A revoked or expired key is in the index too (inactive, or
   with its ``expiresAt``), so it is a 401 at once, with no round trip. The index holds digests only; the
   Credential handed to the caller (``client_id`` = the key, as the GCP proxy's tokens say) is built once
   and kept in a bounded memo; after a sync it is the same object as long as the key grants the same, so
   the allows cached on it stay valid.
2. **Index miss**: the ``ApiKeyCache`` (its cache, single flight and negative cache), then
   ``/verifyApiKey`` for a key created since the last sync. While an index is loaded, new calls go through
   a token bucket (``auth.api_key_verify_rate`` a second, the same as burst): a burst of random keys costs
   Apigee at most that many calls, and what is shed (in ``lookup`` already when the bucket is empty, so a
   shed key costs no task) is counted
   (``api_key_verifications_total{result="shed"}``) and answered 401, as unknown. Before the first index
   (sync and snapshot both unavailable) nothing is shed: the cache alone is what the service had before.
3. A key ``/verifyApiKey`` vouched for triggers an early sync of its app (``application_id``), so the next
   request finds it in the index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

from authz.apigee.key_index import digest, for_caller
from authz.apigee.key_sync import KeySync
from authz.apigee.keys import ApiKeyCache
from authz.clock import Clock
from authz.decision.model import Credential, DenyReason
from authz.metrics import Metrics

MEMO_SIZE: Final = 10_000  # keys whose caller Credential is kept; emptied whole when full


class TokenBucket:
    """``rate`` tokens a second, at most ``rate`` saved up (so a burst is at most ``rate`` calls)."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock.monotonic()

    def ready(self) -> bool:
        """Whether a token is there to take (refilling first)."""
        now = self._clock.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        return self._tokens >= 1

    def take(self) -> bool:
        if not self.ready():
            return False
        self._tokens -= 1
        return True


class IndexedKeys:
    def __init__(
        self, sync: KeySync, fallback: ApiKeyCache, org: str, metrics: Metrics, clock: Clock,
        verify_rate: float,
    ) -> None:  # fmt: skip
        self._sync = sync
        self._fallback = fallback
        self._bucket = TokenBucket(verify_rate, clock)
        # key -> (sync generation checked at, the index's credential, the caller's credential)
        self._memo: dict[str, tuple[int, Credential, Credential]] = {}
        self._refreshes: set[asyncio.Task[None]] = set()
        self._indexed = metrics.api_key_lookups.labels(org, "index")
        self._shed = metrics.api_key_verifications.labels(org, "shed")
        fallback.on_valid = self._verified

    def lookup(self, api_key: str) -> Credential | DenyReason | None:
        """The index's answer; else the fallback cache's (None: not known anywhere yet)."""
        index, generation = self._sync.index, self._sync.generation
        if index is not None and api_key.isascii():
            memo = self._memo.get(api_key)
            if memo is not None and memo[0] == generation:
                self._indexed.inc()
                return memo[2]
            key_digest = digest(api_key)
            stored = index.get(key_digest)
            if stored is not None:
                if memo is not None and memo[1] == stored:
                    found = memo[2]  # unchanged by the sync: the same object
                else:
                    found = for_caller(stored, api_key, key_digest)
                    if len(self._memo) >= MEMO_SIZE:
                        self._memo.clear()
                self._memo[api_key] = (generation, stored, found)
                self._indexed.inc()
                return found
        cached = self._fallback.lookup(api_key)
        if cached is None and index is not None and self._shedding(api_key):
            self._shed.inc()  # shed here, not in verify: a flood of random keys costs no task per key
            return DenyReason.UNKNOWN_KEY
        return cached

    def _shedding(self, api_key: str) -> bool:
        return not self._bucket.ready() and not self._fallback.in_flight(api_key)

    async def verify(self, api_key: str) -> Credential | DenyReason:
        """``/verifyApiKey`` for a key the index does not have, within the rate while an index is loaded."""
        if self._sync.index is not None and not self._fallback.in_flight(api_key) and not self._bucket.take():
            self._shed.inc()
            return DenyReason.UNKNOWN_KEY
        return await self._fallback.verify(api_key)

    async def close(self) -> None:
        """Cancel the early app syncs in flight (the fallback cache is closed by its owner)."""
        tasks = list(self._refreshes)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _verified(self, claims: Mapping[str, Any]) -> None:
        app_id = claims.get("application_id")
        if isinstance(app_id, str) and app_id and self._sync.index is not None:
            task = asyncio.get_running_loop().create_task(self._sync.refresh_app(app_id))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)
