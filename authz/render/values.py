"""Parse and check every value ``authz render envoy`` puts into an Envoy config.

Each parser takes the text a user typed and returns a checked value or raises ``ValueError`` with a short
reason (argparse turns it into ``argument --flag: ...`` and exit code 2). What passes is safe to place in the
templates: hosts, names and paths are restricted to characters that cannot end a YAML scalar, open a flow
collection or start a comment, and the renderer JSON-quotes them as well.

Imports: the standard library only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

MAX_DURATION_SECONDS = Decimal(3600)
MAX_STREAMS = 2**31 - 1  # http2 max_concurrent_streams: 1 to 2^31-1 (Envoy protocol.proto)

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens, 253 characters at most.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_DIGITS = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() and int() also take "٣"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60)}
# An Apigee API (proxy) name or a remote-service target such as httpbin.org: no quotes, spaces, braces,
# `=` or `@`.
_API_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]{0,254}")
# An absolute path of RFC 3986 path characters (percent escapes included), without `=` (it ends the prefix
# of --route), `?` or `#`.
_PATH = re.compile(r"/(?:[A-Za-z0-9._~!$&'()*+,;:@/-]|%[0-9A-Fa-f]{2}){0,1023}")
# RFC 3986 URI characters: nothing that ends a double-quoted YAML scalar (`"`, `\`) or a line.
_URI = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,2048}")


@dataclass(frozen=True)
class HostPort:
    """A host (an IP address or a DNS name) and a port; ``is_ip`` picks the Envoy cluster type."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        return is_ip(self.host)

    @property
    def cluster_type(self) -> str:
        """``STATIC`` for an IP, ``STRICT_DNS`` for a name (Envoy refuses a name in a STATIC cluster)."""
        return "STATIC" if self.is_ip else "STRICT_DNS"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return int(text)


def host(text: str) -> str:
    """An IPv4 or IPv6 address (without brackets) or an RFC 1123 DNS name."""
    if is_ip(text) or _HOSTNAME.fullmatch(text):
        return text
    raise ValueError(f"{text!r} is neither an IP address nor a DNS name")


def host_port(text: str) -> HostPort:
    """``HOST:PORT``, ``[IPv6]:PORT``: the host an IP or a DNS name."""
    name, sep, port_text = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if name.startswith("[") and name.endswith("]"):
        if not is_ip(name[1:-1]) or ":" not in name:
            raise ValueError(f"{name!r} is not an IPv6 address")
        name = name[1:-1]
    elif ":" in name:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:5000")
    return HostPort(host(name), port(port_text))


def ip_port(text: str) -> HostPort:
    """``IP:PORT`` for a socket Envoy binds (a listener or the admin interface): no DNS names."""
    value = host_port(text)
    if not value.is_ip:
        raise ValueError(f"{value.host!r} is not an IP address (Envoy binds IPs, e.g. 0.0.0.0)")
    return value


def duration(text: str) -> str:
    """``250ms``, ``1s``, ``1.5s`` or ``2m`` (above zero, at most an hour) as a protobuf Duration (``0.25s``).

    Envoy's YAML takes the protobuf JSON form only, seconds with an ``s``: ``250ms`` would be refused.
    """
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 250ms, 1s or 2m")
    try:
        seconds = Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits decimal numbers only
        raise ValueError(f"{text!r} is not a duration") from exc
    if not 0 < seconds <= MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is not above 0 and at most 1h")
    if seconds != seconds.quantize(Decimal("1e-9")):
        raise ValueError(f"{text!r} is finer than a nanosecond")
    return f"{seconds.normalize():f}s"


def streams(text: str) -> int:
    """http2 max_concurrent_streams: 1 to 2^31-1."""
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_STREAMS:
        raise ValueError(f"{text!r} is not a stream count (1-{MAX_STREAMS})")
    return int(text)


def api_name(text: str) -> str:
    """An API name for the ``apigee_api`` context extension: letters, digits and ``. _ ~ : -``."""
    if not _API_NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not an API name (letters, digits and . _ ~ : - only, up to 255)")
    return text


def path(text: str) -> str:
    """An absolute URL path of RFC 3986 characters (no query, fragment or ``=``), up to 1024."""
    if not _PATH.fullmatch(text) or "//" in text:
        raise ValueError(f"{text!r} is not a path such as /orders (RFC 3986 characters, no ? # = or //)")
    return text


def prefix(text: str) -> str:
    """A route prefix: a :func:`path` without a trailing slash (``/orders/`` is ``/orders``; ``/`` stays)."""
    checked = path(text)
    return checked.rstrip("/") or "/"


@dataclass(frozen=True)
class Route:
    """``--route PREFIX=API@HOST:PORT``: requests under ``prefix`` go to ``upstream`` as API ``api``."""

    prefix: str
    api: str
    upstream: HostPort


def route(text: str) -> Route:
    """``PREFIX=API@HOST:PORT``, e.g. ``/orders=orders-api@orders.internal:8080``."""
    route_prefix, eq, rest = text.partition("=")
    api, at, upstream = rest.partition("@")
    if not eq or not at:
        raise ValueError(f"{text!r} is not PREFIX=API@HOST:PORT")
    return Route(prefix(route_prefix), api_name(api), host_port(upstream))


@dataclass(frozen=True)
class Url:
    """An http(s) URL: the text as given, and the host and port Envoy's cluster connects to."""

    text: str
    https: bool
    upstream: HostPort


def url(text: str) -> Url:
    """An ``http://`` or ``https://`` URL with a host (IP or DNS name) and RFC 3986 characters only."""
    if not _URI.fullmatch(text):
        raise ValueError(f"{text!r} is not a URL (RFC 3986 characters only)")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"{text!r} is not an http(s)://HOST/... URL")
    try:
        url_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ValueError(f"{text!r} has a bad port") from exc
    return Url(text, parts.scheme == "https", HostPort(host(parts.hostname), url_port))


def provider_name(text: str) -> str:
    """A jwt_authn provider name (authz's ``auth.jwt_provider_key``): an API-name-like word or a URL."""
    if _API_NAME.fullmatch(text):
        return text
    return url(text).text


def file_path(text: str) -> str:
    """An absolute file path of safe characters (for Envoy's ``filename`` fields)."""
    if not re.fullmatch(r"/[A-Za-z0-9._/+-]{0,1023}", text):
        raise ValueError(f"{text!r} is not an absolute path of letters, digits and . _ / + -")
    return text
