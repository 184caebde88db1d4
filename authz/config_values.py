"""The value types of the config file: Go durations, listen addresses, and ``Section``, one YAML mapping
read with typed getters that raise ``ConfigError(file, dotted.key, problem)``.

Imports only the standard library, ``authz.config_documents`` and ``authz.errors``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from authz.config_documents import kind_name
from authz.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@dataclass(frozen=True)
class Address:
    """A listen address; ``host == ""`` means all interfaces. IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def grpc_target(self) -> str:
        """The address for ``grpc.aio.Server.add_insecure_port``: ``[::]:port`` when host is empty."""
        return f"[::]:{self.port}" if not self.host else str(self)

    def http_host(self) -> str:
        """The host for asyncio/http.server binds, where ``""`` already means all interfaces."""
        return self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}
_UNIT_NS["h"] = 3600 * 10**9
_COMPONENT = re.compile(r"([0-9]*)(?:\.([0-9]*))?(ns|us|µs|μs|ms|s|m|h)")
_MAX_NS = 2**63 - 1  # Go's time.Duration range (about 292 years)


def parse_duration(value: object, file: str, key: str) -> float:
    """Parse a Go duration string (``"30s"``, ``"1m30s"``, ``"1.5h"``, ``"500ms"``) into seconds."""
    if not isinstance(value, str):
        raise ConfigError(
            file, key, f'expected a duration string such as "30s" or "2m", got {kind_name(value)}'
        )
    if not value:
        raise ConfigError(file, key, 'expected a duration such as "30s" or "2m", got an empty string')
    if re.fullmatch(r"[+-]?[0-9]*\.?[0-9]*", value):
        raise ConfigError(file, key, f'missing unit in duration "{value}" (use ns, us, ms, s, m or h)')
    body = value[1:] if value[0] in "+-" else value
    total, pos = 0, 0
    while pos < len(body):
        match = _COMPONENT.match(body, pos)
        if match is None or not (match[1] or match[2]):
            raise ConfigError(file, key, f'invalid duration "{value}" (expected e.g. "30s", "1m30s", "1.5h")')
        unit, fraction = _UNIT_NS[match[3]], match[2] or ""
        total += int(match[1] or 0) * unit + (int(fraction) * unit // 10 ** len(fraction) if fraction else 0)
        pos = match.end()
    if not body or total > _MAX_NS:
        raise ConfigError(file, key, f'invalid duration "{value}" (expected e.g. "30s", "1m30s", "1.5h")')
    if value[0] == "-" and total:
        raise ConfigError(file, key, f'must not be negative, got "{value}"')
    return total / 1e9


def format_duration(seconds: float) -> str:
    """Render seconds the way Go's ``time.Duration.String`` does: ``2m0s``, ``1m30s``, ``500ms``."""
    ns = round(seconds * 1e9)
    if 0 < ns < 10**9:
        unit, size = next((u, s) for u, s in (("ms", 10**6), ("µs", 10**3), ("ns", 1)) if ns >= s)
        return f"{ns / size:.6f}".rstrip("0").rstrip(".") + unit
    hours, rest = divmod(ns, _UNIT_NS["h"])
    minutes, rest = divmod(rest, _UNIT_NS["m"])
    text = f"{rest / 1e9:.9f}".rstrip("0").rstrip(".") + "s"
    return f"{hours}h{minutes}m{text}" if hours else f"{minutes}m{text}" if minutes else text


def parse_address(value: object, file: str, key: str) -> Address:
    """Parse ``":5000"``, ``"127.0.0.1:0"`` (port 0 picks a free port) or ``"[::1]:5000"``."""
    if not isinstance(value, str):
        raise ConfigError(file, key, f"expected a string, got {kind_name(value)}")
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(file, key, f'expected "host:port" or ":port", got "{value}"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(file, key, f'invalid IPv6 host "{host}"') from None
    elif ":" in host:
        raise ConfigError(file, key, f'IPv6 hosts need brackets, like "[::1]:5000"; got "{value}"')
    elif re.search(r"[\s\[\]/]", host):
        raise ConfigError(file, key, f'invalid host "{host}"')
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(file, key, f'invalid port "{port}" (expected 0-65535)')
    return Address(host, int(port))


class Section:
    """One YAML mapping: typed getters with defaults, and an error for any key it does not know."""

    def __init__(self, file: str, path: str, raw: object, known: tuple[str, ...], base_dir: str) -> None:
        if raw is None:  # "tls:" with every entry commented out
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(file, path, f"expected a mapping, got {kind_name(raw)}")
        self.file, self.path, self.base_dir, self._raw = file, path, base_dir, raw
        for name in map(str, raw):
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else "expected one of: " + ", ".join(known)
                raise self.error(name, f"unknown {'key' if path else 'section'} ({hint})")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def child(self, name: str, cls: type[DataclassInstance]) -> Section:
        known = tuple(f.name for f in fields(cls))
        return Section(self.file, self.key(name), self._raw.get(name), known, self.base_dir)

    def text(self, name: str, default: str = "", *, required: bool = False) -> str:
        value = self._raw.get(name, default)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {kind_name(value)}")
        if required and not value:
            raise self.error(name, "must not be empty")
        return value

    def flag(self, name: str) -> bool:
        value = self._raw.get(name, False)
        if not isinstance(value, bool):
            raise self.error(name, f"expected a boolean, got {kind_name(value)}")
        return value

    def integer(self, name: str, default: int, minimum: int) -> int:
        value = self._raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {kind_name(value)}")
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def duration(self, name: str, default: float, minimum: float = 0.0, *, positive: bool = False) -> float:
        if name not in self._raw:
            return default
        value = parse_duration(self._raw[name], self.file, self.key(name))
        if positive and value == 0:
            raise self.error(name, "must be greater than 0s")
        if value < minimum:
            raise self.error(name, f"must be at least {format_duration(minimum)}, got {self._raw[name]}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        """A list of non-empty strings; () when absent."""
        value = self._raw.get(name) or []
        if not isinstance(value, list):
            raise self.error(name, f"expected a list, got {kind_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(f"{name}[{i}]", f"expected a non-empty string, got {kind_name(item)}")
        return tuple(value)

    def items(self, name: str, cls: type[DataclassInstance]) -> list[Section]:
        """A list of mappings, each a section with ``cls``'s keys; [] when absent."""
        value = self._raw.get(name) or []
        if not isinstance(value, list):
            raise self.error(name, f"expected a list, got {kind_name(value)}")
        known = tuple(f.name for f in fields(cls))
        return [
            Section(self.file, f"{self.key(name)}[{i}]", item, known, self.base_dir)
            for i, item in enumerate(value)
        ]

    def address(self, name: str, default: str) -> Address:
        return parse_address(self._raw.get(name, default), self.file, self.key(name))

    def url(self, name: str, default: str = "", *, required: bool = False) -> str:
        value = self.text(name, default, required=required)
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise self.error(name, f'expected an http or https URL, got "{value}"')
        return value

    def file_path(self, name: str) -> str:
        """A file that must exist, resolved against the config file's directory; "" when unset."""
        value = self.text(name)
        if not value:
            return ""
        resolved = os.path.normpath(os.path.join(self.base_dir, value))
        if not os.path.exists(resolved):
            raise self.error(name, f"file not found: {resolved}")
        if not os.path.isfile(resolved):
            raise self.error(name, f"not a regular file: {resolved}")
        return resolved

    def file_set(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Files that must be given all together or not at all (the Go adapter's TLS rule)."""
        given = [n for n in names if self.text(n)]
        if given and len(given) < len(names):
            missing = next(n for n in names if n not in given)
            raise self.error(missing, f"required when {', '.join(map(self.key, given))} is set")
        return tuple(self.file_path(n) for n in names)
