"""The gRPC edge over a fresh ``Checker``: ``grpc_servicer(catalog, policy, metrics, clock, **more)``."""

from __future__ import annotations

from typing import Any

from authz.server import codec
from authz.server.authorization import AuthorizationServicer
from authz.server.check import Checker


def grpc_servicer(*args: Any, **kwargs: Any) -> AuthorizationServicer:
    """``AuthorizationServicer`` over ``Checker(codec, *args, **kwargs)``."""
    return AuthorizationServicer(Checker(codec, *args, **kwargs))
