"""Measurements that must stay inside one UTC calendar minute (quota windows on the real clock).

When a minute boundary passes during a measurement, the window reset mid-run and its counts mean nothing,
so it runs once more with the next identity (another app's key: a fresh quota bucket) instead of sleeping
to the next minute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Run(Generic[T]):
    """One measurement that stayed inside one calendar minute."""

    identity: int  # the index into QUOTA_KEYS it used
    result: T
    started: float
    ended: float

    @property
    def window_end(self) -> float:
        return (self.started // 60 + 1) * 60

    def reset_range(self) -> range:
        """The ratelimit-reset values a response sent during the run may carry (whole seconds, >= 1)."""
        low = max(math.ceil(self.window_end - self.ended), 1)
        return range(low, math.ceil(self.window_end - self.started) + 1)


def _crossed(identity: int) -> None:
    print(f"a minute boundary passed during the run with identity {identity}; running it again")


def in_one_minute(measure: Callable[[int], T], first: int = 0) -> Run[T]:
    """``measure(identity)``, again with ``identity + 1`` if a minute boundary passed during the first run."""
    for identity in (first, first + 1):
        started = time.time()
        result = measure(identity)
        ended = time.time()
        if started // 60 == ended // 60:
            return Run(identity, result, started, ended)
        _crossed(identity)
    raise AssertionError("two runs in a row crossed a minute boundary")


async def in_one_minute_async(measure: Callable[[int], Awaitable[T]], first: int = 0) -> Run[T]:
    """``in_one_minute`` for a coroutine function."""
    for identity in (first, first + 1):
        started = time.time()
        result = await measure(identity)
        ended = time.time()
        if started // 60 == ended // 60:
            return Run(identity, result, started, ended)
        _crossed(identity)
    raise AssertionError("two runs in a row crossed a minute boundary")
