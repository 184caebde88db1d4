"""``make bench``: what ext_authz in Python costs, measured through one real Envoy.

Ten cases, each through the same Envoy build (``--concurrency 1``) and the same wrk load (closed loop:
1 thread, ``--connections`` connections, ``--warmup`` s discarded, then ``--duration`` s measured):

  (a) ``envoy/direct.yaml``: Envoy answers 200 itself (direct_response), no ext_authz. The baseline.
  (b) ``envoy/bench.yaml`` + ``loadtest.noop_authz``: ext_authz to a grpc.aio server that allows everything
      without looking: the ceiling for any Python ext_authz on this machine.
  (c) ``envoy/bench.yaml`` + ``python -m authz serve``: the real service, standalone, with a bench catalog
      and a valid API key in ``x-api-key`` on every request (so every request takes the allow path).
  (d) as (c), but the service runs in Apigee mode against a fake Apigee on loopback (a subprocess, see
      ``devstack/apigee.py``) serving the same product and key. One request before the warm-up has the
      key verified and cached; the case fails if the service verified it more than once.
  (e) as (c), plus one ``auth.jwt_providers`` entry (an RS256 issuer whose JWKS a static file server on
      loopback serves, see ``loadtest/jwt_issuer.py``): every request carries the same valid bearer
      token and no API key. The case fails unless the token was verified exactly once (then cached).
  (f) as (e), but every request carries a different valid token, so each one costs an RS256 verification.
      The tokens are minted before the case (enough for ``--jwt-rate``, by default 1.15 x the no-op's rate
      from (b), over warm-up + duration) and fed by ``loadtest/wrk_tokens.lua``; the measured run starts
      where the warm-up stopped. The case fails if the tokens ran out, or if the service's
      ``jwt_verifications_total{result="valid"}`` grew by less than the measured requests (less one per
      connection).
  (g) as (c), with a quota on the product (``BENCH_QUOTA`` a minute, never reached) charged on every request;
      the case fails unless ``quota_checks_total{result="allowed"}`` counted every measured request.
  (h) as (d), with that quota; it also fails unless a quota sync with the fake Apigee succeeded.
  (i) as (c), with Envoy's access log streamed to authz over gRPC, so every request also becomes an analytics
      record; the case fails unless ``analytics_records_total{status="received"}`` counted every one.
  (j) as (d), but with the key index: ``tenant.key_sync_interval: 1h`` and ``tenant.management_api`` at the
      fake (a FakeApigee on a thread of the bench, with a Google service account registered and its
      ``client_secret.json`` given to authz as the analytics secret). The bench waits (bounded) until
      ``key_syncs_total{result="ok"}`` is at least 1, so the key is answered from memory, with no I/O and
      no JWT check. The case fails if the fake saw any ``/verifyApiKey`` call during the case, or if
      ``api_key_cache_lookups_total{result="index"}`` did not grow during the measured run. Its ratio to (b)
      is printed next to the best of the other paths' (the index should be the cheapest path); it is not a
      pass/fail check.

In (b) to (j) the route is a direct_response too, so no upstream server is measured; ext_authz runs
before the router, and the bench checks Envoy's ``ext_authz.ok`` counter against the 2xx count.

Pinning (default when there are >= 2 CPUs and ``taskset`` exists): Envoy and wrk share CPU 0, the Python
server gets CPU 1. Every case then has the same budget for the Envoy+wrk side and the Python server has
one core of its own, as a sidecar container with a 1-CPU limit would. ``--no-pin`` lets the kernel
schedule. The CPU columns are the share of one core each process used during the measured run.

A case fails (and the exit code is 1) if any response was not 2xx, wrk saw socket errors or timeouts,
or ext_authz was not consulted for every request. p50/p99 are at saturation (closed loop), so compare
them between cases, not with published latency figures (see Envoy's benchmarking FAQ).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from devstack.apigee import FakeKey, apigee_overrides, start_fake_apigee, write_policy_secret
from devstack.envoy import GRPC_ACCESS_LOG, envoy_binary, render, start_envoy, stats, wait_cluster_healthy
from devstack.procs import Proc, StartupError, free_port, http_get, wait_port_open
from devstack.stack import DEFAULT_ENV, DEFAULT_ORG, start_authz, write_authz_config
from loadtest.jwt_issuer import Issuer, provider_overrides, serve_jwks, write_lines
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import new_service_account, write_analytics_secret
from tests.support.apigee_thread import ApigeeThread

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_report.lua"
WRK_TOKENS_SCRIPT = HERE / "wrk_tokens.lua"  # case (f): one token a request, from a file
BENCH_API = "bench-api"
BENCH_PATH = "/v1/bench"
# Public, bench-only credential; the bench catalog holds its SHA-256.
BENCH_KEY = "bench-key-4c0f2a9e71d35b68"
TARGET_OVER_NOOP = 0.9  # the service's throughput as a share of the no-op's, every case but (f)
TARGET_UNIQUE_JWT_OVER_NOOP = 0.6  # case (f): an RS256 verification on every request
DEFAULT_JWT_RATE = 12_000.0  # req/s (f)'s tokens are minted for when (b) did not run first
TOKEN_MARGIN = 1.15  # otherwise (f)'s tokens are minted for (b)'s rate x TOKEN_MARGIN: (b) is the ceiling
READY_TIMEOUT = 30.0
INDEX_TIMEOUT = 30.0  # seconds (j) waits for authz's first full listing of apps and keys
KEY_SYNC_INTERVAL = "1h"  # case (j): no second listing during the case
HEALTHY_TIMEOUT = 10.0
WRK_EXTRA_TIMEOUT = 30.0  # seconds wrk may overrun its -d before we give up on it
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
}
BENCH_QUOTA = 1_000_000_000  # per minute, cases (g) and (h): charged on every request, never reached


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


@dataclass(frozen=True)
class Load:
    """What wrk sends: fixed ``headers``, plus with ``tokens`` a file of ``token_count`` bearer tokens, a
    different one on each request (``wrk_tokens.lua``)."""

    headers: Mapping[str, str]
    tokens: Path | None = None
    token_count: int = 0


API_KEY_LOAD = Load({"x-api-key": BENCH_KEY})


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
    jwt_valid: int | None = None  # valid JWT verifications during the measured run, cases (e) and (f)
    index_hits: int | None = None  # API keys answered from the key index during the measured run, case (j)
    error: str | None = None


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
    """User + system CPU time of ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" that ends comm: fields[0] is state (field 3), so utime (14) and stime (15) are 11, 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# --- the cases ------------------------------------------------------------------------------------


def case_direct(opts: Options, stack: contextlib.ExitStack) -> Result:
    listen, admin = free_port(), free_port()
    config = render(
        "direct.yaml", opts.log_dir, out_name="a-direct.yaml", LISTEN_PORT=listen, ADMIN_PORT=admin
    )
    envoy = start_envoy(config, admin, opts.log_dir, name="a-envoy", cpu_list=cpu(opts, 0))
    stack.callback(envoy.stop)
    return measure("a", listen, envoy, admin, opts)


def case_noop(opts: Options, stack: contextlib.ExitStack) -> Result:
    api_port = free_port()
    argv = [sys.executable, "-m", "loadtest.noop_authz", "--port", str(api_port)]
    if opts.pin:
        argv = ["taskset", "-c", "1", *argv]
    server = Proc("b-noop", argv, opts.log_dir, cwd=HERE.parent)
    stack.callback(server.stop)
    wait_port_open(api_port, READY_TIMEOUT, server)
    return through_ext_authz("b", api_port, server, opts, stack)


def write_catalog(opts: Options, case: str = "c", quota: int | None = None) -> Path:
    catalog = opts.log_dir / f"{case}-catalog.yaml"
    catalog.write_text(yaml.safe_dump(bench_catalog(quota), sort_keys=False))
    return catalog


def case_authz(
    opts: Options, stack: contextlib.ExitStack, case: str = "c", quota: int | None = None
) -> Result:
    api_port, metrics_port = free_port(), free_port()
    config = write_authz_config(
        opts.log_dir / f"{case}-authz.yaml",
        catalog_path=write_catalog(opts, case, quota),
        api_port=api_port,
        metrics_port=metrics_port,
    )
    server = start_authz(config, metrics_port, opts.log_dir, name=f"{case}-authz", cpu_list=cpu(opts, 1))
    stack.callback(server.stop)
    result = through_ext_authz(case, api_port, server, opts, stack)
    if quota is not None:
        check_quota_charged(result, metrics_port)
    return result


def case_access_log(opts: Options, stack: contextlib.ExitStack) -> Result:
    """(c) with Envoy's access log streamed to authz: every request also becomes an analytics record."""
    api_port, metrics_port = free_port(), free_port()
    config = write_authz_config(
        opts.log_dir / "i-authz.yaml",
        catalog_path=write_catalog(opts, "i"),
        api_port=api_port,
        metrics_port=metrics_port,
    )
    server = start_authz(config, metrics_port, opts.log_dir, name="i-authz", cpu_list=cpu(opts, 1))
    stack.callback(server.stop)
    result = through_ext_authz("i", api_port, server, opts, stack, access_log=True)
    received = metric_sum(metrics_port, "analytics_records_total", 'status="received"')
    if result.error is None and received < result.requests:
        result.error = f"{received:.0f} analytics records for {result.requests} measured requests"
    return result


def case_quota(opts: Options, stack: contextlib.ExitStack) -> Result:
    return case_authz(opts, stack, "g", BENCH_QUOTA)


def case_apigee_quota(opts: Options, stack: contextlib.ExitStack) -> Result:
    return case_apigee(opts, stack, "h", BENCH_QUOTA)


def check_quota_charged(result: Result, metrics_port: int) -> None:
    """Quota cases fail unless every request charged the bucket (``quota_checks_total``)."""
    charged = metric_sum(metrics_port, "quota_checks_total", 'result="allowed"')
    if result.error is None and charged < result.requests:
        result.error = f"{charged:.0f} quota charges for {result.requests} measured requests"


def start_jwt_authz(
    case: str, issuer: Issuer, opts: Options, stack: contextlib.ExitStack
) -> tuple[Proc, int, int]:
    """The issuer's JWKS on loopback, then authz standalone with it as its one JWT provider; returns the
    server, its gRPC port and its metrics port."""
    jwks, jwks_uri = serve_jwks(issuer, opts.log_dir, opts.log_dir, name=f"{case}-jwks")
    stack.callback(jwks.stop)
    api_port, metrics_port = free_port(), free_port()
    config = write_authz_config(
        opts.log_dir / f"{case}-authz.yaml",
        catalog_path=write_catalog(opts),
        api_port=api_port,
        metrics_port=metrics_port,
        overrides=provider_overrides(jwks_uri),
    )
    server = start_authz(config, metrics_port, opts.log_dir, name=f"{case}-authz", cpu_list=cpu(opts, 1))
    stack.callback(server.stop)
    return server, api_port, metrics_port


def case_jwt_cached(opts: Options, stack: contextlib.ExitStack) -> Result:
    issuer = Issuer.new()
    (token,) = issuer.mint([0])
    server, api_port, metrics_port = start_jwt_authz("e", issuer, opts, stack)
    result = through_ext_authz(
        "e",
        api_port,
        server,
        opts,
        stack,
        load=Load({"authorization": f"Bearer {token}"}),
        jwt_valid=lambda: jwt_verifications(metrics_port, "valid"),
    )
    verified = jwt_verifications(metrics_port)
    if result.error is None and verified != 1:
        result.error = f"the token was verified {verified:.0f} times, not once: the cache was not used"
    return result


def case_jwt_unique(opts: Options, stack: contextlib.ExitStack) -> Result:
    issuer = Issuer.new()
    rate = opts.jwt_rate or (opts.noop_rps * TOKEN_MARGIN if opts.noop_rps else DEFAULT_JWT_RATE)
    count = math.ceil(rate * (opts.warmup + opts.duration))
    started = time.perf_counter()
    tokens = write_lines(opts.log_dir / "f-tokens.txt", issuer.mint_many(count))
    stack.callback(tokens.unlink, missing_ok=True)  # 600 bytes a token: not worth keeping with the logs
    print(f"  minted {count} RS256 tokens in {time.perf_counter() - started:.1f}s", flush=True)
    server, api_port, metrics_port = start_jwt_authz("f", issuer, opts, stack)
    result = through_ext_authz(
        "f",
        api_port,
        server,
        opts,
        stack,
        load=Load({}, tokens, count),
        jwt_valid=lambda: jwt_verifications(metrics_port, "valid"),
    )
    # Each measured request is verified between the two reads of the counter; one request per connection
    # of slack keeps the check independent of how wrk counts the requests its stop cuts off.
    needed = result.requests - opts.connections
    if result.error is None and (result.jwt_valid or 0) < needed:
        result.error = (
            f"{result.jwt_valid} valid JWT verifications for {result.requests} requests: "
            "tokens were served from a cache"
        )
    return result


def case_apigee(
    opts: Options, stack: contextlib.ExitStack, case: str = "d", quota: int | None = None
) -> Result:
    api_port, metrics_port = free_port(), free_port()
    secret = write_policy_secret(opts.log_dir / f"{case}-policy-secret")
    key = FakeKey(BENCH_KEY, "bench-app", "bench@example.com", ("bench",))
    fake = start_fake_apigee(
        opts.log_dir,
        bench_products(quota),
        [key],
        secret.jwks,
        name=f"{case}-fake-apigee",
        log_dir=opts.log_dir,
    )
    stack.callback(fake.proc.stop)
    config = write_authz_config(
        opts.log_dir / f"{case}-authz.yaml",
        catalog_path=None,
        api_port=api_port,
        metrics_port=metrics_port,
        overrides=apigee_overrides(fake.remote_service_url),
    )
    server = start_authz(
        config,
        metrics_port,
        opts.log_dir,
        name=f"{case}-authz",
        cpu_list=cpu(opts, 1),
        policy_secret_dir=secret.directory,
    )
    stack.callback(server.stop)
    result = through_ext_authz(case, api_port, server, opts, stack, before=cache_bench_key)
    calls = key_verifications(metrics_port)
    if result.error is None and calls != 1:
        result.error = f"the key was verified with Apigee {calls} times, not once: the cache was not used"
    if quota is not None:
        check_quota_charged(result, metrics_port)
        if result.error is None and metric_sum(metrics_port, "quota_syncs_total", 'result="ok"') < 1:
            result.error = "no quota sync with the fake Apigee succeeded"
    return result


def case_key_index(opts: Options, stack: contextlib.ExitStack) -> Result:
    """(d) with the key index: the fake lists its apps and keys to authz, which answers the key from memory;
    the fake must see no ``/verifyApiKey`` call at all."""
    api_port, metrics_port = free_port(), free_port()
    secret = write_policy_secret(opts.log_dir / "j-policy-secret")
    fake = FakeApigee(org=DEFAULT_ORG, env=DEFAULT_ENV, policy_jwks=secret.jwks)
    fake.set_products(bench_products())
    fake.add_key(BENCH_KEY, app="bench-app", developer_email="bench@example.com", products=["bench"])
    # The management API takes Google tokens only from a service account the fake knows; authz gets the
    # account's key as its analytics secret (client_secret.json) and asks the fake's /token for them.
    fake_port = free_port()
    account = new_service_account(f"http://127.0.0.1:{fake_port}/token")
    fake.add_service_account(account.client_email, account.public_key_pem)
    analytics_dir = write_analytics_secret(opts.log_dir / "j-analytics-secret", account).parent
    apigee = ApigeeThread(fake, port=fake_port)  # on a thread of the bench: its call counts are read directly
    stack.callback(apigee.close)
    overrides = apigee_overrides(apigee.remote_service_url)
    overrides["tenant"]["key_sync_interval"] = KEY_SYNC_INTERVAL
    config = write_authz_config(
        opts.log_dir / "j-authz.yaml",
        catalog_path=None,
        api_port=api_port,
        metrics_port=metrics_port,
        overrides=overrides,
    )
    # start_authz passes --policy-secret only; the CLI reads AUTHZ_ANALYTICS_SECRET as --analytics-secret's
    # default, and the child copies the environment when it starts.
    with unittest.mock.patch.dict(os.environ, {"AUTHZ_ANALYTICS_SECRET": str(analytics_dir)}):
        server = start_authz(
            config,
            metrics_port,
            opts.log_dir,
            name="j-authz",
            cpu_list=cpu(opts, 1),
            policy_secret_dir=secret.directory,
        )
    stack.callback(server.stop)
    wait_key_index(metrics_port, server)
    result = through_ext_authz(
        "j", api_port, server, opts, stack, index_hits=lambda: key_index_hits(metrics_port)
    )
    verified = apigee.calls("verifyApiKey")
    if result.error is None and verified:
        result.error = f"the fake Apigee saw {verified} /verifyApiKey calls, not 0: the index was not used"
    if result.error is None and not result.index_hits:
        result.error = (
            f'api_key_cache_lookups_total{{result="index"}} grew by {result.index_hits} during '
            f"{result.requests} measured requests: the key index did not answer"
        )
    return result


def wait_key_index(metrics_port: int, server: Proc, timeout: float = INDEX_TIMEOUT) -> None:
    """Until authz's first full listing of apps and keys succeeded (``key_syncs_total{result="ok"}``)."""
    label = f'org="{DEFAULT_ORG}",result="ok"'
    deadline = time.monotonic() + timeout
    while metric_sum(metrics_port, "key_syncs_total", label) < 1:
        server.check_alive("load the key index")
        if time.monotonic() > deadline:
            errors = metric_sum(metrics_port, "key_syncs_total", 'result="error"')
            raise CaseError(
                f"the key index was not loaded within {timeout:.0f}s ({errors:.0f} failed key syncs; "
                f"log {server.log_path})"
            )
        time.sleep(0.1)  # polling a background listing: nothing to wait on but its counter


def key_index_hits(metrics_port: int) -> float:
    """API keys answered from the key index (``api_key_cache_lookups_total{result="index"}``)."""
    return metric_sum(metrics_port, "api_key_cache_lookups_total", 'result="index"')


def cache_bench_key(listen_port: int) -> None:
    """One request, so that the key is verified with Apigee and cached before anything is measured."""
    status, body = http_get(bench_url(listen_port), headers={"x-api-key": BENCH_KEY})
    if status != 200:
        raise CaseError(f"the request that caches the key answered {status}: {body[:200]!r}")


def key_verifications(metrics_port: int) -> float:
    """verifyApiKey calls the service made, whatever their result (``api_key_verifications_total``)."""
    return metric_sum(metrics_port, "api_key_verifications_total")


def jwt_verifications(metrics_port: int, result: str = "") -> float:
    """Bearer tokens the service verified (``jwt_verifications_total``), only ``result`` ones if given."""
    return metric_sum(metrics_port, "jwt_verifications_total", f'result="{result}"' if result else "")


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


def through_ext_authz(
    case: str,
    api_port: int,
    server: Proc,
    opts: Options,
    stack: contextlib.ExitStack,
    before: Callable[[int], None] | None = None,
    load: Load = API_KEY_LOAD,
    jwt_valid: Callable[[], float] | None = None,
    access_log: bool = False,
    index_hits: Callable[[], float] | None = None,
) -> Result:
    """Envoy (``bench.yaml``) in front of the ext_authz server on ``api_port``; ``before(listen_port)`` runs
    once Envoy sees the server healthy, ahead of the warm-up. ``load``, ``jwt_valid`` and ``index_hits`` go
    to measure()."""
    listen, admin = free_port(), free_port()
    config = render(
        "bench.yaml",
        opts.log_dir,
        api_name=BENCH_API,
        out_name=f"{case}-bench.yaml",
        LISTEN_PORT=listen,
        ADMIN_PORT=admin,
        AUTHZ_PORT=api_port,
        EXT_AUTHZ_TIMEOUT=opts.ext_authz_timeout,
        ACCESS_LOG=GRPC_ACCESS_LOG if access_log else "[]",
    )
    envoy = start_envoy(config, admin, opts.log_dir, name=f"{case}-envoy", cpu_list=cpu(opts, 0))
    stack.callback(envoy.stop)
    wait_cluster_healthy(admin, "authz", HEALTHY_TIMEOUT, envoy)
    if before is not None:
        before(listen)
    return measure(case, listen, envoy, admin, opts, server, load, jwt_valid, index_hits=index_hits)


def cpu(opts: Options, index: int) -> str | None:
    return str(index) if opts.pin else None


RUNNERS: dict[str, Callable[[Options, contextlib.ExitStack], Result]] = {
    "a": case_direct,
    "b": case_noop,
    "c": case_authz,
    "d": case_apigee,
    "e": case_jwt_cached,
    "f": case_jwt_unique,
    "g": case_quota,
    "h": case_apigee_quota,
    "i": case_access_log,
    "j": case_key_index,
}


def run_case(case: str, opts: Options) -> Result:
    print(f"running {CASES[case]} ...", flush=True)
    try:
        with contextlib.ExitStack() as stack:
            return RUNNERS[case](opts, stack)
    except (StartupError, CaseError, OSError) as exc:
        return Result(case=case, label=CASES[case], error=str(exc))


# --- report ---------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def pct(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


def table(results: list[Result]) -> Iterator[str]:
    width = max([44, *(len(r.label) for r in results)])
    yield (
        f"{'case':{width}} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8} "
        f"{'envoy cpu':>9} {'py cpu':>7}  status"
    )
    for r in results:
        status = "ok" if r.error is None else "ERROR"
        yield (
            f"{r.label:{width}} {fmt(r.rps, '9.0f')} {fmt(r.p50_ms, '7.2f')} {fmt(r.p99_ms, '7.2f')} "
            f"{r.non_2xx if r.rps is not None else '-':>8} "
            f"{pct(r.envoy_cpu):>9} {pct(r.server_cpu):>7}  {status}"
        )


def ratio(results: dict[str, Result], num: str, den: str) -> float | None:
    n, d = results.get(num), results.get(den)
    if n is None or d is None or n.error or d.error or not n.rps or not d.rps:
        return None
    return n.rps / d.rps


def report(results: list[Result], opts: Options) -> None:
    print()
    pinning = "pinned: Envoy+wrk CPU 0, Python server CPU 1" if opts.pin else "not pinned"
    print(
        f"Envoy {envoy_binary()} --concurrency 1 | wrk 1 thread, {opts.connections} connections, "
        f"{opts.warmup}s warm-up + {opts.duration}s | Python {platform.python_version()} | "
        f"{os.cpu_count()} CPUs, {pinning}"
    )
    print()
    for line in table(results):
        print(line)
    by_case = {r.case: r for r in results}
    b_a = ratio(by_case, "b", "a")
    print()
    if b_a is not None:
        print(f"b/a = {b_a:.2f}  (throughput left with a Python ext_authz that does nothing)")
    targets = (
        ("c", "standalone", TARGET_OVER_NOOP),
        ("d", "Apigee mode, key cached", TARGET_OVER_NOOP),
        ("e", "one bearer token, cached", TARGET_OVER_NOOP),
        ("f", "a new bearer token each request", TARGET_UNIQUE_JWT_OVER_NOOP),
        ("g", "standalone, a quota charged on every request", TARGET_OVER_NOOP),
        ("h", "Apigee mode, a quota charged on every request", TARGET_OVER_NOOP),
        ("i", "standalone, access log streamed to authz", TARGET_OVER_NOOP),
    )
    for case, what, target in targets:
        over_b = ratio(by_case, case, "b")
        if over_b is not None:
            verdict = "meets" if over_b >= target else "BELOW"
            print(f"{case}/b = {over_b:.2f}  ({what}; {verdict} the target {case}/b >= {target})")
    index_path = ratio(by_case, "j", "b")
    if index_path is not None:
        # No I/O and no verification: the cheapest path, so its ratio should top the others'. Not checked.
        others = [
            (over_b, case) for case, _, _ in targets if (over_b := ratio(by_case, case, "b")) is not None
        ]
        best = max(others, default=None)
        if best is None:
            versus = "no other authz path measured"
        elif index_path >= best[0]:
            versus = f"the best authz path measured; next {best[1]}/b = {best[0]:.2f}"
        else:
            versus = f"NOT the best authz path measured: {best[1]}/b = {best[0]:.2f}"
        print(f"j/b = {index_path:.2f}  (Apigee mode, key from the key index; {versus})")
    for r in results:
        if r.jwt_valid is not None and r.rps is not None:
            print(f"{r.case}: {r.jwt_valid} valid JWT verifications for {r.requests} measured requests")
        if r.index_hits is not None and r.rps is not None:
            print(f"{r.case}: {r.index_hits} key-index answers for {r.requests} measured requests")
    for r in results:
        if r.error:
            print(f"\n{r.label} ERROR: {r.error}")
    print(f"\nlogs and configs: {opts.log_dir}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description="Envoy direct vs + no-op Python ext_authz vs + authz"
    )
    every = "".join(CASES)
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per case (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per case (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--cases", default=every, help=f"which cases to run, e.g. 'bef' (default {every})")
    parser.add_argument("--ext-authz-timeout", default="0.5s", help="Envoy ext_authz timeout (default 0.5s)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin with taskset")
    parser.add_argument(
        "--jwt-rate",
        type=float,
        help=f"req/s to mint (f)'s tokens for (default: (b)'s x {TOKEN_MARGIN}, else {DEFAULT_JWT_RATE:.0f})",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    unknown = set(args.cases) - set(CASES)
    if unknown or not args.cases:
        parser.error(f"--cases takes letters from {''.join(CASES)!r}, got {args.cases!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk; `make bench` does it)", file=sys.stderr)
        return 2
    pin = args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    opts = Options(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        ext_authz_timeout=args.ext_authz_timeout,
        pin=pin,
        log_dir=Path(tempfile.mkdtemp(prefix="authz-bench-")),
        jwt_rate=args.jwt_rate,
    )
    results = []
    for case in (c for c in CASES if c in args.cases):
        results.append(run_case(case, opts))
        if case == "b" and results[-1].error is None:
            opts.noop_rps = results[-1].rps
    report(results, opts)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
