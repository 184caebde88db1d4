"""One quota bucket: calendar windows and the accounting of one quota identifier. Pure and clock-driven.

A bucket never does I/O. ``apply`` admits or refuses one request at ``now``; in Apigee mode the manager
around it moves weight to and from Apigee's ``/quotas`` with ``begin_sync`` / ``end_sync`` /
``fail_sync``. Imports: the standard library only.

Windows are calendar windows in UTC, counted from 2019-01-01T00:00:00Z in steps of ``interval`` units
(the start time of the Apigee proxy's calendar quota). Once Apigee has answered, its ``expiryTime`` is the
window's end.

How a replica stays close to the limit without asking Apigee on every request (Apigee mode):

- **Leases.** A sync sends the weight admitted since the last one plus a *reservation*: about one second
  of this bucket's traffic, at most half of what is left. Apigee counts the whole weight, so the
  reservation is paid for before it is spent; the part of it that fits under the limit becomes the
  lease, and requests are admitted from the lease without I/O.
- **One unpaid request.** Without a lease, a replica admits one request on credit (when its last
  known count is under the limit) and starts a sync at once; other requests wait for that sync.
- **Offline.** When a sync fails, the bucket enforces the limit locally from its last known count
  (the Go adapter's behaviour) until a sync succeeds again; those admissions are counted as unsynced.

While syncs succeed in time, every admission beyond the limit is one of the unpaid ones, and a replica
admits an unpaid request only when its count after its last sync was under the limit: the total admitted
in a window is at most ``limit + replicas``. Requests that waited longer than the manager's wait for a
sync go on credit (``late``), so an Apigee slower than that wait loosens the bound towards
replicas x limit. Reserved requests that are not used by the end of the window are lost, which can
refuse requests a little before the limit (at most about a second of traffic per replica).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Final, NamedTuple

UNIT_SECONDS: Final = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
UNITS: Final = frozenset({*UNIT_SECONDS, "month"})
ORIGIN: Final = 1546300800  # 2019-01-01T00:00:00Z
RESERVE_SECONDS: Final = 1.0  # a reservation covers this much of the bucket's recent traffic
RATE_WINDOW: Final = 0.1  # seconds: the shortest span a rate is measured over


def window(now: float, interval: int, unit: str) -> tuple[float, float]:
    """The calendar window (start, end) in epoch seconds that holds ``now`` (UTC; end exclusive).

    Raises:
        ValueError: an unknown unit or an interval below 1.
    """
    if interval < 1:
        raise ValueError(f"quota interval {interval} is below 1")
    size = UNIT_SECONDS.get(unit)
    if size is not None:
        length = size * interval
        start = ORIGIN + (now - ORIGIN) // length * length
        return start, start + length
    if unit != "month":
        raise ValueError(f"unknown quota time unit {unit!r}")
    at = datetime.fromtimestamp(now, UTC)
    first = ((at.year - 2019) * 12 + at.month - 1) // interval * interval
    return _month(first), _month(first + interval)


def _month(index: int) -> float:
    """The start of the ``index``-th month after January 2019 (negative before it)."""
    return datetime(2019 + index // 12, index % 12 + 1, 1, tzinfo=UTC).timestamp()


class Outcome(NamedTuple):
    """One bucket's answer for one request."""

    allowed: bool
    limit: int
    remaining: int  # as far as this replica knows
    reset: float  # epoch seconds when the window ends
    unsynced: bool = False  # admitted without a lease while Apigee could not be reached (or on credit)


class Bucket:
    """The state of one quota identifier on this replica.

    ``remote=False`` (standalone mode) counts locally and never syncs: exact, per process.
    """

    __slots__ = (
        "limit",
        "interval",
        "unit",
        "remote",
        "window_end",
        "count",
        "lease",
        "unsynced",
        "sending",
        "reserving",
        "sending_end",
        "syncing",
        "offline",
        "granted",
        "admitted",
        "rate",
        "last_sync",
        "last_used",
    )

    def __init__(self, limit: int, interval: int, unit: str, now: float, *, remote: bool) -> None:
        self.limit = limit
        self.interval = interval
        self.unit = unit
        self.remote = remote
        self.window_end = window(now, interval, unit)[1]
        self.count = 0  # Apigee's count at the last sync (with our reservations); standalone: ours
        self.lease = 0  # reserved at Apigee and not spent yet
        self.unsynced = 0  # admitted without a lease and not sent yet
        self.sending = 0  # unsynced weight in the sync in flight
        self.reserving = 0  # reservation in the sync in flight
        self.sending_end = 0.0  # the window the sync in flight was sent in
        self.syncing = False
        self.offline = False
        self.granted = 0  # the lease the last sync brought
        self.admitted = 0  # admissions since the last sync began (for the rate)
        self.rate = 0.0  # admissions per second, smoothed
        self.last_sync = now  # when the last sync began (or the bucket was made)
        self.last_used = now

    # --- requests -------------------------------------------------------------------------------

    def apply(self, now: float, *, late: bool = False) -> Outcome | None:
        """Admit or refuse one request at ``now``. None (Apigee mode): wait for the sync in flight and
        call again; ``late=True`` (the wait is over) admits on credit instead and never returns None."""
        if now >= self.window_end:
            self._roll(now)
        self.last_used = now
        if self.lease > 0:
            self.lease -= 1
            self.admitted += 1
            return Outcome(True, self.limit, self.remaining(), self.window_end)
        if self.count + self.unsynced + self.sending >= self.limit:
            return Outcome(False, self.limit, 0, self.window_end)
        if not self.remote:
            self.count += 1
            self.admitted += 1
            return Outcome(True, self.limit, self.remaining(), self.window_end)
        if not (self.offline or late or self.unsynced + self.sending == 0):
            return None
        self.unsynced += 1
        self.admitted += 1
        return Outcome(True, self.limit, self.remaining(), self.window_end, unsynced=True)

    def refund(self, now: float, outcome: Outcome) -> None:
        """Give back an admission (another quota of the same request refused it)."""
        if now >= self.window_end or not outcome.allowed:
            return  # a new window already forgot it
        self.admitted = max(self.admitted - 1, 0)
        if not self.remote:
            self.count = max(self.count - 1, 0)
        elif outcome.unsynced:
            self.unsynced = max(self.unsynced - 1, 0)
        else:
            self.lease += 1

    def remaining(self) -> int:
        """What this replica may still admit in this window, as far as it knows."""
        return max(self.limit - self.count + self.lease - self.unsynced - self.sending, 0)

    def needs_sync(self) -> bool:
        """Apigee mode: weight to send, or the lease half spent by traffic that keeps coming."""
        if not self.remote or self.syncing:
            return False
        return self.unsynced > 0 or (self.admitted > 0 and self.lease * 2 <= self.granted)

    # --- limits ---------------------------------------------------------------------------------

    def same_terms(self, limit: int, interval: int, unit: str) -> bool:
        return self.limit == limit and self.interval == interval and self.unit == unit

    def change_limit(self, limit: int) -> None:
        """A new limit for the same window: counts are kept; the next sync reports it to Apigee."""
        self.limit = limit

    # --- sync with Apigee -----------------------------------------------------------------------

    def begin_sync(self, now: float, demand: int = 0, *, reserve: bool = True) -> int:
        """Start a sync: returns the weight to send (unsynced admissions plus, with ``reserve``, a
        reservation for about a second of traffic or for the ``demand`` requests waiting, whichever is
        more)."""
        if now >= self.window_end:
            self._roll(now)
        # Over at least RATE_WINDOW: the first request alone must not look like a thousand a second.
        measured = self.admitted / max(now - self.last_sync, RATE_WINDOW)
        self.rate = measured if measured > self.rate else (self.rate + measured) / 2  # up fast, down slowly
        self.last_sync = now
        self.admitted = 0
        left = self.limit - self.count - self.unsynced
        wanted = max(math.ceil(self.rate * RESERVE_SECONDS), demand)
        self.reserving = max(min(wanted, left // 2), 0) if reserve else 0
        self.sending, self.unsynced = self.unsynced, 0
        self.sending_end = self.window_end
        self.syncing = True
        return self.sending + self.reserving

    def end_sync(self, now: float, count: int, expiry: float) -> None:
        """Apigee's answer: ``count`` (used + exceeded) in the window that ends at ``expiry``."""
        reserved = self.reserving
        self.syncing, self.sending, self.reserving, self.offline = False, 0, 0, False
        if expiry <= now:
            return  # counted in a window that is over
        if expiry != self.window_end:
            self.window_end = expiry  # Apigee's calendar wins over our estimate
            self.lease = 0
        self.count = count
        self.granted = min(max(reserved - max(count - self.limit, 0), 0), reserved)
        self.lease += self.granted

    def fail_sync(self, now: float) -> None:
        """The sync failed: keep its weight for the next one (same window) and enforce locally."""
        if now < self.window_end and self.sending_end == self.window_end:
            self.unsynced += self.sending
        self.syncing, self.sending, self.reserving, self.offline = False, 0, 0, True

    def _roll(self, now: float) -> None:
        """A new window: weight of the old one, unsynced or in flight, no longer counts here (the Go
        adapter drops it too)."""
        self.window_end = window(now, self.interval, self.unit)[1]
        self.count = self.lease = self.unsynced = self.sending = self.granted = 0
