"""What every ``make bench`` case shares: options, the load, results, the bench catalog, wrk and measure().

``loadtest/bench.py`` is the driver (its docstring lists the cases), ``loadtest/bench_cases.py`` starts
each case's processes and ``loadtest/bench_openloop.py`` adds the open-loop run at a fixed rate.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.envoy import stats
from devstack.procs import Proc, http_get

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_report.lua"
WRK_TOKENS_SCRIPT = HERE / "wrk_tokens.lua"  # case (f): one token a request, from a file
BENCH_API = "bench-api"
BENCH_PATH = "/v1/bench"
# Public, bench-only credential; the bench catalog holds its SHA-256.
BENCH_KEY = "bench-key-4c0f2a9e71d35b68"
READY_TIMEOUT = 30.0
HEALTHY_TIMEOUT = 10.0
WRK_EXTRA_TIMEOUT = 30.0  # seconds wrk may overrun its -d before we give up on it
DEFAULT_OPEN_LOOP_RATE = 1000.0  # req/s of the open-loop run (loadtest/openloop.py)
DEFAULT_OPEN_LOOP_CONNECTIONS = 16  # enough that nothing queues unless an answer takes 16 ms
CASES = {
    "a": "(a) Envoy direct_response",
    "b": "(b) Envoy + ext_authz -> no-op",
    "c": "(c) Envoy + ext_authz -> authz",
    "d": "(d) Envoy + ext_authz -> authz, Apigee",
    "e": "(e) Envoy + ext_authz -> authz, same JWT",
    "f": "(f) Envoy + ext_authz -> authz, unique JWTs",
    "g": "(g) Envoy + ext_authz -> authz, quota",
    "h": "(h) Envoy + ext_authz -> authz, Apigee, quota",
    "i": "(i) Envoy + ext_authz -> authz + access log",
    "j": "(j) Envoy + ext_authz -> authz, key index",
    "k": "(k) Envoy + HTTP ext_authz -> no-op",
    "l": "(l) Envoy + HTTP ext_authz -> authz",
    "m": "(m) Envoy + HTTP ext_authz -> authz, same JWT",
    "n": "(n) Envoy + HTTP ext_authz -> authz, quota",
    "o": "(o) Envoy + ext_authz -> authz, 2 workers",
}
HTTP_CASES = "klmn"  # ext_authz over HTTP (envoy/bench-http.yaml); the others over gRPC (envoy/bench.yaml)
OPEN_LOOP_CASES = "bckl"  # the cases that also get an open-loop run after their closed-loop one
BENCH_QUOTA = 1_000_000_000  # per minute, cases (g), (h) and (n): charged on every request, never reached


class CaseError(Exception):
    """A case could not run or its results are not valid; the message says why."""


@dataclass
class Options:
    duration: int
    warmup: int
    connections: int
    ext_authz_timeout: str
    pin: bool
    log_dir: Path
    jwt_rate: float | None = None  # --jwt-rate
    noop_rps: float | None = None  # set once (b) has run
    open_loop_rate: float = DEFAULT_OPEN_LOOP_RATE
    open_loop_duration: float = 10.0  # seconds; 0 = no open-loop runs
    open_loop_connections: int = DEFAULT_OPEN_LOOP_CONNECTIONS
    workers_cpus: str = "0,1"  # case (o)'s taskset -c list when pinned


@dataclass(frozen=True)
class Load:
    """What wrk sends: fixed ``headers``, plus with ``tokens`` a file of ``token_count`` bearer tokens, a
    different one on each request (``wrk_tokens.lua``)."""

    headers: Mapping[str, str]
    tokens: Path | None = None
    token_count: int = 0


API_KEY_LOAD = Load({"x-api-key": BENCH_KEY})


@dataclass
class OpenLoopRun:
    """A case's open-loop run: latencies from each request's due time at a fixed rate."""

    rate: float
    scheduled: int
    count: int
    non_2xx: int
    errors: int
    queued: int  # requests that found every connection busy at their due time
    achieved_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    send_lag_p99_ms: float  # the load generator's own lateness
    envoy_cpu: float
    server_cpu: float | None
    error: str | None = None


@dataclass
class Result:
    case: str
    label: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    non_2xx: int = 0
    envoy_cpu: float | None = None
    server_cpu: float | None = None
    jwt_valid: int | None = None  # valid JWT verifications during the measured run, cases (e), (f), (m)
    index_hits: int | None = None  # API keys answered from the key index during the measured run, case (j)
    worker_checks: list[int] | None = None  # checks each worker answered in the measured run, case (o)
    open_loop: OpenLoopRun | None = None  # OPEN_LOOP_CASES
    error: str | None = None


@dataclass(frozen=True)
class Upstream:
    """Where Envoy sends its checks: gRPC (``envoy/bench.yaml``) or, with ``http``, HTTP
    (``envoy/bench-http.yaml``) to ``port``."""

    port: int
    http: bool = False


def bench_products(quota: int | None = None) -> list[dict[str, Any]]:
    """One product on BENCH_API covering BENCH_PATH (Apigee's JSON shape), with ``quota`` per minute."""
    product: dict[str, Any] = {
        "name": "bench",
        "environments": ["test"],
        "operationGroup": {
            "operationConfigType": "remoteservice",
            "operationConfigs": [
                {"apiSource": BENCH_API, "operations": [{"resource": "/v1/**", "methods": ["GET"]}]}
            ],
        },
    }
    if quota is not None:
        product.update(quota=str(quota), quotaInterval="1", quotaTimeUnit="minute")
    return [product]


def bench_catalog(quota: int | None = None) -> dict[str, object]:
    """The standalone catalog: bench_products() and one app holding BENCH_KEY."""
    return {
        "products": bench_products(quota),
        "developers": [
            {
                "email": "bench@example.com",
                "apps": [
                    {
                        "name": "bench-app",
                        "products": ["bench"],
                        "credentials": [
                            {
                                "key_sha256": hashlib.sha256(BENCH_KEY.encode()).hexdigest(),
                                "status": "approved",
                            }
                        ],
                    }
                ],
            }
        ],
    }


# --- CPU accounting -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its running children so far (Linux /proc): with
    ``authz serve --workers N`` the supervisor's workers do the work."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since the listing
            continue
        # After the ")" that ends comm: fields[0] is state (field 3), fields[1] the parent's PID (field 4),
        # so utime (14) and stime (15) are 11, 12.
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# --- wrk ------------------------------------------------------------------------------------------


def run_wrk(url: str, seconds: int, opts: Options, load: Load, first: int = 0) -> dict[str, float]:
    """Run wrk against ``url`` and return the WRK_REPORT numbers (latencies in µs); with ``load.tokens``,
    the requests take tokens from line ``first`` (0-based) on and ``sent`` says how many were used."""
    argv = [
        "wrk",
        "--threads",
        "1",
        "--connections",
        str(opts.connections),
        "--duration",
        f"{seconds}s",
        "--timeout",
        "2s",
        "--script",
        str(WRK_SCRIPT if load.tokens is None else WRK_TOKENS_SCRIPT),
    ]
    for name, value in load.headers.items():
        argv += ["--header", f"{name}: {value}"]
    argv.append(url)
    if load.tokens is not None:
        argv += ["--", str(load.tokens), str(first)]
    if opts.pin:
        argv = ["taskset", "-c", "0", *argv]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            argv, capture_output=True, text=True, timeout=seconds + WRK_EXTRA_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CaseError(f"wrk did not finish within {seconds + WRK_EXTRA_TIMEOUT:.0f}s") from exc
    for line in done.stdout.splitlines():
        if line.startswith("WRK_REPORT "):
            report: dict[str, float] = json.loads(line.removeprefix("WRK_REPORT "))
            return report
    raise CaseError(f"wrk exited {done.returncode} without a report:\n{done.stdout}\n{done.stderr}")


def bench_url(listen_port: int) -> str:
    return f"http://127.0.0.1:{listen_port}{BENCH_PATH}"


def measure(
    case: str,
    listen_port: int,
    envoy: Proc,
    admin_port: int,
    opts: Options,
    server: Proc | None = None,
    load: Load = API_KEY_LOAD,
    jwt_valid: Callable[[], float] | None = None,
    access_log: bool = False,
    index_hits: Callable[[], float] | None = None,
) -> Result:
    """Warm up, then one measured wrk run; validate it against Envoy's counters. ``jwt_valid`` and
    ``index_hits`` read the service's count of valid JWT verifications and of key-index answers, before
    and after the measured run."""
    url = bench_url(listen_port)
    first = 0  # with load.tokens: the measured run starts where the warm-up stopped
    if opts.warmup > 0:
        first = int(run_wrk(url, opts.warmup, opts, load).get("sent", 0))
    before = stats(admin_port)
    valid_before = jwt_valid() if jwt_valid is not None else 0.0
    index_before = index_hits() if index_hits is not None else 0.0
    cpu_before = {p.pid: cpu_seconds(p.pid) for p in (envoy, server) if p is not None}
    report = run_wrk(url, opts.duration, opts, load, first)
    cpu_used = {pid: cpu_seconds(pid) - used for pid, used in cpu_before.items()}
    after = stats(admin_port)
    valid_after = jwt_valid() if jwt_valid is not None else 0.0
    index_after = index_hits() if index_hits is not None else 0.0

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    wall = report["duration_us"] / 1e6
    completed = delta("http.ingress_http.downstream_rq_completed")
    ok_2xx = delta("http.ingress_http.downstream_rq_2xx")
    result = Result(
        case=case,
        label=CASES[case],
        rps=report["requests"] / wall,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        requests=int(report["requests"]),
        non_2xx=max(completed - ok_2xx, int(report["status_errors"])),
        envoy_cpu=cpu_used[envoy.pid] / wall,
        server_cpu=cpu_used[server.pid] / wall if server is not None else None,
        jwt_valid=round(valid_after - valid_before) if jwt_valid is not None else None,
        index_hits=round(index_after - index_before) if index_hits is not None else None,
    )
    problems = []
    used = first + int(report.get("sent", 0))
    if load.tokens is not None and used > load.token_count:
        problems.append(
            f"the runs needed {used} tokens but {load.token_count} were minted, so some were repeated "
            "(pass a higher --jwt-rate)"
        )
    if result.non_2xx:
        codes = {c: delta(f"http.ingress_http.downstream_rq_{c}") for c in ("1xx", "3xx", "4xx", "5xx")}
        problems.append(
            f"{result.non_2xx} non-2xx responses ({', '.join(f'{k}: {v}' for k, v in codes.items() if v)})"
        )
    socket_errors = {k: int(report[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")}
    if any(socket_errors.values()):
        problems.append(f"wrk socket errors {socket_errors}")
    if case != "a":
        authz_ok = delta("http.ingress_http.ext_authz.ok")
        if authz_ok < ok_2xx:
            problems.append(f"ext_authz.ok {authz_ok} < 2xx responses {ok_2xx}: ext_authz was skipped")
    if problems:
        result.error = "; ".join(problems)
    return result


def metric_sum(metrics_port: int, name: str, label: str = "") -> float:
    """The sum of the samples of ``name`` on authz's /metrics whose labels include ``label``."""
    status, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    if status != 200:
        raise CaseError(f"authz /metrics answered {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") and label in line.rsplit("}", 1)[0]:
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu(opts: Options, index: int) -> str | None:
    """The ``taskset -c`` CPU list for a process of the bench: 0 for Envoy and the load, 1 for Python."""
    return str(index) if opts.pin else None
