"""loadtest/bench.py's command line and report lines (no processes started)."""

from pathlib import Path

import pytest

from loadtest import bench
from loadtest.bench_cases import RUNNERS
from loadtest.bench_core import CASES, HTTP_CASES, OPEN_LOOP_CASES, OpenLoopRun, Options, Result
from loadtest.bench_openloop import open_loop_table


def result(case: str, rps: float, **more) -> Result:
    return Result(case=case, label=CASES[case], rps=rps, **more)


def test_every_case_has_a_runner_and_the_http_and_open_loop_cases_exist():
    assert set(RUNNERS) == set(CASES) == set("abcdefghijklmno")
    assert set(HTTP_CASES) == set("klmn")
    assert set(OPEN_LOOP_CASES) <= set(CASES)


def test_cases_default_to_all_and_take_the_http_letters():
    assert bench.parse_args([]).cases == "".join(CASES)
    assert bench.parse_args(["--cases", "bklmn"]).cases == "bklmn"
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "z"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--open-loop-rate", "0"])


def test_http_ratios_against_both_no_ops_are_reported_not_checked():
    by_case = {r.case: r for r in (result("a", 100_000), result("b", 10_000), result("k", 40_000))}
    by_case["l"] = result("l", 36_000)
    by_case["m"] = result("m", 20_000)
    by_case["n"] = result("n", 30_000, error="boom")  # failed cases get no ratio
    lines = list(bench.http_ratios(by_case))
    assert lines[0].startswith("k/a = 0.40")
    assert lines[1].startswith("k/b = 4.00")
    assert lines[2].startswith("l/b = 3.60 (meets 3.0)  l/k = 0.90 (meets 0.85)")
    assert lines[3].startswith("m/b = 2.00 (below 3.0)  m/k = 0.50 (below 0.85)")
    assert len(lines) == 4


def test_open_loop_table_lists_the_runs_with_cpu_per_request():
    run = OpenLoopRun(
        rate=1000.0,
        scheduled=10_000,
        count=10_000,
        non_2xx=0,
        errors=0,
        queued=0,
        achieved_rps=1000.0,
        p50_ms=0.2,
        p90_ms=0.3,
        p99_ms=0.9,
        max_ms=3.0,
        send_lag_p99_ms=0.05,
        envoy_cpu=0.1,
        server_cpu=0.025,
    )
    opts = Options(
        duration=10, warmup=2, connections=32, ext_authz_timeout="0.5s", pin=True, log_dir=Path(".")
    )
    lines = list(open_loop_table([result("a", 1.0), result("l", 1.0, open_loop=run)], opts))
    assert lines[0].startswith("open loop at 1,000 req/s")
    (row,) = [line for line in lines if line.startswith(CASES["l"])]
    # p50 p90 p99 max, queued, Envoy and Python CPU at 1,000 req/s, Python µs a request (25 = 2.5% / 1,000)
    assert row.split()[-9:] == ["0.200", "0.300", "0.900", "3.00", "0", "10%", "2%", "25", "ok"]
    assert lines[-1] == "(the load generator's own lateness, p99 of every run: at most 0.050 ms)"
    assert list(open_loop_table([result("a", 1.0)], opts)) == []


def test_workers_line_compares_two_workers_with_one_and_shows_the_split():
    opts = Options(
        duration=10, warmup=2, connections=32, ext_authz_timeout="0.5s", pin=True, log_dir=Path(".")
    )
    by_case = {"c": result("c", 9_000), "o": result("o", 11_700, worker_checks=[600, 400])}
    assert list(bench.worker_lines(by_case, opts)) == [
        "o/c = 1.30  (2 workers against 1; workers on CPUs 0,1; checks: worker 0 60%, worker 1 40%)"
    ]
    assert bench.parse_args(["--workers-cpus", "1"]).workers_cpus == "1"
    del by_case["c"]
    assert list(bench.worker_lines(by_case, opts))[0].startswith("o: (workers on CPUs 0,1;")
    assert list(bench.worker_lines({}, opts)) == []
