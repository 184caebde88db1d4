"""Read a headless Locust run back (its ``--json-file`` and the locustfile's tally) and judge it.

:func:`read_stats` parses Locust's final stats (``--json-file PREFIX`` writes ``PREFIX.json`` as Locust
exits: one entry per request name, i.e. per scenario, with its response-time histogram) into rows with
requests/s and p50/p95/p99, computed as Locust computes them, plus a total. (The ``--csv`` files are
not used: Locust rewrites them once a second and not at exit, so they miss the last second.)
:func:`build_report` puts them next to the :class:`~loadtest.locust_outcomes.Tally` and, when a quota
limit is known, the :class:`~loadtest.locust_outcomes.QuotaCheck`. :attr:`Report.problems` lists what
makes the run fail: wrong outcomes (wrong allows counted apart), an enabled scenario that sent nothing,
the quota key admitted beyond its bound, and Locust's counts disagreeing with the tally (a lost or
double-counted request). :func:`format_report` is what the runner prints.

Standard library only (no ``locust``): the unit tests import it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.locust_outcomes import SCENARIOS, Outcome, QuotaCheck, Tally

TOTAL = "total"


@dataclass(frozen=True)
class Row:
    """One request name's stats; latencies in ms as Locust keeps them (whole ms below 100 ms, then
    rounded to 2 significant digits)."""

    name: str
    requests: int
    failures: int
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def percentile(histogram: Mapping[float, int], fraction: float) -> float | None:
    """Locust's ``calculate_response_time_percentile``: the smallest recorded time with at most
    ``1 - fraction`` of the requests above it (None without requests)."""
    count = sum(histogram.values())
    if not count:
        return None
    wanted = int(count * fraction)
    seen = 0
    for value in sorted(histogram, reverse=True):
        seen += histogram[value]
        if count - seen <= wanted:
            return value
    return 0.0


def _row(name: str, requests: int, failures: int, seconds: float, histogram: Mapping[float, int]) -> Row:
    rps = requests / seconds if seconds > 0 else 0.0
    p50, p95, p99 = (percentile(histogram, fraction) for fraction in (0.50, 0.95, 0.99))
    return Row(name, requests, failures, rps, p50, p95, p99)


def rows_from_entries(entries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Row], Row]:
    """Rows by request name, and the total, from Locust's serialized stats entries. Requests/s are over
    the whole run (first entry's start to the last request), so the scenarios' rates add up to the total."""
    if not entries:
        return {}, Row(TOTAL, 0, 0, 0.0, None, None, None)
    start = min(float(entry["start_time"]) for entry in entries)
    end = max(float(entry["last_request_timestamp"] or start) for entry in entries)
    rows: dict[str, Row] = {}
    everything: Counter[float] = Counter()
    requests = failures = 0
    for entry in entries:
        histogram = Counter({float(k): int(v) for k, v in entry["response_times"].items()})
        everything.update(histogram)
        name = str(entry["name"])
        count, failed = int(entry["num_requests"]), int(entry["num_failures"])
        rows[name] = _row(name, count, failed, end - start, histogram)
        requests, failures = requests + count, failures + failed
    return rows, _row(TOTAL, requests, failures, end - start, everything)


def read_stats(path: Path) -> tuple[dict[str, Row], Row]:
    """``PREFIX.json`` (``--json-file PREFIX``) as rows by request name and the total.

    Raises:
        ValueError: not a list of Locust stats entries.
    """
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of Locust stats entries")
    return rows_from_entries(entries)


@dataclass
class Report:
    rows: dict[str, Row]
    total: Row
    tally: Tally
    quota: QuotaCheck | None = None

    @property
    def wrong_allows(self) -> int:
        return self.tally.count(Outcome.WRONG_ALLOW)

    @property
    def wrong_outcomes(self) -> int:
        return self.tally.wrong()

    @property
    def problems(self) -> list[str]:
        """Why the run fails; empty when it passes."""
        found: list[str] = []
        if self.wrong_allows:
            found.append(f"{self.wrong_allows} wrong allows: a 200 where a deny was due")
        for outcome in (Outcome.WRONG_DENY, Outcome.WRONG_STATUS, Outcome.ERROR):
            if count := self.tally.count(outcome):
                found.append(f"{count} {outcome.value.replace('_', ' ')} outcomes")
        for name in self.tally.enabled:
            if not self.tally.requests(name):
                found.append(f"scenario {name} sent no requests")
        if self.quota is not None and not self.quota.holds:
            found.append(
                f"quota: {self.quota.allowed} requests of the quota key allowed, at most "
                f"{self.quota.bound} due ({self.quota.limit} + {self.quota.slack} in each of "
                f"{self.quota.windows} windows)"
            )
        found.extend(self._disagreements())
        return found

    def _disagreements(self) -> list[str]:
        found = []
        for name in sorted(set(self.rows) | set(self.tally.statuses)):
            row = self.rows.get(name)
            requests, failures = (row.requests, row.failures) if row else (0, 0)
            if requests != self.tally.requests(name) or failures != self.tally.wrong(name):
                found.append(
                    f"{name}: Locust counted {requests} requests and {failures} failures, the tally "
                    f"{self.tally.requests(name)} and {self.tally.wrong(name)}"
                )
        return found

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": {name: asdict(row) for name, row in self.rows.items()},
            "total": asdict(self.total),
            "tally": self.tally.to_dict(),
            "quota": None if self.quota is None else {**asdict(self.quota), "bound": self.quota.bound},
            "wrong_allows": self.wrong_allows,
            "wrong_outcomes": self.wrong_outcomes,
            "problems": self.problems,
            "exit_code": self.exit_code,
        }


def build_report(stats_json: Path, tally: Tally, quota: QuotaCheck | None = None) -> Report:
    rows, total = read_stats(stats_json)
    return Report(rows, total, tally, quota)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _statuses(tally: Tally, name: str) -> str:
    counts = tally.statuses.get(name)
    if not counts:
        return ""
    return " ".join(f"{status or 'none'}x{count}" for status, count in sorted(counts.items()))


def format_report(report: Report) -> str:
    """The runner's summary: a table per scenario, totals, wrong outcomes, quota bound and the verdict."""
    columns = ("requests", "fails", "req/s", "p50", "p95", "p99")
    widths = (9, 6, 8, 5, 5, 5)
    header = f"{'scenario':<12} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    header += "  statuses"
    lines = [header, "-" * len(header)]
    names = [name for name in SCENARIOS if name in report.rows] + sorted(set(report.rows) - set(SCENARIOS))
    for row in [*(report.rows[name] for name in names), report.total]:
        label = row.name
        lines.append(
            f"{label:<12} {row.requests:>9} {row.failures:>6} {row.rps:>8.1f} {_ms(row.p50):>5} "
            f"{_ms(row.p95):>5} {_ms(row.p99):>5}  {_statuses(report.tally, row.name)}"
        )
    total = report.total
    lines.append(
        f"requests/s {total.rps:.1f}, failure rate {total.failure_rate:.2%}, "
        f"p50/p95/p99 {_ms(total.p50)}/{_ms(total.p95)}/{_ms(total.p99)} ms (Locust's client-side times)"
    )
    lines.append(f"wrong outcomes {report.wrong_outcomes} (wrong allows {report.wrong_allows})")
    if off := [name for name in SCENARIOS if name not in report.tally.enabled]:
        lines.append(f"scenarios off (weight 0, or no key or token given): {', '.join(off)}")
    if report.quota is not None:
        check = report.quota
        verdict = "holds" if check.holds else "VIOLATED"
        lines.append(
            f"quota: {check.allowed} allowed, at most {check.bound} = ({check.limit} + {check.slack}) x "
            f"{check.windows} window(s) of {check.window:.0f}s: {verdict}"
        )
    else:
        lines.append("quota: bound not checked (no --quota-limit)")
    if report.tally.tokens_reused:
        lines.append(
            f"note: {report.tally.tokens_reused} jwt_unique requests reused a token (the pool ran out): "
            "raise --jwt-pool"
        )
    for message, count in report.tally.failures.most_common(10):
        lines.append(f"  failure x{count}: {message}")
    problems = report.problems
    lines.append("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return "\n".join(lines)
