"""AuthorizationServicer.Check: codec -> decide -> codec, behind the one error boundary.

No exception leaves Check: an exception reaching grpc becomes an Envoy error, which fails open under
``failure_mode_allow``. Anything unexpected is answered with an explicit 503 deny and counted. The request
path does no I/O: the catalog is an in-memory snapshot and metrics are in-process counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz import logs
from authz.clock import Clock
from authz.decision.authorize import decide
from authz.decision.model import Catalog, Decision, DenyReason, Policy
from authz.metrics import Metrics
from authz.server import codec

log = logging.getLogger(__name__)

_INTERNAL = Decision(reason=DenyReason.INTERNAL_ERROR)
# Allows are cached per request shape (key, API, method, path with query, removed header names): most
# traffic repeats, and building an allow is most of the per-request Python time. Bounded; emptied whole
# when full or when the catalog snapshot changes. Denies are constants already and are never cached, so
# random keys cannot churn the cache.
ALLOW_CACHE_SIZE = 10_000
_FOREVER = float("inf")


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self, catalog: Callable[[], Catalog | None], policy: Policy, metrics: Metrics, clock: Clock
    ) -> None:
        self._catalog = catalog
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._observers: dict[tuple[str, int], Any] = {}
        self._allows: dict[tuple[str | None, ...], tuple[bytes, Decision, float]] = {}
        self._allows_catalog: Catalog | None = None

    async def Check(self, request: Any, context: Any) -> bytes:  # noqa: N802 (gRPC method name)
        """Answer one CheckRequest with a serialized CheckResponse (see ``add_to_server``)."""
        started = time.perf_counter()
        attrs = None
        try:
            catalog = self._catalog()
            if catalog is not self._allows_catalog:
                self._allows.clear()
                self._allows_catalog = catalog
            now = self._clock.now()
            key = codec.decision_key(request, self._policy)
            hit = self._allows.get(key) if key is not None else None
            if hit is not None and now < hit[2]:
                response, decision, _ = hit
            else:
                attrs = codec.request_attrs(request)
                decision = decide(attrs, catalog, self._policy, now)
                response = codec.encode(decision)
                if key is not None and decision.reason is None:
                    if len(self._allows) >= ALLOW_CACHE_SIZE:
                        self._allows.clear()
                    self._allows[key] = (response, decision, decision.valid_until or _FOREVER)
        except Exception:
            # Never log the request here: it may carry a credential.
            log.exception("Check failed; answering 503")
            self._metrics.auth_check_errors.labels(self._policy.org).inc()
            decision, response = _INTERNAL, codec.denied_response(DenyReason.INTERNAL_ERROR)
        try:
            self._record(decision, attrs, time.perf_counter() - started)
        except Exception:  # metrics or logging must never change the answer
            log.exception("recording the Check outcome failed")
        return response

    def _record(self, decision: Decision, attrs: Any, elapsed: float) -> None:
        env = decision.environment or self._policy.env
        code = 200 if decision.reason is None else codec.http_status(decision.reason)
        observer = self._observers.get((env, code))
        if observer is None:
            observer = self._metrics.auth_requests.labels(self._policy.org, env, str(code))
            self._observers[(env, code)] = observer
        observer.observe(elapsed)
        if decision.reason is None:
            return
        reason = decision.reason.value
        if decision.fail_open:
            self._metrics.auth_allowed_unauthorized.labels(self._policy.org, env, reason).inc()
        else:
            self._metrics.auth_denied.labels(self._policy.org, env, str(code), reason).inc()
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s: %s %s api=%s path=%s request_id=%s",
                "allowed unauthorized" if decision.fail_open else "denied",
                reason,
                attrs.method if attrs else "-",
                decision.api or "-",
                attrs.path[:200] if attrs else "-",
                attrs.headers.get("x-request-id", "-") if attrs else "-",
            )
        if attrs is not None and log.isEnabledFor(logging.DEBUG):
            secret = frozenset({self._policy.api_key_header})
            log.debug("denied request headers: %s", logs.redact(attrs.headers, secret))


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
