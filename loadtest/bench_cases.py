"""The cases of ``make bench``: each starts its processes (in an ExitStack that stops them by PID), puts
one Envoy in front of them and measures; ``loadtest/bench.py``'s docstring says what each case is.

The gRPC cases and their HTTP twins ((l) of (c), (m) of (e), (n) of (g)) run the same function with
``http=True``: authz then also serves its HTTP check endpoint (``global.http_authz_address``) and Envoy
uses ``envoy/bench-http.yaml``; the checks on the result are the same.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import unittest.mock
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from devstack.apigee import FakeKey, apigee_overrides, start_fake_apigee, write_policy_secret
from devstack.envoy import GRPC_ACCESS_LOG, render, start_envoy, wait_cluster_healthy
from devstack.procs import Proc, StartupError, free_port, http_get, wait_port_open
from devstack.stack import DEFAULT_ENV, DEFAULT_ORG, deep_merge, start_authz, write_authz_config
from loadtest.bench_core import (
    API_KEY_LOAD,
    BENCH_API,
    BENCH_KEY,
    BENCH_QUOTA,
    CASES,
    HEALTHY_TIMEOUT,
    HERE,
    OPEN_LOOP_CASES,
    READY_TIMEOUT,
    CaseError,
    Load,
    Options,
    Result,
    Upstream,
    bench_catalog,
    bench_products,
    bench_url,
    cpu,
    measure,
    metric_sum,
)
from loadtest.bench_openloop import measure_open_loop
from loadtest.jwt_issuer import Issuer, provider_overrides, serve_jwks, write_lines
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import new_service_account, write_analytics_secret
from tests.support.apigee_thread import ApigeeThread

DEFAULT_JWT_RATE = 12_000.0  # req/s (f)'s tokens are minted for when (b) did not run first
TOKEN_MARGIN = 1.15  # otherwise (f)'s tokens are minted for (b)'s rate x TOKEN_MARGIN: (b) is the ceiling
INDEX_TIMEOUT = 30.0  # seconds (j) waits for authz's first full listing of apps and keys
KEY_SYNC_INTERVAL = "1h"  # case (j): no second listing during the case
WORKERS = 2  # case (o)


# --- Envoy in front of an ext_authz server --------------------------------------------------------


def through_ext_authz(
    case: str,
    authz: Upstream,
    server: Proc,
    opts: Options,
    stack: contextlib.ExitStack,
    before: Callable[[int], None] | None = None,
    load: Load = API_KEY_LOAD,
    jwt_valid: Callable[[], float] | None = None,
    access_log: bool = False,
    index_hits: Callable[[], float] | None = None,
    envoy_vars: Mapping[str, object] | None = None,
) -> Result:
    """Envoy (``bench.yaml``, or ``bench-http.yaml`` for an HTTP ``authz``) in front of the ext_authz
    server; ``before(listen_port)`` runs once Envoy can reach the server, ahead of the warm-up. ``load``,
    ``jwt_valid`` and ``index_hits`` go to measure(); OPEN_LOOP_CASES then get their open-loop run.
    ``envoy_vars`` are more of ``bench.yaml``'s template variables."""
    listen, admin = free_port(), free_port()
    if authz.http:
        config = render(
            "bench-http.yaml",
            opts.log_dir,
            out_name=f"{case}-bench-http.yaml",
            LISTEN_PORT=listen,
            ADMIN_PORT=admin,
            AUTHZ_HTTP_PORT=authz.port,
            EXT_AUTHZ_TIMEOUT=opts.ext_authz_timeout,
            API_NAME=BENCH_API,
        )
    else:
        config = render(
            "bench.yaml",
            opts.log_dir,
            envoy_vars,
            api_name=BENCH_API,
            out_name=f"{case}-bench.yaml",
            LISTEN_PORT=listen,
            ADMIN_PORT=admin,
            AUTHZ_PORT=authz.port,
            EXT_AUTHZ_TIMEOUT=opts.ext_authz_timeout,
            ACCESS_LOG=GRPC_ACCESS_LOG if access_log else "[]",
        )
    envoy = start_envoy(config, admin, opts.log_dir, name=f"{case}-envoy", cpu_list=cpu(opts, 0))
    stack.callback(envoy.stop)
    if authz.http:
        # No health check over HTTP (every path is a check): the port must accept, then one request must
        # be allowed through Envoy.
        wait_port_open(authz.port, READY_TIMEOUT, server)
        allowed_once(listen, load.headers)
    else:
        wait_cluster_healthy(admin, "authz", HEALTHY_TIMEOUT, envoy)
    if before is not None:
        before(listen)
    result = measure(case, listen, envoy, admin, opts, server, load, jwt_valid, index_hits=index_hits)
    if result.error is None and case in OPEN_LOOP_CASES and opts.open_loop_duration > 0:
        try:
            result.open_loop = measure_open_loop(bench_url(listen), load, envoy, server, admin, opts)
        except CaseError as exc:  # the closed-loop numbers stand; the case still fails
            result.error = f"open loop: {exc}"
        else:
            result.error = result.open_loop.error
    return result


def allowed_once(listen_port: int, headers: Mapping[str, str]) -> None:
    """One request through Envoy with ``headers``; anything but a 200 fails the case."""
    status, body = http_get(bench_url(listen_port), headers=headers)
    if status != 200:
        raise CaseError(f"the first request through Envoy answered {status}: {body[:200]!r}")


def ports(http: bool) -> tuple[int, int, int | None]:
    """Free ports for authz: gRPC, metrics and, with ``http``, the HTTP check endpoint."""
    return free_port(), free_port(), free_port() if http else None


def over(api_port: int, http_port: int | None) -> Upstream:
    """What Envoy checks with: authz's HTTP endpoint when it has one, else its gRPC port."""
    return Upstream(api_port) if http_port is None else Upstream(http_port, http=True)


def with_http(http_port: int | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """authz config ``overrides`` plus ``global.http_authz_address`` when there is an HTTP port."""
    extra = {} if http_port is None else {"global": {"http_authz_address": f"127.0.0.1:{http_port}"}}
    return deep_merge(overrides or {}, extra)


# --- the cases ------------------------------------------------------------------------------------


def case_direct(opts: Options, stack: contextlib.ExitStack) -> Result:
    listen, admin = free_port(), free_port()
    config = render(
        "direct.yaml", opts.log_dir, out_name="a-direct.yaml", LISTEN_PORT=listen, ADMIN_PORT=admin
    )
    envoy = start_envoy(config, admin, opts.log_dir, name="a-envoy", cpu_list=cpu(opts, 0))
    stack.callback(envoy.stop)
    return measure("a", listen, envoy, admin, opts)


def start_noop(case: str, module: str, opts: Options, stack: contextlib.ExitStack) -> tuple[Proc, int]:
    """``python -m <module> --port P`` (a no-op server) on CPU 1; returns it and P once P accepts."""
    port = free_port()
    argv = [sys.executable, "-m", module, "--port", str(port)]
    if opts.pin:
        argv = ["taskset", "-c", "1", *argv]
    server = Proc(f"{case}-noop", argv, opts.log_dir, cwd=HERE.parent)
    stack.callback(server.stop)
    wait_port_open(port, READY_TIMEOUT, server)
    return server, port


def case_noop(opts: Options, stack: contextlib.ExitStack) -> Result:
    server, port = start_noop("b", "loadtest.noop_authz", opts, stack)
    return through_ext_authz("b", Upstream(port), server, opts, stack)


def case_noop_http(opts: Options, stack: contextlib.ExitStack) -> Result:
    server, port = start_noop("k", "loadtest.noop_http_authz", opts, stack)
    return through_ext_authz("k", Upstream(port, http=True), server, opts, stack)


def write_catalog(opts: Options, case: str = "c", quota: int | None = None) -> Path:
    catalog = opts.log_dir / f"{case}-catalog.yaml"
    catalog.write_text(yaml.safe_dump(bench_catalog(quota), sort_keys=False))
    return catalog


def case_authz(
    opts: Options,
    stack: contextlib.ExitStack,
    case: str = "c",
    quota: int | None = None,
    http: bool = False,
) -> Result:
    api_port, metrics_port, http_port = ports(http)
    config = write_authz_config(
        opts.log_dir / f"{case}-authz.yaml",
        catalog_path=write_catalog(opts, case, quota),
        api_port=api_port,
        metrics_port=metrics_port,
        overrides=with_http(http_port),
    )
    server = start_authz(config, metrics_port, opts.log_dir, name=f"{case}-authz", cpu_list=cpu(opts, 1))
    stack.callback(server.stop)
    result = through_ext_authz(case, over(api_port, http_port), server, opts, stack)
    if quota is not None:
        check_quota_charged(result, metrics_port)
    return result


def case_authz_workers(opts: Options, stack: contextlib.ExitStack) -> Result:
    """(c) with ``authz serve --workers 2``: the kernel spreads Envoy's connections over the two workers.

    Envoy (one worker thread) opens one HTTP/2 connection to a cluster unless its streams are capped, so
    ``AUTHZ_MAX_CONCURRENT_STREAMS`` makes it open about four connections a worker for wrk's load.
    Pinned, the workers get ``--workers-cpus`` (default both CPUs, shared with Envoy and wrk on CPU 0; ``1``
    gives them (c)'s one core, which measures the cost of the split). The case fails unless both workers
    answered checks.
    """
    api_port, metrics_port = free_port(), free_port()
    config = write_authz_config(
        opts.log_dir / "o-authz.yaml",
        catalog_path=write_catalog(opts, "o"),
        api_port=api_port,
        metrics_port=metrics_port,
    )
    with unittest.mock.patch.dict(os.environ, {"AUTHZ_WORKERS": str(WORKERS)}):  # the child copies it
        cpus = opts.workers_cpus if opts.pin else None
        server = start_authz(config, metrics_port, opts.log_dir, name="o-authz", cpu_list=cpus)
    stack.callback(server.stop)
    streams = max(1, opts.connections // (4 * WORKERS))  # about 4 connections a worker
    before = worker_checks(metrics_port)
    result = through_ext_authz(
        "o", Upstream(api_port), server, opts, stack, envoy_vars={"AUTHZ_MAX_CONCURRENT_STREAMS": streams}
    )
    after = worker_checks(metrics_port)
    result.worker_checks = [round(now - was) for now, was in zip(after, before, strict=True)]
    if result.error is None and not all(result.worker_checks):
        result.error = f"checks per worker {result.worker_checks}: a worker got no traffic"
    return result


def worker_checks(metrics_port: int) -> list[float]:
    """Checks each worker has answered (``auth_requests_seconds_count`` by its ``worker`` label)."""
    return [metric_sum(metrics_port, "auth_requests_seconds_count", f'worker="{k}"') for k in range(WORKERS)]


def case_authz_http(opts: Options, stack: contextlib.ExitStack) -> Result:
    return case_authz(opts, stack, "l", http=True)


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
    result = through_ext_authz("i", Upstream(api_port), server, opts, stack, access_log=True)
    received = metric_sum(metrics_port, "analytics_records_total", 'status="received"')
    if result.error is None and received < result.requests:
        result.error = f"{received:.0f} analytics records for {result.requests} measured requests"
    return result


def case_quota(opts: Options, stack: contextlib.ExitStack) -> Result:
    return case_authz(opts, stack, "g", BENCH_QUOTA)


def case_quota_http(opts: Options, stack: contextlib.ExitStack) -> Result:
    return case_authz(opts, stack, "n", BENCH_QUOTA, http=True)


def case_apigee_quota(opts: Options, stack: contextlib.ExitStack) -> Result:
    return case_apigee(opts, stack, "h", BENCH_QUOTA)


def check_quota_charged(result: Result, metrics_port: int) -> None:
    """Quota cases fail unless every request charged the bucket (``quota_checks_total``)."""
    charged = metric_sum(metrics_port, "quota_checks_total", 'result="allowed"')
    if result.error is None and charged < result.requests:
        result.error = f"{charged:.0f} quota charges for {result.requests} measured requests"


def start_jwt_authz(
    case: str, issuer: Issuer, opts: Options, stack: contextlib.ExitStack, http: bool = False
) -> tuple[Proc, Upstream, int]:
    """The issuer's JWKS on loopback, then authz standalone with it as its one JWT provider; returns the
    server, what Envoy checks with (its HTTP endpoint with ``http``, else gRPC) and its metrics port."""
    jwks, jwks_uri = serve_jwks(issuer, opts.log_dir, opts.log_dir, name=f"{case}-jwks")
    stack.callback(jwks.stop)
    api_port, metrics_port, http_port = ports(http)
    config = write_authz_config(
        opts.log_dir / f"{case}-authz.yaml",
        catalog_path=write_catalog(opts),
        api_port=api_port,
        metrics_port=metrics_port,
        overrides=with_http(http_port, provider_overrides(jwks_uri)),
    )
    server = start_authz(config, metrics_port, opts.log_dir, name=f"{case}-authz", cpu_list=cpu(opts, 1))
    stack.callback(server.stop)
    return server, over(api_port, http_port), metrics_port


def case_jwt_cached(
    opts: Options, stack: contextlib.ExitStack, case: str = "e", http: bool = False
) -> Result:
    issuer = Issuer.new()
    (token,) = issuer.mint([0])
    server, authz, metrics_port = start_jwt_authz(case, issuer, opts, stack, http)
    result = through_ext_authz(
        case,
        authz,
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


def case_jwt_cached_http(opts: Options, stack: contextlib.ExitStack) -> Result:
    return case_jwt_cached(opts, stack, "m", http=True)


def case_jwt_unique(opts: Options, stack: contextlib.ExitStack) -> Result:
    issuer = Issuer.new()
    rate = opts.jwt_rate or (opts.noop_rps * TOKEN_MARGIN if opts.noop_rps else DEFAULT_JWT_RATE)
    count = math.ceil(rate * (opts.warmup + opts.duration))
    started = time.perf_counter()
    tokens = write_lines(opts.log_dir / "f-tokens.txt", issuer.mint_many(count))
    stack.callback(tokens.unlink, missing_ok=True)  # 600 bytes a token: not worth keeping with the logs
    print(f"  minted {count} RS256 tokens in {time.perf_counter() - started:.1f}s", flush=True)
    server, authz, metrics_port = start_jwt_authz("f", issuer, opts, stack)
    result = through_ext_authz(
        "f",
        authz,
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
    result = through_ext_authz(case, Upstream(api_port), server, opts, stack, before=cache_bench_key)
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
        "j", Upstream(api_port), server, opts, stack, index_hits=lambda: key_index_hits(metrics_port)
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
    "k": case_noop_http,
    "l": case_authz_http,
    "m": case_jwt_cached_http,
    "n": case_quota_http,
    "o": case_authz_workers,
}


def run_case(case: str, opts: Options) -> Result:
    print(f"running {CASES[case]} ...", flush=True)
    try:
        with contextlib.ExitStack() as stack:
            return RUNNERS[case](opts, stack)
    except (StartupError, CaseError, OSError) as exc:
        return Result(case=case, label=CASES[case], error=str(exc))
