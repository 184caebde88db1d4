"""The check flow both edges share: allow cache -> key/token verification -> decide -> quota -> record.

Transport-neutral: an edge (the gRPC servicer, the HTTP check port) hands ``Checker.check`` its request
and a ``Codec`` that reads that request and writes the answer in its wire format (``codec`` for gRPC,
``http_codec`` for HTTP). No decision logic lives in an edge.

No exception leaves ``check``: anything unexpected is answered with an explicit 503 deny and counted. The
request path does no I/O: the catalog is an in-memory snapshot and metrics are in-process counters. In
Apigee mode the one exception is an API key that is not cached yet: ``check`` waits
(``auth.api_key_verify_wait``) for its ``/verifyApiKey`` answer; past that it answers 503 while the call goes
on and fills the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from authz import logs
from authz.analytics.record import denied, first_forwarded_for, to_json_line
from authz.clock import Clock
from authz.decision.authorize import decide, over_quota, requested_key
from authz.decision.model import (
    AuthContext,
    AuthorizedOperation,
    Catalog,
    Credential,
    Decision,
    DenyReason,
    Policy,
    RequestAttrs,
)
from authz.metrics import Metrics
from authz.server.codec import http_status

if TYPE_CHECKING:
    from authz.jwt.verifier import Verified
    from authz.quota.manager import QuotaManager, QuotaResult

log = logging.getLogger(__name__)
T = TypeVar("T")

_INTERNAL = Decision(reason=DenyReason.INTERNAL_ERROR)
# Allows are cached per request shape (key, API, method, path with query, removed header names): most
# traffic repeats, and building an allow is most of the per-request Python time. Bounded; emptied whole
# when full or when the catalog snapshot changes. Denies are constants already and are never cached, so
# random keys cannot churn the cache.
ALLOW_CACHE_SIZE = 10_000
_FOREVER = float("inf")
DEFAULT_VERIFY_WAIT = 0.8  # auth.api_key_verify_wait: keep it below Envoy's ext_authz timeout


class Codec(Protocol):
    """One transport's request reader and answer writer (a module: ``codec`` or ``http_codec``).

    Answers are wire bytes, built once per request shape: denies are prebuilt per reason and allows are
    cached, so a repeated request is answered without encoding anything.
    """

    def decision_key(
        self, request: Any, policy: Policy, token_headers: tuple[str, ...] = ()
    ) -> tuple[str | None, ...] | None: ...

    def request_attrs(self, request: Any) -> RequestAttrs: ...

    def request_uri(self, request: Any) -> str: ...

    def request_time_ms(self, request: Any) -> int: ...

    def source_ip(self, request: Any) -> str: ...

    def encode(self, decision: Decision) -> bytes: ...

    def denied_response(self, reason: DenyReason) -> bytes: ...

    def quota_exceeded(self, decision: Decision, limit: int, reset: float, now: float) -> bytes: ...

    def with_quota_headers(
        self, response: bytes, limit: int, remaining: int, reset: float, now: float
    ) -> bytes: ...


class KeySource(Protocol):
    """API keys verified elsewhere (Apigee mode): a cheap synchronous lookup and a slow verification."""

    def lookup(self, api_key: str) -> Credential | DenyReason | None: ...

    async def verify(self, api_key: str) -> Credential | DenyReason: ...


class TokenSource(Protocol):
    """Bearer tokens the service verifies itself: where they are, a cheap lookup, a slow verification."""

    @property
    def headers(self) -> tuple[str, ...]: ...

    def find(self, headers: Mapping[str, str]) -> str | None: ...

    def lookup(self, token: str) -> Verified | DenyReason | None: ...

    def check_now(self, token: str) -> tuple[Verified | DenyReason | None, bool]: ...

    async def verify(self, token: str) -> Verified | DenyReason: ...


class RecordSink(Protocol):
    """Where analytics records go (the durable buffer): never blocks, False when it cannot take one."""

    def put(self, tenant: tuple[str, str], line: bytes) -> bool: ...


class _Allow(NamedTuple):
    response: bytes
    decision: Decision
    valid_until: float
    api_key: str | None  # with a KeySource: the key whose credential this allow stands on
    credential: Credential | None
    quota_ops: tuple[AuthorizedOperation, ...]  # the operations that carry a quota, charged on every hit


def _answer(found: Credential | DenyReason) -> Callable[[str], Credential | DenyReason]:
    return lambda _key: found


class Checker:
    """The check flow over one transport's codec; one per edge (each caches its own wire answers)."""

    def __init__(
        self,
        codec: Codec,
        catalog: Callable[[], Catalog | None],
        policy: Policy,
        metrics: Metrics,
        clock: Clock,
        keys: KeySource | None = None,
        verify_wait: float = DEFAULT_VERIFY_WAIT,
        tokens: TokenSource | None = None,
        quotas: QuotaManager | None = None,
        quota_headers: bool = False,
        analytics: RecordSink | None = None,
    ) -> None:
        self._codec = codec
        self._catalog = catalog
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._keys = keys
        self._tokens = tokens
        self._token_headers = tokens.headers if tokens is not None else ()
        self._verify_wait = verify_wait
        self._quotas = quotas
        self._quota_headers = quota_headers
        self._analytics = analytics
        self._observers: dict[tuple[str, int], Any] = {}
        self._allows: dict[tuple[str | None, ...], _Allow] = {}
        self._allows_catalog: Catalog | None = None

    def check_now(self, request: Any) -> bytes | None:
        """The answer when it needs no await: an allow-cache hit whose quota buckets, if any, are in
        memory (most traffic). None: await ``check`` instead. An edge that can answer at once saves a task.
        """
        started = time.perf_counter()
        attrs = None
        try:
            catalog = self._catalog()
            if catalog is not self._allows_catalog:
                self._allows.clear()
                self._allows_catalog = catalog
            now = self._clock.now()
            key = self._codec.decision_key(request, self._policy, self._token_headers)
            hit = self._allows.get(key) if key is not None else None
            if hit is None or now >= hit.valid_until or not self._still_valid(hit):
                return None
            response, decision = hit.response, hit.decision
            if hit.quota_ops and self._quotas is not None and decision.reason is None:
                charged = self._quotas.charge_now(hit.quota_ops, decision.environment)
                if charged is None:  # a bucket waits for its sync with Apigee
                    return None
                if not charged.allowed or self._quota_headers:
                    decision, response = self._quota_answer(decision, response, charged, now)
                if not charged.allowed:
                    attrs = self._codec.request_attrs(request)  # for the deny log and record
        except Exception:
            decision, response = self._failed()
        self._finish(request, decision, attrs, started)
        return response

    async def check(self, request: Any) -> bytes:
        """Answer one request (the edge's own type) with the answer in the edge's wire format."""
        answer = self.check_now(request)
        if answer is not None:
            return answer
        codec = self._codec
        started = time.perf_counter()
        attrs = None
        try:
            catalog = self._catalog()
            now = self._clock.now()
            key = codec.decision_key(request, self._policy, self._token_headers)
            hit = self._allows.get(key) if key is not None else None
            if hit is not None and now < hit.valid_until and self._still_valid(hit):
                response, decision, quota_ops = hit.response, hit.decision, hit.quota_ops
            else:
                attrs = codec.request_attrs(request)
                api_key, found = await self._verified_key(attrs, catalog)
                bearer, bearer_until, seen = await self._verified_token(attrs, catalog)
                lookup = None if found is None else _answer(found)
                decision = decide(attrs, catalog, self._policy, now, lookup, bearer)
                response = codec.encode(decision)
                quota_ops = tuple(op for op in decision.operations if op.quota_id)
                # A token seen for the first time is usually seen only once: no allow entry for it.
                if key is not None and decision.reason is None and seen:
                    if len(self._allows) >= ALLOW_CACHE_SIZE:
                        self._allows.clear()
                    credential = found if isinstance(found, Credential) else None
                    valid_until = min(decision.valid_until or _FOREVER, bearer_until)
                    entry = _Allow(response, decision, valid_until, api_key, credential, quota_ops)
                    self._allows[key] = entry
            if quota_ops and self._quotas is not None and decision.reason is None:
                charged = self._quotas.charge_now(quota_ops, decision.environment)
                if charged is None:  # a bucket waits for its sync with Apigee
                    charged = await self._quotas.charge(quota_ops, decision.environment)
                if not charged.allowed or self._quota_headers:
                    decision, response = self._quota_answer(decision, response, charged, now)
                if not charged.allowed and attrs is None:
                    attrs = codec.request_attrs(request)  # an allow-cache hit: read it for the deny log
        except Exception:
            decision, response = self._failed()
        self._finish(request, decision, attrs, started)
        return response

    def _failed(self) -> tuple[Decision, bytes]:
        # Never log the request here: it may carry a credential.
        log.exception("Check failed; answering 503")
        self._metrics.auth_check_errors.labels(self._policy.org).inc()
        return _INTERNAL, self._codec.denied_response(DenyReason.INTERNAL_ERROR)

    def _finish(self, request: Any, decision: Decision, attrs: RequestAttrs | None, started: float) -> None:
        try:
            self._record(decision, attrs, time.perf_counter() - started)
            if self._analytics is not None and not decision.allowed and attrs is not None:
                self._deny_record(decision, attrs, request)
        except Exception:  # metrics, logs or analytics must never change the answer
            log.exception("recording the Check outcome failed")

    def _deny_record(self, decision: Decision, attrs: Any, request: Any) -> None:
        """The analytics record of a deny (Envoy's access log carries no ext_authz metadata for it).
        Only for a request that named an API in a known environment, as in the Go adapter."""
        assert self._analytics is not None and decision.reason is not None
        env = decision.environment or ("" if self._policy.multi_tenant else self._policy.env)
        if not decision.api or not env:
            return
        auth = decision.auth
        client_ip = first_forwarded_for(attrs.headers.get("x-forwarded-for", "")) or self._codec.source_ip(
            request
        )
        record = denied(
            flow_id=str(uuid.uuid4()),
            org=self._policy.org,
            env=env,
            api=decision.api,
            request_ms=self._codec.request_time_ms(request) or int(self._clock.now() * 1000),
            method=attrs.method,
            path=self._codec.request_uri(request),
            user_agent=attrs.headers.get("user-agent", ""),
            client_ip=client_ip,
            status=http_status(decision.reason),
            developer_email=auth.developer_email if auth is not None else "",
            app=auth.app_name if auth is not None else "",
            client_id=auth.client_id if auth is not None else "",
            api_product=decision.operations[0].product if decision.operations else "",
        )
        self._metrics.analytics_records.labels(self._policy.org, env, "received").inc()
        self._analytics.put((self._policy.org, env), to_json_line(record))

    def _quota_answer(
        self, decision: Decision, response: bytes, charged: QuotaResult, now: float
    ) -> tuple[Decision, bytes]:
        """A 429 when a quota has no room left; otherwise the allow with the rate-limit headers."""
        if not charged.allowed:
            decision = over_quota(decision, self._policy)
            return decision, self._codec.quota_exceeded(decision, charged.limit, charged.reset, now)
        limit, remaining, reset = charged.limit, charged.remaining, charged.reset
        if limit:
            response = self._codec.with_quota_headers(response, limit, remaining, reset, now)
        return decision, response

    def _still_valid(self, hit: _Allow) -> bool:
        """An allow that stands on a verified key holds while the key cache returns that same credential."""
        return hit.api_key is None or self._keys is None or self._keys.lookup(hit.api_key) is hit.credential

    async def _verified_key(
        self, attrs: Any, catalog: Catalog | None
    ) -> tuple[str | None, Credential | DenyReason | None]:
        """With a KeySource, the request's API key and what it stands for (verifying it if not cached)."""
        if self._keys is None or catalog is None:
            return None, None
        api_key = requested_key(attrs, self._policy)
        if not isinstance(api_key, str):
            return None, None
        found = self._keys.lookup(api_key)
        if found is None:
            found = await self._bounded(self._keys.verify(api_key), DenyReason.AUTH_UNAVAILABLE)
        return api_key, found

    async def _bounded(self, verification: Awaitable[T], late: DenyReason) -> T | DenyReason:
        """Wait at most ``verify_wait``; past it answer ``late`` while the call goes on (single flight) and
        fills its cache for the next request."""
        pending = asyncio.ensure_future(verification)
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self._verify_wait)
        except TimeoutError:
            return late

    async def _verified_token(
        self, attrs: Any, catalog: Catalog | None
    ) -> tuple[AuthContext | DenyReason | None, float, bool]:
        """With token providers, the caller a bearer token names (or why it fails), until when, and
        whether the token was seen before (its answer came from the cache)."""
        if self._tokens is None or catalog is None:
            return None, _FOREVER, True
        token = self._tokens.find(attrs.headers)
        if token is None:
            return None, _FOREVER, True
        found, seen = self._tokens.check_now(token)  # no await when the issuer's keys are in memory
        if found is None:
            found = await self._bounded(self._tokens.verify(token), DenyReason.TOKEN_UNAVAILABLE)
        if isinstance(found, DenyReason):
            return found, _FOREVER, seen
        return found.auth, found.valid_until, seen

    def _record(self, decision: Decision, attrs: Any, elapsed: float) -> None:
        env = decision.environment or self._policy.env
        code = 200 if decision.reason is None else http_status(decision.reason)
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
