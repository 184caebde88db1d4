"""``authz render envoy``: a complete Envoy config from the templates in ``envoy/``, for Cloud Run or GKE.

Every flag value is checked (:mod:`authz.render.values`) before it reaches a template, so a hostile or
mistyped value is refused with exit code 2 and the flag's name rather than producing YAML that breaks or
means something else. The output goes to stdout, or atomically to ``--output FILE`` (a temporary file in
the same directory, then renamed), so Envoy never reads half a config.

Imports: the standard library, :mod:`authz.render` and ``authz.__version__``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from authz import __version__
from authz.render import templates, values
from authz.render.templates import TemplateError

ENV_TEMPLATES = "AUTHZ_ENVOY_TEMPLATES"  # the Docker image sets /usr/share/apigee-authz/envoy
REPO_TEMPLATES = Path(__file__).resolve().parents[2] / "envoy"
VARIANTS = {
    "sidecar": "sidecar.yaml",
    "sidecar-http": "sidecar-http.yaml",
    "jwt-authn": "sidecar-jwt-authn.yaml",
    "gateway": "gateway.yaml",
}
DEFAULT_AUTHZ = "127.0.0.1:5000"
DEFAULT_UPSTREAM = "127.0.0.1:8888"
DEFAULT_METRICS_PORT = "5001"
DEFAULT_JWT_AUDIENCE = "remote-service-client"  # Apigee remote-token tokens (apigee-adapter.md §3.6)
DEFAULT_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"  # Debian/Ubuntu, the envoyproxy/envoy image
# Not ending in "z": Cloud Run reserves some such URL paths (/healthz among them).
DEFAULT_HEALTH_PATH = "/gateway-health"
# Checks per HTTP/2 connection before Envoy opens another: spreads a busy sidecar's checks over several
# connections, so over `authz serve --workers N` and over the replicas behind a TCP load balancer.
DEFAULT_MAX_CONCURRENT_STREAMS = "100"

EXAMPLES = """\
examples:
  Cloud Run sidecar (Envoy on :8080, the app on 127.0.0.1:8888, authz behind the GKE internal LB):
    authz render envoy --authz 10.128.0.50:5000 --api orders-api > envoy.yaml
  GKE sidecar reaching authz by its Service name:
    authz render envoy --authz apigee-authz.apigee.svc.cluster.local:5000 --upstream 127.0.0.1:8080
  Go-adapter style, Envoy's jwt_authn verifying Apigee remote-token tokens:
    authz render envoy --variant jwt-authn --apigee-runtime https://api.example.com --authz 10.128.0.50:5000
  A gateway routing two APIs:
    authz render envoy --variant gateway --authz 10.128.0.50:5000 \\
      --route /orders=orders-api@orders.internal:8080 --route /inventory=inventory-api@10.0.0.7:8080
"""


class RenderError(Exception):
    """A flag value that is fine alone but not with the others (or with the variant)."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")


def _checked(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse ``type`` that reports the parser's reason (argparse would only say "invalid value")."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = what
    return convert


def add_parser(commands: Any, env: Mapping[str, str]) -> None:
    """Add ``render envoy`` to the ``authz`` subcommands (``commands`` is argparse's subparsers action);
    ``env`` is the environment ``authz.cli`` read (``AUTHZ_ENVOY_TEMPLATES``)."""
    render = commands.add_parser("render", help="print a config for Envoy")
    targets = render.add_subparsers(dest="render_target", required=True)
    p = targets.add_parser(
        "envoy",
        help="an Envoy config in front of your app, with authz as its ext_authz",
        description="Print a complete Envoy config (envoy/README.md) with every value checked.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    host_port = _checked(values.host_port, "HOST:PORT")
    ip_port = _checked(values.ip_port, "IP:PORT")
    duration = _checked(values.duration, "duration")
    url = _checked(values.url, "URL")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="sidecar")
    p.add_argument(
        "--authz",
        type=host_port,
        default=DEFAULT_AUTHZ,
        metavar="HOST:PORT",
        help=f"authz's gRPC address, an IP or a DNS name (default {DEFAULT_AUTHZ})",
    )
    p.add_argument(
        "--listen",
        type=ip_port,
        default="0.0.0.0:8080",
        metavar="IP:PORT",
        help="Envoy's listener (default 0.0.0.0:8080)",
    )
    p.add_argument(
        "--admin",
        type=ip_port,
        default="127.0.0.1:9901",
        metavar="IP:PORT",
        help="Envoy's admin interface (default 127.0.0.1:9901)",
    )
    p.add_argument(
        "--upstream",
        type=host_port,
        metavar="HOST:PORT",
        help=f"the app behind Envoy (default {DEFAULT_UPSTREAM}; not for the gateway)",
    )
    p.add_argument(
        "--api",
        type=_checked(values.api_name, "API"),
        metavar="NAME",
        help="the API name authz checks (context extension apigee_api); default: the Host",
    )
    p.add_argument(
        "--route",
        type=_checked(values.route, "route"),
        action="append",
        default=[],
        metavar="PREFIX=API@HOST:PORT",
        help="gateway: a path prefix, its API and upstream",
    )
    p.add_argument(
        "--health-path",
        type=_checked(values.path, "path"),
        metavar="PATH",
        help=f"gateway: a path Envoy answers itself, without authz (default {DEFAULT_HEALTH_PATH})",
    )
    p.add_argument("--timeout", type=duration, default="1s", help="ext_authz deadline (default 1s)")
    p.add_argument(
        "--health-interval",
        type=duration,
        default="5s",
        help="gRPC health check interval of the authz cluster (default 5s)",
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=_checked(values.streams, "count"),
        default=DEFAULT_MAX_CONCURRENT_STREAMS,
        metavar="N",
        help=f"checks per HTTP/2 connection to authz (default {DEFAULT_MAX_CONCURRENT_STREAMS})",
    )
    p.add_argument(
        "--authz-http",
        type=host_port,
        metavar="HOST:PORT",
        help="sidecar-http: authz's HTTP check address (global.http_authz_address)",
    )
    p.add_argument(
        "--metrics-port",
        type=_checked(values.port, "port"),
        metavar="PORT",
        help=f"sidecar-http: authz's metrics port on that host (default {DEFAULT_METRICS_PORT})",
    )
    p.add_argument(
        "--metadata-headers",
        action="store_true",
        help="sidecar-http: copy the x-apigee-* context upstream (auth.append_metadata_headers)",
    )
    p.add_argument(
        "--apigee-runtime",
        type=url,
        metavar="URL",
        help="jwt-authn: https://RUNTIME_HOST; sets the remote-token issuer and JWKS URI",
    )
    p.add_argument("--jwt-issuer", type=url, metavar="URL", help="jwt-authn: the tokens' iss")
    p.add_argument("--jwks-uri", type=url, metavar="URL", help="jwt-authn: the issuer's JWKS")
    p.add_argument(
        "--jwt-audience",
        type=_checked(values.provider_name, "audience"),
        default=DEFAULT_JWT_AUDIENCE,
        help=f"jwt-authn: required aud (default {DEFAULT_JWT_AUDIENCE})",
    )
    p.add_argument(
        "--jwt-provider",
        type=_checked(values.provider_name, "name"),
        metavar="NAME",
        help="jwt-authn: provider name = authz's auth.jwt_provider_key (default: the issuer)",
    )
    p.add_argument(
        "--ca-file",
        type=_checked(values.file_path, "path"),
        default=DEFAULT_CA_FILE,
        help=f"jwt-authn: CAs for an https JWKS URI (default {DEFAULT_CA_FILE})",
    )
    p.add_argument(
        "--templates",
        type=Path,
        default=env.get(ENV_TEMPLATES, str(REPO_TEMPLATES)),
        metavar="DIR",
        help=f"the envoy/ templates (default ${ENV_TEMPLATES}, else the repo's)",
    )
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here (atomically), not to stdout")


def main(args: argparse.Namespace) -> int:
    """Run ``authz render envoy``; 0 on success, 2 (with the flag named) on a bad combination."""
    try:
        text = render(args)
        if args.output is None:
            sys.stdout.write(text)
        else:
            write_atomically(args.output, text)
    except RenderError as exc:
        print(f"authz render envoy: error: {exc}", file=sys.stderr)
        return 2
    return 0


def render(args: argparse.Namespace) -> str:
    """The config text for the parsed flags.

    Raises:
        RenderError: flags that do not fit the variant or each other, or templates that cannot be read.
    """
    template_name = VARIANTS[args.variant]
    variables = {**_common(args), **_VARIANT_VARIABLES[args.variant](args)}
    path = args.templates / template_name
    try:
        template = path.read_text()
    except OSError as exc:
        raise RenderError("--templates", f"cannot read {template_name}: {exc.strerror}") from exc
    try:
        text = templates.fill(template, variables, template_name)
    except TemplateError as exc:
        raise RenderError("--templates", f"{exc} (templates from another version of authz?)") from exc
    return (
        f"# Rendered by authz {__version__} render envoy --variant {args.variant} from {template_name}\n"
        + text
    )


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    directory = path.parent if str(path.parent) else Path()
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise RenderError("--output", f"cannot write in {str(directory)!r}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # an Envoy config holds no secret; mkstemp made it 0600
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RenderError("--output", f"cannot write {str(path)!r}: {exc.strerror}") from exc


def _common(args: argparse.Namespace) -> dict[str, str]:
    _only(args, "gateway", "--route", args.route)
    _only(args, "gateway", "--health-path", args.health_path)
    _only(args, "sidecar-http", "--authz-http", args.authz_http)
    _only(args, "sidecar-http", "--metrics-port", args.metrics_port)
    _only(args, "sidecar-http", "--metadata-headers", args.metadata_headers or None)
    for flag, value in (
        ("--apigee-runtime", args.apigee_runtime),
        ("--jwt-issuer", args.jwt_issuer),
        ("--jwks-uri", args.jwks_uri),
        ("--jwt-provider", args.jwt_provider),
    ):
        _only(args, "jwt-authn", flag, value)
    authz: values.HostPort = args.authz
    return {
        "LISTEN_ADDRESS": args.listen.host,
        "LISTEN_PORT": str(args.listen.port),
        "ADMIN_ADDRESS": args.admin.host,
        "ADMIN_PORT": str(args.admin.port),
        "AUTHZ_HOST": authz.host,
        "AUTHZ_CLUSTER_TYPE": authz.cluster_type,
        "AUTHZ_PORT": str(authz.port),
        "EXT_AUTHZ_TIMEOUT": args.timeout,
        "HEALTH_INTERVAL": args.health_interval,
        "AUTHZ_MAX_CONCURRENT_STREAMS": str(args.max_concurrent_streams),
    }


def _only(args: argparse.Namespace, variant: str, flag: str, value: object) -> None:
    if value not in (None, []) and args.variant != variant:
        raise RenderError(flag, f"only for --variant {variant}, not {args.variant}")


def _upstream(args: argparse.Namespace) -> dict[str, str]:
    upstream: values.HostPort = args.upstream or values.host_port(DEFAULT_UPSTREAM)
    return {
        "UPSTREAM_HOST": upstream.host,
        "UPSTREAM_CLUSTER_TYPE": upstream.cluster_type,
        "UPSTREAM_PORT": str(upstream.port),
        "AUTHZ_PER_ROUTE": templates.per_route_authz(args.api),
    }


def _sidecar_http(args: argparse.Namespace) -> dict[str, str]:
    check: values.HostPort | None = args.authz_http
    if check is None:
        raise RenderError("--authz-http", "the sidecar-http variant needs authz's HTTP check address")
    metrics_port = args.metrics_port or int(DEFAULT_METRICS_PORT)
    headers = templates.METADATA_HEADERS if args.metadata_headers else ("x-authz-copy-nothing",)
    return {
        **_upstream(args),
        "AUTHZ_HTTP_HOST": check.host,
        "AUTHZ_HTTP_CLUSTER_TYPE": check.cluster_type,
        "AUTHZ_HTTP_PORT": str(check.port),
        "METRICS_PORT": str(metrics_port),
        "AUTHZ_CONTEXT": templates.context_headers(args.api),
        "UPSTREAM_HEADERS": templates.header_matchers(headers),
    }


def _jwt_authn(args: argparse.Namespace) -> dict[str, str]:
    issuer: values.Url | None = args.jwt_issuer
    jwks: values.Url | None = args.jwks_uri
    if args.apigee_runtime is not None:
        if issuer is not None or jwks is not None:
            raise RenderError("--apigee-runtime", "give it, or --jwt-issuer and --jwks-uri, not both")
        runtime: values.Url = args.apigee_runtime
        base = runtime.text.rstrip("/")
        issuer, jwks = values.url(f"{base}/remote-token/token"), values.url(f"{base}/remote-token/certs")
    if issuer is None or jwks is None:
        flag = "--jwt-issuer" if issuer is None else "--jwks-uri"
        raise RenderError(
            flag, "the jwt-authn variant needs --apigee-runtime, or --jwt-issuer and --jwks-uri"
        )
    tls_host = jwks.upstream.host if jwks.https else None
    return {
        **_upstream(args),
        "JWT_PROVIDER": args.jwt_provider or issuer.text,
        "JWT_ISSUER": issuer.text,
        "JWT_AUDIENCE": args.jwt_audience,
        "JWKS_URI": jwks.text,
        "JWKS_HOST": jwks.upstream.host,
        "JWKS_CLUSTER_TYPE": jwks.upstream.cluster_type,
        "JWKS_PORT": str(jwks.upstream.port),
        "JWKS_TRANSPORT_SOCKET": templates.transport_socket(tls_host, args.ca_file),
    }


def _gateway(args: argparse.Namespace) -> dict[str, str]:
    for flag, value in (("--upstream", args.upstream), ("--api", args.api)):
        if value is not None:
            raise RenderError(flag, "the gateway takes each upstream and API from --route")
    try:
        gateway = templates.gateway(args.route)
    except ValueError as exc:
        raise RenderError("--route", str(exc)) from exc
    # The health route is an exact match listed first: a route's prefix may cover it, which is fine.
    health_path = args.health_path or DEFAULT_HEALTH_PATH
    return {
        "HEALTH_PATH": health_path,
        "GATEWAY_ROUTES": gateway.routes,
        "GATEWAY_CLUSTERS": gateway.clusters,
    }


_VARIANT_VARIABLES: dict[str, Callable[[argparse.Namespace], dict[str, str]]] = {
    "sidecar": _upstream,
    "sidecar-http": _sidecar_http,
    "jwt-authn": _jwt_authn,
    "gateway": _gateway,
}
