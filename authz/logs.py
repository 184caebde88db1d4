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


def redact(headers: Mapping[str, str], extra: frozenset[str] = frozenset()) -> dict[str, str]:
    """A copy of ``headers`` with credential-bearing values masked."""
    secret = SECRET_HEADERS | extra
    return {k: (MASK if k.lower() in secret or "token" in k.lower() else v) for k, v in headers.items()}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
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
