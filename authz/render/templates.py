"""Fill the ``string.Template`` Envoy configs of the top-level ``envoy/`` folder.

:func:`fill` is the one substitution both ``authz render envoy`` and ``devstack.envoy.render`` use: every
``${NAME}`` must have a value (a missing one raises :class:`TemplateError`, never leaves ``${...}`` in the
output), and a multi-line value standing alone on its line (``gateway.yaml``'s routes and clusters) is
indented to that line's column. The builders return YAML flow text (JSON, which YAML reads) for the
variables that hold structures: per-route ext_authz settings, gateway routes and clusters, the JWKS
cluster's transport socket. JSON quoting is what keeps any string value inside its scalar.

Imports: the standard library and :mod:`authz.render.values` only (devstack imports this module).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from authz.decision import dynamic_metadata
from authz.render.values import HostPort, Route, is_ip

CONTEXT_EXTENSION_API = "apigee_api"  # the context extension authz reads the API name from
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXT_AUTHZ_PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
CONTEXT_HEADER_PREFIX = "x-authz-context-"  # the HTTP transport's context extensions (authz http_codec)
UPSTREAM_CONNECT_TIMEOUT = "1s"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
# The x-apigee-* context headers the HTTP transport may copy upstream (auth.append_metadata_headers): every
# name authz sends, never the access token.
METADATA_HEADERS = (
    dynamic_metadata.API,
    dynamic_metadata.API_PRODUCTS,
    dynamic_metadata.APPLICATION,
    dynamic_metadata.CLIENT_ID,
    dynamic_metadata.DEVELOPER_EMAIL,
    dynamic_metadata.ENVIRONMENT,
    dynamic_metadata.ORGANIZATION,
    dynamic_metadata.SCOPE,
    dynamic_metadata.ANALYTICS_PRODUCT,
    dynamic_metadata.AUTHORIZED,
    dynamic_metadata.CUSTOM_ATTRIBUTES,
    dynamic_metadata.UNAUTHORIZED_REASON,
)

_BLOCK_LINE = re.compile(r"^([ \t]*)\$\{([A-Za-z_][A-Za-z0-9_]*)\}[ \t]*$", re.MULTILINE)


class TemplateError(KeyError):
    """A template placeholder has no value (a KeyError, as ``string.Template.substitute`` raises)."""

    def __str__(self) -> str:
        return str(self.args[0])


def placeholders(text: str) -> set[str]:
    """The ``${NAME}`` / ``$NAME`` placeholders of a template."""
    return {
        m.group("named") or m.group("braced")
        for m in string.Template.pattern.finditer(text)
        if m.group("named") or m.group("braced")
    }


def fill(text: str, values: Mapping[str, str], name: str = "template") -> str:
    """Substitute every placeholder of ``text``; multi-line values alone on a line keep its indentation.

    Raises:
        TemplateError: a placeholder has no value (the message names it and the template).
    """
    missing = sorted(placeholders(text) - values.keys())
    if missing:
        raise TemplateError(f"{name}: no value for ${{{missing[0]}}}")

    def indent_block(match: re.Match[str]) -> str:
        indent, key = match.group(1), match.group(2)
        lines = values[key].splitlines() or [""]
        return "\n".join(indent + line for line in lines).replace("$", "$$")

    return string.Template(_BLOCK_LINE.sub(indent_block, text)).substitute(values)


def flow(value: object) -> str:
    """``value`` as one line of YAML flow text (JSON), every string quoted."""
    return json.dumps(value, ensure_ascii=True, separators=(", ", ": "))


def ext_authz_per_route(check_settings: Mapping[str, object] | None = None, disabled: bool = False) -> object:
    per_route: dict[str, object] = {"@type": EXT_AUTHZ_PER_ROUTE_TYPE}
    if disabled:
        per_route["disabled"] = True
    else:
        per_route["check_settings"] = dict(check_settings or {})
    return {EXT_AUTHZ_FILTER: per_route}


def per_route_authz(api_name: str | None) -> str:
    """A route's ``typed_per_filter_config`` (``AUTHZ_PER_ROUTE``) as YAML flow text.

    With ``api_name``, ext_authz sends ``context_extensions: {apigee_api: <api_name>}`` so authz uses that
    API name; without, the mapping is empty and authz falls back to ``:authority``.
    """
    if not api_name:
        return "{}"
    return flow(ext_authz_per_route({"context_extensions": {CONTEXT_EXTENSION_API: api_name}}))


def context_headers(api_name: str | None) -> str:
    """sidecar-http.yaml's ``AUTHZ_CONTEXT``: the ``apigee_api`` context extension as a header Envoy adds
    to every check (overriding a client's), or ``[]``."""
    if not api_name:
        return "[]"
    return flow([{"key": f"{CONTEXT_HEADER_PREFIX}apigee-api", "value": api_name}])


def header_matchers(names: Iterable[str]) -> str:
    """A YAML flow list of exact StringMatchers (sidecar-http.yaml's ``UPSTREAM_HEADERS``)."""
    return flow([{"exact": name} for name in names])


def cluster_name(upstream: HostPort) -> str:
    """``upstream_<host>_<port>``, the host's dots and colons as underscores (a stats-friendly name)."""
    return "upstream_" + re.sub(r"[^A-Za-z0-9-]", "_", upstream.host) + f"_{upstream.port}"


def cluster(name: str, upstream: HostPort) -> dict[str, object]:
    """A plain HTTP/1.1 cluster of one host: STATIC for an IP, STRICT_DNS for a name."""
    return {
        "name": name,
        "type": upstream.cluster_type,
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": UPSTREAM_CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": upstream.host, "port_value": upstream.port}
                                }
                            }
                        }  # fmt: skip
                    ]
                }
            ],
        },
    }


@dataclass(frozen=True)
class Gateway:
    """``gateway.yaml``'s ``GATEWAY_ROUTES`` and ``GATEWAY_CLUSTERS``: YAML block-list lines."""

    routes: str
    clusters: str


def gateway(routes: Sequence[Route]) -> Gateway:
    """One route per prefix (longest first, so ``/orders/v2`` wins over ``/orders``), one cluster per
    distinct upstream; each route names its API in ``context_extensions.apigee_api``.

    A prefix matches itself and what follows a ``/`` (``path_separated_prefix``): ``/orders`` matches
    ``/orders`` and ``/orders/1``, never ``/ordersx``; ``/`` matches everything.

    Raises:
        ValueError: two routes have the same prefix, or there are none.
    """
    if not routes:
        raise ValueError("a gateway needs at least one route")
    prefixes = [r.prefix for r in routes]
    duplicate = next((p for p in prefixes if prefixes.count(p) > 1), None)
    if duplicate is not None:
        raise ValueError(f"two routes for the prefix {duplicate!r}")
    names: dict[HostPort, str] = {}
    for r in routes:
        if r.upstream not in names:
            base = cluster_name(r.upstream)
            taken = set(names.values())
            names[r.upstream] = base if base not in taken else f"{base}_{len(names)}"
    route_lines = []
    for r in sorted(routes, key=lambda r: len(r.prefix), reverse=True):
        match = {"prefix": "/"} if r.prefix == "/" else {"path_separated_prefix": r.prefix}
        per_route = ext_authz_per_route({"context_extensions": {CONTEXT_EXTENSION_API: r.api}})
        target = {"cluster": names[r.upstream]}
        entry = {"match": match, "route": target, "typed_per_filter_config": per_route}
        route_lines.append("- " + flow(entry))
    cluster_lines = ["- " + flow(cluster(name, upstream)) for upstream, name in names.items()]
    return Gateway("\n".join(route_lines), "\n".join(cluster_lines))


def transport_socket(tls_host: str | None, ca_file: str) -> str:
    """A cluster's ``transport_socket``: plain TCP without ``tls_host``; else TLS to ``tls_host``, its
    certificate checked against ``ca_file`` and required to name ``tls_host`` (a DNS or IP SAN; a name is
    also sent as SNI). Envoy checks no name unless told to, so any certificate of a trusted CA would do."""
    if tls_host is None:
        raw = {"@type": RAW_BUFFER_TYPE}
        return flow({"name": "envoy.transport_sockets.raw_buffer", "typed_config": raw})
    san_type = "IP_ADDRESS" if is_ip(tls_host) else "DNS"
    validation = {
        "trusted_ca": {"filename": ca_file},
        "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": tls_host}}],
    }
    tls: dict[str, object] = {"@type": TLS_TYPE, "common_tls_context": {"validation_context": validation}}
    if san_type == "DNS":
        tls["sni"] = tls_host
    return flow({"name": "envoy.transport_sockets.tls", "typed_config": tls})
