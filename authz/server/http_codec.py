"""HTTP in, HTTP out: Envoy's ext_authz ``http_service`` request -> RequestAttrs, Decision -> response bytes.

The HTTP transport's twin of ``codec`` (same functions, so ``check.Checker`` runs over either). Envoy sends
the original method and path (with its query) and the headers its ``allowed_headers`` select; a 200 allows
and anything else denies with that status and body. What the gRPC transport carries in fields travels here
in headers, which the Envoy config (``envoy/sidecar-http.yaml``) wires up:

* context extensions: ``x-authz-context-<name>`` request headers (``-`` in the name read as ``_``, so
  ``x-authz-context-apigee-api`` is ``apigee_api``), set by the config's ``headers_to_add``, which
  overrides anything a client sends;
* on allow: headers for the upstream (``allowed_upstream_headers``), ``x-envoy-auth-headers-to-remove``
  (a comma list Envoy removes upstream), the ``x-apigee-*`` metadata (``dynamic_metadata_from_headers``)
  and the rate-limit headers for the client (``allowed_client_headers_on_success``);
* on deny: the status, the JSON body and the client headers (``allowed_client_headers``).

A query parameter cannot be removed over HTTP, and Envoy sends no jwt_authn metadata: see the README.
Every answer is built once per request shape (denies at import; allows are cached by the checker).
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable
from typing import Final, NamedTuple

from authz.decision.model import Decision, DenyReason, Policy, RequestAttrs
from authz.server.codec import deny_body, deny_headers, http_status, rate_limit_headers, request_key

CONTEXT_PREFIX = "x-authz-context-"
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters (tab is allowed in a value)


class HttpCheck(NamedTuple):
    """One check request as the HTTP edge received it."""

    method: str
    path: str  # the original path with its query, as Envoy sent it
    headers: dict[str, str]  # lowercase names; Host as ":authority"; duplicates joined with ","
    extensions: dict[str, str]  # from the x-authz-context-* headers


def check_request(method: str, path: str, raw_headers: Iterable[tuple[bytes, bytes]]) -> HttpCheck:
    """Read the parser's header lines: lowercase names, Host as ``:authority`` (as in a CheckRequest),
    duplicates joined with "," and context-extension headers set apart. Bytes that are not UTF-8 become
    U+FFFD, so a key carrying them is malformed, never another key."""
    headers: dict[str, str] = {}
    extensions: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("utf-8", "replace")
        if name == "host":
            name = ":authority"
        elif name.startswith(CONTEXT_PREFIX):
            extensions[name[len(CONTEXT_PREFIX) :].replace("-", "_")] = value
            continue
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return HttpCheck(method, path, headers, extensions)


def request_attrs(request: HttpCheck) -> RequestAttrs:
    path, _, query = request.path.partition("?")
    return RequestAttrs(
        method=request.method,
        path=path,
        query=query,
        headers=request.headers,
        context_extensions=request.extensions,
    )


def decision_key(
    request: HttpCheck, policy: Policy, token_headers: tuple[str, ...] = ()
) -> tuple[str | None, ...] | None:
    return request_key(
        request.method, request.path, request.headers, request.extensions, policy, token_headers
    )


def request_uri(request: HttpCheck) -> str:
    return request.path


def request_time_ms(request: HttpCheck) -> int:
    """Envoy does not send when it received the request: 0, and the checker takes its own clock."""
    return 0


def source_ip(request: HttpCheck) -> str:
    """The peer is Envoy itself; the client's address comes from ``x-forwarded-for`` when allowed."""
    return ""


def _line(name: str, value: str) -> bytes:
    """One header line; control characters (a CR or LF from catalog data) become spaces."""
    return f"{name}: {_UNSAFE.sub(' ', value)}\r\n".encode()


def _response(status: int, headers: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = b"".join(_line(name, value) for name, value in headers)
    head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + lines + b"\r\n" + body


def _denied(reason: DenyReason, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    return _response(http_status(reason), (*deny_headers(reason), *extra), deny_body(reason).encode())


_DENIED: Final[dict[DenyReason, bytes]] = {reason: _denied(reason) for reason in DenyReason}


def denied_response(reason: DenyReason) -> bytes:
    return _DENIED[reason]


def encode(decision: Decision) -> bytes:
    """A prebuilt deny, or a 200 whose headers carry the upstream changes and the metadata."""
    if not decision.allowed:
        assert decision.reason is not None  # allowed is False only with a reason
        return _DENIED[decision.reason]
    # Empty metadata values are left out (the access-log receiver reads a missing field as empty): every
    # line costs Envoy parsing and copying on each check. Upstream headers are sent as the decision has them.
    headers = {name: value for name, value in decision.metadata.items() if value}
    headers.update(decision.headers_to_set)  # the same x-apigee-* values: one line each
    if decision.headers_to_remove:
        headers[HEADERS_TO_REMOVE] = ",".join(decision.headers_to_remove)
    return _response(200, headers.items())


def quota_exceeded(decision: Decision, limit: int, reset: float, now: float) -> bytes:
    """The 429 with ``retry-after`` and the rate-limit headers; or, when ``allow_unauthorized`` let the
    request through, its allow with the rate-limit headers for the client."""
    headers = rate_limit_headers(limit, 0, reset, now)
    if decision.allowed:
        return with_headers(encode(decision), headers)
    return _denied(DenyReason.QUOTA_EXCEEDED, [("retry-after", headers[2][1]), *headers])


def with_quota_headers(response: bytes, limit: int, remaining: int, reset: float, now: float) -> bytes:
    return with_headers(response, rate_limit_headers(limit, remaining, reset, now))


def with_headers(response: bytes, headers: Iterable[tuple[str, str]]) -> bytes:
    """An allow (no body) with more header lines."""
    return response[:-2] + b"".join(_line(name, value) for name, value in headers) + b"\r\n"


def without_body(response: bytes) -> bytes:
    """The answer to a HEAD check: the same status and headers, no body (Envoy reads none)."""
    return response[: response.index(b"\r\n\r\n") + 4]
