"""What the Locust scenarios expect, how an answer is judged, and the tally of answers per scenario.

Shared by ``loadtest/locustfile.py`` (inside Locust, under gevent) and ``loadtest/locust_run.py`` (the
headless runner, which reads the tally back), so it imports the standard library only: never ``locust``,
``gevent`` or the ``authz`` package, and the unit tests can import it.

Every answer is one of:

* ``ok``: a status the scenario expects (a 200 or a 429 both are, for the quota key);
* ``wrong_allow``: an allow (2xx, or the configured allow status) where a deny was due. The one that
  matters most: the gateway let through a request it had to refuse;
* ``wrong_deny``: a 4xx where an allow was due (the caller was refused by mistake);
* ``wrong_status``: a deny where a deny was due, but with another status (403 for an unknown key);
* ``error``: anything else: 5xx (authz's 503 when it cannot decide, Envoy's timeouts), no response (0).

The quota key's 200s cannot be judged one by one; :func:`quota_bound` gives the most a run may admit:
``(limit + slack)`` per calendar window it touched. Windows are counted in UTC from 2019-01-01, as authz
counts them (README, Quotas), so a run that crosses a minute boundary may admit two minutes' worth.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

VALID_KEY = "valid_key"
INVALID_KEY = "invalid_key"
JWT_CACHED = "jwt_cached"
JWT_UNIQUE = "jwt_unique"
QUOTA = "quota"
WRONG_PATH = "wrong_path"
SCENARIOS = (VALID_KEY, INVALID_KEY, JWT_CACHED, JWT_UNIQUE, QUOTA, WRONG_PATH)
# Relative task weights: mostly allowed traffic, as a gateway sees it, with every deny path exercised.
DEFAULT_WEIGHTS: dict[str, int] = {
    VALID_KEY: 4,
    INVALID_KEY: 2,
    JWT_CACHED: 2,
    JWT_UNIQUE: 1,
    QUOTA: 1,
    WRONG_PATH: 1,
}
# Default paths, those of the runner's local catalog (loadtest/locust_stack.py).
DEFAULT_PATH = "/v1/items"  # covered by the valid key's product
DEFAULT_QUOTA_PATH = "/v1/limited"  # the quota key's product, with a small quota
DEFAULT_WRONG_PATH = "/v2/forbidden"  # no product covers it
QUOTA_EPOCH = 1_546_300_800.0  # 2019-01-01T00:00:00Z: authz's (and Apigee's) calendar quota origin


def option_env(option: str) -> str:
    """The environment variable of a locustfile option: ``authz-api-key`` -> ``LOCUST_AUTHZ_API_KEY``."""
    return "LOCUST_" + option.upper().replace("-", "_")


class Outcome(StrEnum):
    OK = "ok"
    WRONG_ALLOW = "wrong_allow"
    WRONG_DENY = "wrong_deny"
    WRONG_STATUS = "wrong_status"
    ERROR = "error"


WRONG_OUTCOMES = (Outcome.WRONG_ALLOW, Outcome.WRONG_DENY, Outcome.WRONG_STATUS, Outcome.ERROR)


@dataclass(frozen=True)
class Expectation:
    """The statuses that are right for a scenario, and whether an allow is one of them."""

    ok: frozenset[int]
    allow_due: bool  # an allow is a right answer (valid key, JWTs, the quota key under its limit)
    allow_status: int = 200  # what the upstream answers when Envoy lets a request through

    def describe(self) -> str:
        return " or ".join(str(status) for status in sorted(self.ok))


def expectations(
    allow_status: int = 200,
    invalid_key_status: int = 401,
    wrong_path_status: int = 403,
    quota_status: int = 429,
) -> dict[str, Expectation]:
    """Each scenario's expectation; the statuses are the service's (README, deny table) by default."""
    allow = Expectation(frozenset({allow_status}), True, allow_status)
    return {
        VALID_KEY: allow,
        JWT_CACHED: allow,
        JWT_UNIQUE: allow,
        INVALID_KEY: Expectation(frozenset({invalid_key_status}), False, allow_status),
        WRONG_PATH: Expectation(frozenset({wrong_path_status}), False, allow_status),
        QUOTA: Expectation(frozenset({allow_status, quota_status}), True, allow_status),
    }


def classify(expect: Expectation, status: int) -> Outcome:
    """Judge one answer (``status`` 0: no HTTP response at all)."""
    if status in expect.ok:
        return Outcome.OK
    if 200 <= status < 300 or status == expect.allow_status:
        return Outcome.WRONG_DENY if expect.allow_due else Outcome.WRONG_ALLOW
    if 400 <= status < 500:
        return Outcome.WRONG_DENY if expect.allow_due else Outcome.WRONG_STATUS
    return Outcome.ERROR


def failure_message(scenario: str, outcome: Outcome, expect: Expectation, status: int) -> str:
    """The Locust failure text: names the scenario, the kind of wrong outcome, expected and got."""
    got = str(status) if status else "no response"
    return f"{scenario}: {outcome.value.replace('_', ' ')}: expected {expect.describe()}, got {got}"


def parse_weights(text: str) -> dict[str, int]:
    """``"valid_key=4,quota=0"`` over DEFAULT_WEIGHTS; 0 turns a scenario off.

    Raises:
        ValueError: an unknown scenario, a malformed item or a negative weight.
    """
    weights = dict(DEFAULT_WEIGHTS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(f"weights: {item!r}: expected SCENARIO=N with SCENARIO one of {SCENARIOS}")
        weight = int(value)
        if weight < 0:
            raise ValueError(f"weights: {item!r}: a weight is >= 0")
        weights[name] = weight
    return weights


@dataclass
class Tally:
    """Statuses and outcomes per scenario, plus when the quota key was used and how many unique-JWT
    requests had to reuse a token. Serialised as JSON between Locust processes and to the runner."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    quota_first: float | None = None  # epoch seconds of the first and last quota-key request
    quota_last: float | None = None
    tokens_reused: int = 0
    enabled: list[str] = field(default_factory=list)  # scenarios with a weight > 0
    failures: Counter[str] = field(default_factory=Counter)  # failure_message() -> count

    def record(self, scenario: str, status: int, outcome: Outcome, now: float, message: str = "") -> None:
        self.statuses.setdefault(scenario, Counter())[status] += 1
        self.outcomes.setdefault(scenario, Counter())[outcome.value] += 1
        if outcome is not Outcome.OK:
            self.failures[message or f"{scenario}: {outcome.value}: got {status}"] += 1
        if scenario == QUOTA:
            self.quota_first = now if self.quota_first is None else min(self.quota_first, now)
            self.quota_last = now if self.quota_last is None else max(self.quota_last, now)

    def requests(self, scenario: str) -> int:
        return sum(self.statuses.get(scenario, Counter()).values())

    def count(self, outcome: Outcome, scenario: str | None = None) -> int:
        names = [scenario] if scenario is not None else list(self.outcomes)
        return sum(self.outcomes.get(name, Counter())[outcome.value] for name in names)

    def wrong(self, scenario: str | None = None) -> int:
        return sum(self.count(outcome, scenario) for outcome in WRONG_OUTCOMES)

    def status_count(self, scenario: str, status: int) -> int:
        return self.statuses.get(scenario, Counter())[status]

    def merge(self, other: Tally) -> None:
        """Add ``other`` in (a worker's report into the master's tally)."""
        for scenario, counts in other.statuses.items():
            self.statuses.setdefault(scenario, Counter()).update(counts)
        for scenario, outcomes in other.outcomes.items():
            self.outcomes.setdefault(scenario, Counter()).update(outcomes)
        for when in (other.quota_first, other.quota_last):
            if when is not None:
                self.quota_first = when if self.quota_first is None else min(self.quota_first, when)
                self.quota_last = when if self.quota_last is None else max(self.quota_last, when)
        self.tokens_reused += other.tokens_reused
        self.failures.update(other.failures)
        self.enabled = sorted(set(self.enabled) | set(other.enabled))

    def drain(self) -> Tally:
        """Return the counts so far and start from zero (what a worker sends with each report)."""
        taken = Tally(
            self.statuses,
            self.outcomes,
            self.quota_first,
            self.quota_last,
            self.tokens_reused,
            self.enabled,
            self.failures,
        )
        self.statuses, self.outcomes, self.failures = {}, {}, Counter()
        self.quota_first = self.quota_last = None
        self.tokens_reused = 0
        return taken

    def to_dict(self) -> dict[str, Any]:
        return {
            "statuses": {s: {str(k): v for k, v in c.items()} for s, c in self.statuses.items()},
            "outcomes": {s: dict(c) for s, c in self.outcomes.items()},
            "quota_first": self.quota_first,
            "quota_last": self.quota_last,
            "tokens_reused": self.tokens_reused,
            "enabled": list(self.enabled),
            "failures": dict(self.failures),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tally:
        return cls(
            statuses={
                s: Counter({int(k): int(v) for k, v in c.items()}) for s, c in data["statuses"].items()
            },
            outcomes={
                s: Counter({str(k): int(v) for k, v in c.items()}) for s, c in data["outcomes"].items()
            },
            quota_first=data.get("quota_first"),
            quota_last=data.get("quota_last"),
            tokens_reused=int(data.get("tokens_reused", 0)),
            enabled=list(data.get("enabled", [])),
            failures=Counter({str(k): int(v) for k, v in data.get("failures", {}).items()}),
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def read(cls, path: Path) -> Tally:
        return cls.from_dict(json.loads(path.read_text()))


def quota_windows(first: float, last: float, window: float, origin: float = QUOTA_EPOCH) -> int:
    """How many calendar windows of ``window`` seconds (counted from ``origin``) [first, last] touches."""
    if window <= 0:
        raise ValueError("a quota window is > 0 seconds")
    return math.floor((last - origin) / window) - math.floor((first - origin) / window) + 1


@dataclass(frozen=True)
class QuotaCheck:
    """The quota key's 200s against the most the service may admit in the windows the run touched."""

    limit: int  # per window
    window: float  # seconds
    slack: int  # admissions beyond the limit a window may see (Apigee mode: one per replica)
    windows: int
    allowed: int

    @property
    def bound(self) -> int:
        return (self.limit + self.slack) * self.windows

    @property
    def holds(self) -> bool:
        return self.allowed <= self.bound


def quota_bound(
    tally: Tally, limit: int, window: float, slack: int = 0, allow_status: int = 200
) -> QuotaCheck:
    """The QuotaCheck for ``tally``'s quota-key requests (no windows when there were none)."""
    allowed = tally.status_count(QUOTA, allow_status)
    if tally.quota_first is None or tally.quota_last is None:
        return QuotaCheck(limit, window, slack, 0, allowed)
    return QuotaCheck(
        limit, window, slack, quota_windows(tally.quota_first, tally.quota_last, window), allowed
    )
