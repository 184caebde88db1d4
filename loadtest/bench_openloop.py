"""``make bench``'s open-loop section: latency at a fixed, moderate rate, where a sidecar spends its life.

wrk's p50/p99 are at saturation (closed loop): they say how deep the queues get, not what a request costs
when the service keeps up. After the closed-loop run of each of OPEN_LOOP_CASES (the gRPC no-op (b) and
authz (c), the HTTP no-op (k) and authz (l)), on the same processes, ``loadtest/openloop.py`` sends
``--open-loop-rate`` requests a second (default 1,000) for ``--open-loop-duration`` seconds, each due at a
fixed time and timed from then (so a stall shows in every request it delays: no coordinated omission).
It is pinned with Envoy as wrk is (CPU 0; the Python server has CPU 1). The run fails unless every
request got a 2xx answer and Envoy's ``ext_authz.ok`` counted each one.

The CPU columns are the share of one core used at that rate; ``py µs/req`` is the Python server's CPU
time per request, which no closed-loop number shows directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Iterator

from devstack.envoy import stats
from devstack.procs import Proc
from loadtest.bench_core import HERE, CaseError, Load, OpenLoopRun, Options, Result, cpu_seconds
from loadtest.openloop import REPORT_PREFIX

DRAIN_TIMEOUT = 2.0  # seconds openloop waits for the last answers
EXTRA_TIMEOUT = 30.0  # seconds the subprocess may overrun the schedule before we give up on it


def measure_open_loop(
    url: str, load: Load, envoy: Proc, server: Proc | None, admin_port: int, opts: Options
) -> OpenLoopRun:
    """One open-loop run of ``url`` with ``load``'s headers; checked against Envoy's counters."""
    argv = [
        sys.executable,
        "-m",
        "loadtest.openloop",
        url,
        "--rate",
        str(opts.open_loop_rate),
        "--duration",
        str(opts.open_loop_duration),
        "--connections",
        str(opts.open_loop_connections),
        "--drain-timeout",
        str(DRAIN_TIMEOUT),
        "--json",
    ]
    for name, value in load.headers.items():
        argv += ["--header", f"{name}: {value}"]
    if opts.pin:
        argv = ["taskset", "-c", "0", *argv]
    before = stats(admin_port)
    cpu_before = {p.pid: cpu_seconds(p.pid) for p in (envoy, server) if p is not None}
    timeout = opts.open_loop_duration + DRAIN_TIMEOUT + EXTRA_TIMEOUT
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=HERE.parent
        )
    except subprocess.TimeoutExpired as exc:
        raise CaseError(f"the open-loop run did not finish within {timeout:.0f}s") from exc
    cpu_used = {pid: cpu_seconds(pid) - used for pid, used in cpu_before.items()}
    after = stats(admin_port)
    report = next((line for line in done.stdout.splitlines() if line.startswith(REPORT_PREFIX)), None)
    if report is None:
        raise CaseError(f"openloop exited {done.returncode} without a report:\n{done.stdout}\n{done.stderr}")
    numbers = json.loads(report.removeprefix(REPORT_PREFIX))
    wall = numbers["scheduled"] / opts.open_loop_rate  # the schedule's length, which the CPU time spans
    run = OpenLoopRun(
        rate=opts.open_loop_rate,
        scheduled=numbers["scheduled"],
        count=numbers["count"],
        non_2xx=numbers["non_2xx"],
        errors=numbers["errors"],
        queued=numbers["queued"],
        achieved_rps=numbers["achieved_rps"],
        p50_ms=numbers["p50_ms"],
        p90_ms=numbers["p90_ms"],
        p99_ms=numbers["p99_ms"],
        max_ms=numbers["max_ms"],
        send_lag_p99_ms=numbers["send_lag_p99_ms"],
        envoy_cpu=cpu_used[envoy.pid] / wall,
        server_cpu=cpu_used[server.pid] / wall if server is not None else None,
    )

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    problems = []
    if run.count != run.scheduled or run.errors:
        problems.append(f"{run.count} of {run.scheduled} requests answered, {run.errors} errors")
    if run.non_2xx:
        problems.append(f"{run.non_2xx} non-2xx answers")
    ok_2xx = delta("http.ingress_http.downstream_rq_2xx")
    authz_ok = delta("http.ingress_http.ext_authz.ok")
    if authz_ok < ok_2xx:
        problems.append(f"ext_authz.ok {authz_ok} < 2xx responses {ok_2xx}: ext_authz was skipped")
    if problems:
        run.error = "open loop: " + "; ".join(problems)
    return run


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def pct(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


def open_loop_table(results: Iterable[Result], opts: Options) -> Iterator[str]:
    """The section's heading and table, for the results that have an open-loop run."""
    runs = [(r.label, r.open_loop) for r in results if r.open_loop is not None]
    if not runs:
        return
    pinning = "Envoy + load CPU 0, Python CPU 1" if opts.pin else "not pinned"
    yield (
        f"open loop at {opts.open_loop_rate:,.0f} req/s (loadtest/openloop.py, {opts.open_loop_connections} "
        f"connections, {opts.open_loop_duration:g}s after the case's closed-loop run; latency from each "
        f"request's due time; {pinning})"
    )
    width = max([44, *(len(label) for label, _ in runs)])
    yield (
        f"{'case':{width}} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'queued':>6} "
        f"{'envoy cpu':>9} {'py cpu':>7} {'py µs/req':>9}  status"
    )
    for label, run in runs:
        per_request = run.server_cpu / run.rate * 1e6 if run.server_cpu is not None else None
        yield (
            f"{label:{width}} {run.p50_ms:7.3f} {run.p90_ms:7.3f} {run.p99_ms:7.3f} {run.max_ms:7.2f} "
            f"{run.queued:>6} {pct(run.envoy_cpu):>9} {pct(run.server_cpu):>7} {fmt(per_request, '9.0f')}  "
            f"{'ok' if run.error is None else 'ERROR'}"
        )
    lag = max(run.send_lag_p99_ms for _, run in runs)
    yield f"(the load generator's own lateness, p99 of every run: at most {lag:.3f} ms)"
