"""authz + Envoy sidecar in front of an upstream, as child processes on free loopback ports.

Shared by ``python -m devstack`` (``make run``, ``make run-apigee``), the e2e fixtures
(``tests/e2e/conftest.py``) and the bench:

* :func:`write_authz_config` writes a config in the Go adapter format: standalone (``tenant.catalog_file``)
  or, without a catalog, Apigee mode (the caller's overrides name ``tenant.remote_service_api``);
* :func:`start_authz` runs ``python -m authz serve --config FILE [--policy-secret DIR]`` and waits for
  ``/readyz`` (or only ``/livez``: a cold start during an Apigee outage starts unready);
* :func:`start_stack` does both, then renders ``envoy/sidecar.yaml`` (or another sidecar template, e.g.
  ``sidecar-jwt-authn.yaml``) and starts Envoy, and waits until Envoy's ``authz`` cluster is healthy by
  gRPC health checking (when authz is expected ready).

Imports the standard library, PyYAML and :mod:`devstack` only; never the ``authz`` package (the service
runs as a subprocess, exactly as deployed).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devstack.envoy import (
    METADATA_UPSTREAM_HEADERS,
    REPO_ROOT,
    render,
    start_envoy,
    stats,
    wait_cluster_healthy,
)
from devstack.procs import Proc, StartupError, free_port, wait_http_ok

AUTHZ_READY_TIMEOUT = 30.0  # seconds; a cold start imports grpc, protobuf and the Envoy protos
APIGEE_TEMP_DIR = "apigee-temp"  # global.temp_dir (products snapshot, analytics files) under the config's dir
ENVOY_HEALTHY_TIMEOUT = 10.0
DEFAULT_ORG = "demo"
DEFAULT_ENV = "test"


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in; nested mappings merge, other values replace."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_authz_config(
    path: Path,
    *,
    catalog_path: Path | None,
    api_port: int,
    metrics_port: int,
    org: str = DEFAULT_ORG,
    env: str = DEFAULT_ENV,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write an authz config YAML to ``path`` and return it.

    With ``catalog_path`` the service runs standalone from that catalog. With None it runs in Apigee mode:
    ``overrides`` must give ``{"tenant": {"remote_service_api": URL}}``. ``global.temp_dir`` (the products
    snapshot and the analytics files) defaults to ``<path's dir>/apigee-temp`` instead of the service's
    machine-wide default. ``overrides`` is deep-merged into ``{"global": {...}, "tenant": {...}}``, e.g.
    ``{"tenant": {"allow_unauthorized": True}}``.
    """
    config: dict[str, Any] = {
        "global": {
            "api_address": f"127.0.0.1:{api_port}",
            "metrics_address": f"127.0.0.1:{metrics_port}",
        },
        "tenant": {"org_name": org, "env_name": env},
    }
    # Never the machine-wide default: each stack has its own products snapshot and analytics files.
    config["global"]["temp_dir"] = str((path.parent / APIGEE_TEMP_DIR).resolve())
    if catalog_path is not None:
        config["tenant"]["catalog_file"] = str(catalog_path.resolve())
    if overrides:
        config = deep_merge(config, overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def authz_argv(config_path: Path, policy_secret_dir: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "authz", "serve", "--config", str(config_path)]
    if policy_secret_dir is not None:
        argv += ["--policy-secret", str(policy_secret_dir)]
    return argv


def start_authz(
    config_path: Path,
    metrics_port: int,
    log_dir: Path,
    *,
    name: str = "authz",
    ready_timeout: float = AUTHZ_READY_TIMEOUT,
    cpu_list: str | None = None,
    policy_secret_dir: Path | None = None,
    wait_ready: bool = True,
) -> Proc:
    """Start ``python -m authz serve --config config_path`` and wait for ``/readyz`` to answer 200.

    ``policy_secret_dir`` adds ``--policy-secret DIR`` (Apigee X/hybrid). With ``wait_ready=False`` it waits
    for ``/livez`` only: in Apigee mode a cold start without products (Apigee down, no snapshot) is live
    but unready. ``cpu_list`` (e.g. ``"1"``) pins the process with ``taskset -c``.

    Raises:
        StartupError: "authz did not become ready: ..." with the log tail; the process is stopped.
    """
    argv = authz_argv(config_path, policy_secret_dir)
    if cpu_list is not None:
        argv = ["taskset", "-c", cpu_list, *argv]
    proc = Proc(name, argv, log_dir, env={"PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT)
    probe = "readyz" if wait_ready else "livez"
    try:
        wait_http_ok(f"http://127.0.0.1:{metrics_port}/{probe}", ready_timeout, proc)
    except StartupError as exc:
        proc.stop()
        raise StartupError(f"authz did not become ready: {exc}") from None
    except BaseException:
        proc.stop()
        raise
    return proc


@dataclass
class Stack:
    """A running authz + Envoy pair. Ports are on 127.0.0.1."""

    work_dir: Path
    log_dir: Path
    config_path: Path
    catalog_path: Path | None  # None in Apigee mode
    envoy_config_path: Path
    listen_port: int
    admin_port: int
    api_port: int
    metrics_port: int
    upstream_port: int
    authz_proc: Proc
    envoy_proc: Proc
    policy_secret_dir: Path | None = None
    transport: str = "grpc"  # how Envoy's ext_authz calls authz: "grpc" or "http" (sidecar-http.yaml)
    http_authz_port: int = 0  # authz's HTTP check port (transport "http")
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """Base URL of Envoy's listener (no trailing slash)."""
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def metrics_url(self) -> str:
        """Base URL of authz's HTTP side: append /metrics, /readyz, /livez, /healthz."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def envoy_stats(self) -> dict[str, int]:
        """Envoy counters and gauges, e.g. ``http.ingress_http.ext_authz.denied``."""
        return stats(self.admin_port)

    def logs(self) -> str:
        """Both processes' log tails, for assertion messages."""
        return f"--- authz ---\n{self.authz_proc.log_tail()}\n--- envoy ---\n{self.envoy_proc.log_tail()}"

    def restart_authz(self, ready_timeout: float = AUTHZ_READY_TIMEOUT, *, wait_ready: bool = True) -> Proc:
        """Stop authz (if running) and start it again on the same ports, config and policy secret; wait
        until ready (``wait_ready=False``: until live)."""
        self.authz_proc.stop()
        self.authz_proc = start_authz(
            self.config_path,
            self.metrics_port,
            self.log_dir,
            ready_timeout=ready_timeout,
            policy_secret_dir=self.policy_secret_dir,
            wait_ready=wait_ready,
        )
        return self.authz_proc

    def close(self) -> None:
        """Stop Envoy, then authz, by PID (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.envoy_proc.stop()
        finally:
            self.authz_proc.stop()


BIND_RACE_ATTEMPTS = 3  # free_port() can race with other sockets picking the same ephemeral port


def start_stack(
    work_dir: Path,
    catalog_path: Path | None,
    upstream_port: int,
    *,
    api_name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    envoy_vars: Mapping[str, object] | None = None,
    listen_port: int | None = None,
    api_port: int | None = None,
    metrics_port: int | None = None,
    admin_port: int | None = None,
    authz_ready_timeout: float = AUTHZ_READY_TIMEOUT,
    policy_secret_dir: Path | None = None,
    wait_ready: bool = True,
    envoy_template: str = "sidecar.yaml",
    transport: str = "grpc",
) -> Stack:
    """Start authz (config written to ``work_dir/config.yaml``) and an Envoy sidecar in front of it.

    Args:
        work_dir: config, rendered Envoy config and ``logs/`` go here.
        catalog_path: the standalone catalog YAML (referenced by absolute path); None for Apigee mode,
            where ``overrides`` give ``tenant.remote_service_api`` (see :func:`write_authz_config`).
        upstream_port: port of the HTTP/1.1 upstream on 127.0.0.1 (e.g. an EchoUpstream).
        api_name: if set, every route sends the ext_authz context extension ``apigee_api=<api_name>``;
            if None, authz takes the API from ``:authority``.
        overrides: deep-merged into the authz config.
        envoy_vars: extra or replacement variables of the Envoy template (e.g. ``EXT_AUTHZ_TIMEOUT``).
        listen_port, api_port, metrics_port, admin_port: fixed ports; free ones by default.
        policy_secret_dir: passed to authz as ``--policy-secret DIR`` (Apigee X/hybrid).
        wait_ready: False to accept an unready authz (live only), e.g. a cold start during an Apigee
            outage; Envoy is then not waited on to see the authz cluster healthy.
        envoy_template: the sidecar template under ``envoy/``; it must have the ``authz`` cluster and the
            variables of ``sidecar.yaml`` (``sidecar-jwt-authn.yaml`` adds its own via ``envoy_vars``).
        transport: ``"http"`` runs the checks over Envoy's ext_authz HTTP transport: authz gets a
            ``global.http_authz_address`` and ``sidecar.yaml`` becomes ``sidecar-http.yaml``.

    Raises:
        StartupError: a process died or did not get ready; the message carries its log tail. Whatever
            was started is stopped first.
    """
    fixed = any(p is not None for p in (listen_port, api_port, metrics_port, admin_port))
    for attempt in range(1, BIND_RACE_ATTEMPTS + 1):
        try:
            return _start_stack_once(
                work_dir, catalog_path, upstream_port, api_name=api_name, overrides=overrides,
                envoy_vars=envoy_vars, listen_port=listen_port, api_port=api_port,
                metrics_port=metrics_port, admin_port=admin_port, authz_ready_timeout=authz_ready_timeout,
                policy_secret_dir=policy_secret_dir, wait_ready=wait_ready, envoy_template=envoy_template,
                transport=transport,
            )  # fmt: skip
        except StartupError as exc:
            lost_race = "already in use" in str(exc).lower() or "cannot listen" in str(exc).lower()
            if fixed or not lost_race or attempt == BIND_RACE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _start_stack_once(
    work_dir: Path,
    catalog_path: Path | None,
    upstream_port: int,
    *,
    api_name: str | None,
    overrides: Mapping[str, Any] | None,
    envoy_vars: Mapping[str, object] | None,
    listen_port: int | None,
    api_port: int | None,
    metrics_port: int | None,
    admin_port: int | None,
    authz_ready_timeout: float,
    policy_secret_dir: Path | None,
    wait_ready: bool,
    envoy_template: str,
    transport: str,
) -> Stack:
    log_dir = work_dir / "logs"
    listen_port = listen_port or free_port()
    api_port = api_port or free_port()
    metrics_port = metrics_port or free_port()
    admin_port = admin_port or free_port()
    http_authz_port = 0
    clusters = ["authz"]
    if transport == "http":
        if envoy_template != "sidecar.yaml":
            raise ValueError(f"{envoy_template} has no HTTP transport variant")
        envoy_template, http_authz_port = "sidecar-http.yaml", free_port()
        overrides = deep_merge(
            overrides or {}, {"global": {"http_authz_address": f"127.0.0.1:{http_authz_port}"}}
        )
        if overrides.get("auth", {}).get("append_metadata_headers"):  # Envoy decides what goes upstream
            envoy_vars = {"UPSTREAM_HEADERS": METADATA_UPSTREAM_HEADERS, **(envoy_vars or {})}
        clusters.append("authz_http")
    elif transport != "grpc":
        raise ValueError(f"transport must be grpc or http, not {transport!r}")
    config_path = write_authz_config(
        work_dir / "config.yaml",
        catalog_path=catalog_path,
        api_port=api_port,
        metrics_port=metrics_port,
        overrides=overrides,
    )
    variables: dict[str, object] = {
        "LISTEN_PORT": listen_port,
        "ADMIN_PORT": admin_port,
        "AUTHZ_PORT": api_port,
        "UPSTREAM_PORT": upstream_port,
        "AUTHZ_HTTP_PORT": http_authz_port,
        "METRICS_PORT": metrics_port,
        **(envoy_vars or {}),
    }
    envoy_config = render(envoy_template, work_dir, variables, api_name=api_name)
    authz_proc = start_authz(
        config_path,
        metrics_port,
        log_dir,
        ready_timeout=authz_ready_timeout,
        policy_secret_dir=policy_secret_dir,
        wait_ready=wait_ready,
    )
    try:
        envoy_proc = start_envoy(envoy_config, admin_port, log_dir)
    except BaseException:
        authz_proc.stop()
        raise
    stack = Stack(
        work_dir=work_dir,
        log_dir=log_dir,
        config_path=config_path,
        catalog_path=catalog_path,
        envoy_config_path=envoy_config,
        listen_port=listen_port,
        admin_port=admin_port,
        api_port=api_port,
        metrics_port=metrics_port,
        upstream_port=upstream_port,
        authz_proc=authz_proc,
        envoy_proc=envoy_proc,
        policy_secret_dir=policy_secret_dir,
        transport=transport,
        http_authz_port=http_authz_port,
    )
    if not wait_ready:
        return stack
    try:
        for cluster in clusters:
            wait_cluster_healthy(admin_port, cluster, ENVOY_HEALTHY_TIMEOUT, envoy_proc)
    except BaseException:
        stack.close()
        raise
    return stack
