"""Logging set-up (text or JSON lines) and redaction of credentials.

Credentials never reach a log line: deny logs carry a reduced request (method, api, path without query,
reason, request id), and ``redact`` masks secret-bearing headers wherever full detail is logged.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

SECRET_HEADERS = frozenset({"x-api-key", "authorization", "cookie", "set-cookie", "proxy-authorization"})
MASK = "***"


def _mask(name: str, value: str, secret: frozenset[str]) -> str:
    lowered = name.lower()
    if lowered in secret or "token" in lowered or "secret" in lowered:
        return MASK
    if lowered == ":path" and "?" in value:  # the query string may carry the API key
        return value.split("?", 1)[0] + "?" + MASK
    return value


def redact(headers: Mapping[str, str], extra: frozenset[str] = frozenset()) -> dict[str, str]:
    """A copy of ``headers`` with credential-bearing values (and the query string of ``:path``) masked.

    ``extra`` adds header names to mask, such as a custom ``auth.api_key_header``.
    """
    secret = SECRET_HEADERS | extra
    return {name: _mask(name, value, secret) for name, value in headers.items()}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            # Cloud Logging (GKE, Cloud Run) reads the level of a JSON line from "severity"; without it a
            # line on stderr shows as ERROR.
            "severity": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup(level: str = "info", json_lines: bool = False) -> None:
    """Configure the ``authz`` logger tree once, at start-up."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("authz")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
