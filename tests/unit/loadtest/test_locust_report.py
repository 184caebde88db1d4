"""loadtest/locust_report.py: Locust's final stats read back, the verdict and the printed summary."""

import json

from loadtest.locust_outcomes import (
    INVALID_KEY,
    QUOTA,
    VALID_KEY,
    WRONG_PATH,
    Outcome,
    QuotaCheck,
    Tally,
)
from loadtest.locust_report import Report, build_report, format_report, percentile, rows_from_entries


def entry(name, histogram, failures=0, start=1000.0, last=1010.0):
    """One stats entry as Locust's --json-file writes it (response_times keys are JSON strings)."""
    return {
        "name": name,
        "method": "GET",
        "last_request_timestamp": last,
        "start_time": start,
        "num_requests": sum(histogram.values()),
        "num_none_requests": 0,
        "num_failures": failures,
        "total_response_time": 0.0,
        "max_response_time": max(histogram),
        "min_response_time": min(histogram),
        "total_content_length": 0,
        "response_times": {str(k): v for k, v in histogram.items()},
        "num_reqs_per_sec": {},
        "num_fail_per_sec": {},
    }


def tally_for(counts, enabled=None):
    """A tally with ``counts`` = {scenario: {status: n}}; 200/401/403/429 as the scenario expects."""
    ok = {VALID_KEY: {200}, INVALID_KEY: {401}, WRONG_PATH: {403}, QUOTA: {200, 429}}
    tally = Tally(enabled=sorted(enabled or counts))
    for scenario, statuses in counts.items():
        for status, n in statuses.items():
            outcome = Outcome.OK if status in ok[scenario] else Outcome.WRONG_ALLOW
            for _ in range(n):
                tally.record(scenario, status, outcome, 1000.0, f"{scenario}: wrong allow: got {status}")
    return tally


def test_percentiles_are_computed_as_locust_does():
    # Locust walks down from the slowest: the first time at which at most int(n * p) requests are left
    # below it. With 100 requests, 50 of them at 1 ms, its p50 is 2 ms (the upper value at a tie).
    histogram = {1.0: 50, 2.0: 30, 3.0: 15, 9.0: 4, 40.0: 1}
    assert percentile(histogram, 0.50) == 2.0
    assert percentile(histogram, 0.49) == 1.0
    assert percentile(histogram, 0.80) == 3.0
    assert percentile(histogram, 0.95) == 9.0
    assert percentile(histogram, 0.99) == 40.0
    assert percentile(histogram, 0.0) == 1.0
    assert percentile({}, 0.5) is None


def test_rows_per_scenario_and_a_total_whose_rates_add_up():
    rows, total = rows_from_entries(
        [
            entry(VALID_KEY, {1: 60, 2: 30, 5: 10}, start=1000.0, last=1009.0),
            entry(INVALID_KEY, {1: 40, 3: 10}, failures=2, start=1000.5, last=1010.0),
        ]
    )
    assert rows[VALID_KEY].requests == 100 and rows[VALID_KEY].rps == 10.0  # over the whole 10 s run
    assert (rows[VALID_KEY].p50, rows[VALID_KEY].p95, rows[VALID_KEY].p99) == (1.0, 5.0, 5.0)
    assert rows[INVALID_KEY].failures == 2 and rows[INVALID_KEY].rps == 5.0
    assert (total.requests, total.failures, total.rps) == (150, 2, 15.0)
    assert (total.p50, total.p95, total.p99) == (1.0, 5.0, 5.0)  # 10 of 150 at 5 ms: more than 5 %
    assert total.failure_rate == 2 / 150
    assert rows_from_entries([])[1].requests == 0


def report_of(tmp_path, entries, tally, quota=None):
    path = tmp_path / "locust-stats.json"
    path.write_text(json.dumps(entries))
    return build_report(path, tally, quota)


def test_a_clean_run_passes_and_the_summary_prints_its_numbers(tmp_path):
    tally = tally_for({VALID_KEY: {200: 100}, QUOTA: {200: 5, 429: 45}})
    report = report_of(
        tmp_path,
        [entry(VALID_KEY, {2: 90, 4: 10}), entry(QUOTA, {1: 50})],
        tally,
        QuotaCheck(limit=5, window=60.0, slack=0, windows=1, allowed=5),
    )
    assert report.problems == [] and report.exit_code == 0
    text = format_report(report)
    assert "requests/s 15.0, failure rate 0.00%, p50/p95/p99 2/4/4 ms" in text
    assert "wrong outcomes 0 (wrong allows 0)" in text
    assert "quota: 5 allowed, at most 5 = (5 + 0) x 1 window(s) of 60s: holds" in text
    assert "200x5 429x45" in text
    assert (
        "scenarios off (weight 0, or no key or token given): invalid_key, jwt_cached, jwt_unique, wrong_path"
        in text
    )
    assert text.endswith("PASS")
    assert report.to_dict()["exit_code"] == 0


def test_wrong_allows_are_counted_apart_and_fail_the_run(tmp_path):
    tally = tally_for({VALID_KEY: {200: 10}, WRONG_PATH: {403: 7, 200: 3}})
    report = report_of(tmp_path, [entry(VALID_KEY, {1: 10}), entry(WRONG_PATH, {1: 10}, failures=3)], tally)
    assert report.wrong_allows == 3 and report.wrong_outcomes == 3
    assert report.problems == ["3 wrong allows: a 200 where a deny was due"]
    assert report.exit_code == 1
    text = format_report(report)
    assert "wrong outcomes 3 (wrong allows 3)" in text
    assert "failure x3: wrong_path: wrong allow: got 200" in text
    assert "quota: bound not checked" in text
    assert text.endswith("FAIL: 3 wrong allows: a 200 where a deny was due")


def test_other_wrong_outcomes_fail_the_run_too():
    tally = Tally(enabled=[VALID_KEY])
    tally.record(VALID_KEY, 503, Outcome.ERROR, 1.0)
    tally.record(VALID_KEY, 401, Outcome.WRONG_DENY, 1.0)
    rows, total = rows_from_entries([entry(VALID_KEY, {1: 2}, failures=2)])
    report = Report(rows, total, tally)
    assert report.problems == ["1 wrong deny outcomes", "1 error outcomes"]
    assert report.wrong_allows == 0 and report.exit_code == 1


def test_the_quota_key_admitted_beyond_its_bound_fails_the_run(tmp_path):
    tally = tally_for({QUOTA: {200: 11, 429: 5}})
    quota = QuotaCheck(limit=5, window=60.0, slack=0, windows=2, allowed=11)
    report = report_of(tmp_path, [entry(QUOTA, {1: 16})], tally, quota)
    assert report.problems == [
        "quota: 11 requests of the quota key allowed, at most 10 due (5 + 0 in each of 2 windows)"
    ]
    assert "VIOLATED" in format_report(report)


def test_an_enabled_scenario_that_sent_nothing_fails_the_run(tmp_path):
    tally = tally_for({VALID_KEY: {200: 4}}, enabled=[VALID_KEY, INVALID_KEY])
    report = report_of(tmp_path, [entry(VALID_KEY, {1: 4})], tally)
    assert report.problems == ["scenario invalid_key sent no requests"]


def test_locust_and_the_tally_disagreeing_fails_the_run(tmp_path):
    # e.g. stats read before Locust's last second was in them
    tally = tally_for({VALID_KEY: {200: 12}})
    report = report_of(tmp_path, [entry(VALID_KEY, {1: 10})], tally)
    assert report.problems == ["valid_key: Locust counted 10 requests and 0 failures, the tally 12 and 0"]


def test_reused_tokens_are_reported_but_do_not_fail_the_run(tmp_path):
    tally = tally_for({VALID_KEY: {200: 1}})
    tally.tokens_reused = 7
    report = report_of(tmp_path, [entry(VALID_KEY, {1: 1})], tally)
    assert report.exit_code == 0
    assert "7 jwt_unique requests reused a token" in format_report(report)
