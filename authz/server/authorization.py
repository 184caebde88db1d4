"""AuthorizationServicer.Check: the gRPC edge of the check flow (``check.Checker`` over ``codec``).

``Check`` returns the CheckResponse in wire format; ``add_to_server`` registers it with a pass-through
serializer, so prebuilt denies and cached allows are sent as they are.
"""

from __future__ import annotations

from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz.server.check import Checker


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.check = checker.check

    async def Check(self, request: Any, context: Any) -> bytes:  # noqa: N802 (gRPC method name)
        """Answer one CheckRequest with a serialized CheckResponse (see ``add_to_server``)."""
        return await self.check(request)


def add_to_server(servicer: AuthorizationServicer, server: grpc.aio.Server) -> None:
    """Register Check with a pass-through response serializer: it returns wire bytes, so prebuilt
    denies and cached allows are sent without re-serializing."""
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=None,
        )
    }
    name = "envoy.service.auth.v3.Authorization"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
