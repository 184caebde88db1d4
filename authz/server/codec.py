"""Protobuf in, protobuf out: CheckRequest -> RequestAttrs and Decision -> CheckResponse.

The one module that touches Envoy's ext_authz messages (from xds-protos, upb-backed). It holds the single
status table mapping each deny reason to a gRPC code, an HTTP status and a user-facing message. Deny
responses are constant per reason, so they are built once at import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2

from authz.decision.authorize import FAILURE_MODE_HEADER
from authz.decision.dynamic_metadata import PREFIX
from authz.decision.model import Decision, DenyReason, Policy, RequestAttrs

UNAUTHENTICATED: Final = (code_pb2.UNAUTHENTICATED, 401)
FORBIDDEN: Final = (code_pb2.PERMISSION_DENIED, 403)
# A status in the CheckResponse body is a deny Envoy honours as sent (status_on_error does not apply),
# so "cannot decide" is answered with an explicit 503, never left to Envoy's failure mode.
UNAVAILABLE: Final = (code_pb2.UNAVAILABLE, 503)
TOO_MANY: Final = (code_pb2.RESOURCE_EXHAUSTED, 429)
BAD_REQUEST: Final = (code_pb2.INVALID_ARGUMENT, 400)

# reason -> (gRPC code, HTTP status, message shown to the client)
DENY_STATUS: Final[dict[DenyReason, tuple[int, int, str]]] = {
    DenyReason.MISSING_CREDENTIALS: (*UNAUTHENTICATED, "An API key is required."),
    DenyReason.MALFORMED_CREDENTIALS: (*UNAUTHENTICATED, "The API key is malformed."),
    DenyReason.AMBIGUOUS_CREDENTIALS: (*UNAUTHENTICATED, "The request carries more than one API key."),
    DenyReason.UNKNOWN_KEY: (*UNAUTHENTICATED, "The API key is not valid."),
    DenyReason.REVOKED_KEY: (*UNAUTHENTICATED, "The API key has been revoked."),
    DenyReason.EXPIRED_KEY: (*UNAUTHENTICATED, "The API key has expired."),
    DenyReason.MISSING_API: (*FORBIDDEN, "The request does not name an API."),
    DenyReason.NOT_AUTHORIZED: (*FORBIDDEN, "The API key is not allowed to call this operation."),
    DenyReason.MISSING_ENVIRONMENT: (*UNAVAILABLE, "The service is not configured for this route."),
    DenyReason.ENVIRONMENT_MISMATCH: (*UNAVAILABLE, "The service is not configured for this route."),
    DenyReason.NOT_READY: (*UNAVAILABLE, "The service is starting; try again shortly."),
    DenyReason.INTERNAL_ERROR: (*UNAVAILABLE, "The request could not be authorized; try again."),
    DenyReason.AUTH_UNAVAILABLE: (*UNAVAILABLE, "The API key could not be checked; try again."),
    DenyReason.INVALID_CLAIMS: (*FORBIDDEN, "The token does not name an app and its API products."),
    DenyReason.INVALID_TOKEN: (*UNAUTHENTICATED, "The bearer token is not valid."),
    DenyReason.TOKEN_UNAVAILABLE: (*UNAVAILABLE, "The bearer token could not be checked; try again."),
    DenyReason.UNSAFE_PATH: (*BAD_REQUEST, "The request path has dot segments; send it normalised."),
    DenyReason.QUOTA_EXCEEDED: (*TOO_MANY, "The quota for this API product is used up; retry later."),
}

# RFC 6750 §3: a rejected bearer token is answered with a challenge.
_CHALLENGES: Final = {DenyReason.INVALID_TOKEN: (("www-authenticate", 'Bearer error="invalid_token"'),)}

REMOVED_PREFIXES = (PREFIX, FAILURE_MODE_HEADER)
MAX_KEYED_PATH = 1024
MAX_KEYED_REMOVED = 8
MAX_KEYED_TOKEN = 4096
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
JWT_AUTHN = "envoy.filters.http.jwt_authn"  # where jwt_authn's payload_in_metadata puts verified claims


def http_status(reason: DenyReason) -> int:
    return DENY_STATUS[reason][1]


def request_attrs(request: Any) -> RequestAttrs:
    """Extract what the decision needs. Pseudo-headers (``:authority``, ``:path``) are in the map."""
    attributes = request.attributes
    http = attributes.request.http
    headers = dict(http.headers)
    if not headers and len(http.header_map.headers):
        headers = _raw_headers(http.header_map)
    path, _, query = http.path.partition("?")
    return RequestAttrs(
        method=http.method,
        path=path,
        query=query,
        headers=headers,
        context_extensions=dict(attributes.context_extensions),
        jwt_metadata=_jwt_metadata(attributes),
    )


def _jwt_metadata(attributes: Any) -> dict[str, dict[str, Any]]:
    """Claims per jwt_authn provider, as plain dicts (numbers become floats, as in the Go adapter)."""
    namespaces = attributes.metadata_context.filter_metadata
    if JWT_AUTHN not in namespaces:
        return {}
    found = json_format.MessageToDict(namespaces[JWT_AUTHN])
    return {name: claims for name, claims in found.items() if isinstance(claims, dict)}


def decision_key(
    request: Any, policy: Policy, token_headers: tuple[str, ...] = ()
) -> tuple[str | None, ...] | None:
    """Everything ``decide`` reads from a CheckRequest, as a hashable key for the allow cache (see
    :func:`request_key`). None for a raw header map or jwt_authn claims (tokens change per request)."""
    attributes = request.attributes
    http = attributes.request.http
    headers = http.headers
    if not headers or JWT_AUTHN in attributes.metadata_context.filter_metadata:
        return None
    return request_key(http.method, http.path, headers, attributes.context_extensions, policy, token_headers)


def request_key(
    method: str,
    path: str,
    headers: Mapping[str, str],
    extensions: Mapping[str, str],
    policy: Policy,
    token_headers: tuple[str, ...],
) -> tuple[str | None, ...] | None:
    """The allow-cache key of a request, whatever its transport.

    None when the request would make a large key (long path, many spoofed headers, a huge token), which
    keeps the cache's memory bounded. The names of client-sent headers that an allow removes are part of
    the key, since they change the response, and so are the headers bearer tokens are read from.
    """
    if len(path) > MAX_KEYED_PATH:
        return None
    removed = [name for name in headers if name.startswith(REMOVED_PREFIXES)]
    if len(removed) > MAX_KEYED_REMOVED:
        return None
    tokens = [headers.get(name) for name in token_headers]  # bearer tokens decide too
    if any(token is not None and len(token) > MAX_KEYED_TOKEN for token in tokens):
        return None
    return (
        *tokens,
        method,
        path,
        headers.get(policy.api_key_header),
        headers.get(policy.api_header),
        extensions.get("apigee_api"),
        extensions.get("apigee_environment"),
        *removed,
    )


def _raw_headers(header_map: Any) -> dict[str, str]:
    """``encode_raw_headers: true`` sends each header line apart; join duplicates as Envoy does otherwise."""
    joined: dict[str, str] = {}
    for entry in header_map.headers:
        value = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
        name = entry.key.lower()
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


def deny_body(reason: DenyReason) -> str:
    """The JSON body a denied client gets: the message and the stable reason code."""
    return json.dumps({"error": DENY_STATUS[reason][2], "reason": reason.value})


def deny_headers(reason: DenyReason) -> tuple[tuple[str, str], ...]:
    """The headers a denied client gets with that body."""
    return (("content-type", "application/json"), *_CHALLENGES.get(reason, ()))


def _denied(reason: DenyReason) -> Any:
    grpc_code, status, _ = DENY_STATUS[reason]
    response = pb.CheckResponse()
    response.status.code = grpc_code
    response.status.message = reason.value
    denied = response.denied_response
    denied.status.code = status
    denied.body = deny_body(reason)
    for name, value in deny_headers(reason):
        header = denied.headers.add()
        header.header.key = name
        header.header.value = value
        header.append_action = _OVERWRITE
    return response


_DENIED: Final = {reason: _denied(reason) for reason in DenyReason}
_DENIED_WIRE: Final[dict[DenyReason, bytes]] = {
    reason: response.SerializeToString() for reason, response in _DENIED.items()
}


def denied_response(reason: DenyReason) -> bytes:
    """The prebuilt deny for a reason, in wire format."""
    return _DENIED_WIRE[reason]


def encode(decision: Decision) -> bytes:
    """The CheckResponse for a decision in wire format (the servicer returns bytes; grpc sends them as is)."""
    if not decision.allowed:
        assert decision.reason is not None  # allowed is False only with a reason
        return _DENIED_WIRE[decision.reason]
    data: bytes = check_response(decision).SerializeToString()
    return data


def check_response(decision: Decision) -> Any:
    """The CheckResponse for a decision: a constant deny, or an OK with header changes and metadata."""
    if not decision.allowed:
        assert decision.reason is not None  # allowed is False only with a reason
        return _DENIED[decision.reason]
    response = pb.CheckResponse()
    response.status.code = code_pb2.OK
    ok = response.ok_response
    for name, value in decision.headers_to_set:
        option = ok.headers.add()
        option.header.key = name
        option.header.value = value
        option.append_action = _OVERWRITE
    if decision.headers_to_remove:
        ok.headers_to_remove.extend(decision.headers_to_remove)
    if decision.query_params_to_remove:
        ok.query_parameters_to_remove.extend(decision.query_params_to_remove)
    if decision.metadata:
        fields = response.dynamic_metadata.fields
        for key, value in decision.metadata.items():
            fields[key].string_value = value
    return response


def request_time_ms(request: Any) -> int:
    """When Envoy received the request (``attributes.request.time``), epoch ms; 0 when absent."""
    stamp = request.attributes.request.time
    return int(stamp.seconds * 1000 + stamp.nanos // 1_000_000)


def request_uri(request: Any) -> str:
    """The request's path with its query string, as Envoy sent it."""
    path: str = request.attributes.request.http.path
    return path


def source_ip(request: Any) -> str:
    """The downstream peer's address (the client, or the last proxy before Envoy)."""
    address: str = request.attributes.source.address.socket_address.address
    return address


def rate_limit_headers(limit: int, remaining: int, reset: float, now: float) -> list[tuple[str, str]]:
    """``ratelimit-limit``, ``ratelimit-remaining`` and ``ratelimit-reset`` (whole seconds until the
    window ends, at least 1)."""
    seconds = str(max(math.ceil(reset - now), 1))
    return [
        ("ratelimit-limit", str(limit)),
        ("ratelimit-remaining", str(remaining)),
        ("ratelimit-reset", seconds),
    ]


def quota_exceeded(decision: Decision, limit: int, reset: float, now: float) -> bytes:
    """The 429 for a request over quota, with ``retry-after`` and the rate-limit headers; or, when
    ``allow_unauthorized`` let it through, its allow with the rate-limit headers for the client."""
    headers = rate_limit_headers(limit, 0, reset, now)
    if decision.allowed:
        return encode(decision) + _client_headers(headers)
    extra = pb.CheckResponse()
    denied = extra.denied_response.headers
    for name, value in [("retry-after", headers[2][1]), *headers]:
        _set(denied.add(), name, value)
    # Concatenated messages merge: the prebuilt 429 plus these headers (repeated fields append).
    data: bytes = extra.SerializeToString()
    return _DENIED_WIRE[DenyReason.QUOTA_EXCEEDED] + data


def with_quota_headers(response: bytes, limit: int, remaining: int, reset: float, now: float) -> bytes:
    """An allow plus the rate-limit headers on the response to the client (``auth.quota_headers``)."""
    return response + _client_headers(rate_limit_headers(limit, remaining, reset, now))


def _client_headers(headers: list[tuple[str, str]]) -> bytes:
    extra = pb.CheckResponse()
    added = extra.ok_response.response_headers_to_add
    for name, value in headers:
        _set(added.add(), name, value)
    data: bytes = extra.SerializeToString()
    return data


def _set(option: Any, name: str, value: str) -> None:
    option.header.key = name
    option.header.value = value
    option.append_action = _OVERWRITE


def metadata_struct(response: Any) -> dict[str, str]:
    """The string fields of a response's dynamic metadata (for tests and logs)."""
    struct: struct_pb2.Struct = response.dynamic_metadata
    return {k: v.string_value for k, v in struct.fields.items()}
