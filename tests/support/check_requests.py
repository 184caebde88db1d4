"""CheckRequests as Envoy sends them, for tests that talk to the servicer over gRPC."""

from __future__ import annotations

import json
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2

from authz.server import codec


def check_request(
    path: str = "/v1/orders/1",
    method: str = "GET",
    key: str | None = None,
    api: str = "orders-api",
    headers: dict[str, str] | None = None,
    ext: dict[str, str] | None = None,
    claims: dict[str, Any] | None = None,
    provider: str = "apigee",
) -> Any:
    """A CheckRequest; ``claims`` become jwt_authn metadata under ``provider``."""
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path = method, path
    http.headers[":authority"] = api
    if key is not None:
        http.headers["x-api-key"] = key
    http.headers.update(headers or {})
    req.attributes.context_extensions.update(ext or {})
    if claims is not None:
        struct = struct_pb2.Struct()
        struct.update({provider: claims})
        req.attributes.metadata_context.filter_metadata[codec.JWT_AUTHN].CopyFrom(struct)
    return req


def outcome(response: Any) -> tuple[int, str]:
    """(200, "") for an allow, else (HTTP status, reason) of the deny."""
    if response.status.code == 0:
        return 200, ""
    return response.denied_response.status.code, json.loads(response.denied_response.body)["reason"]
