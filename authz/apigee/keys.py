"""ApiKeyCache: API keys verified with Apigee's ``/verifyApiKey``, cached (reference §3.2, §7).

A valid key stays cached ``cache_duration`` after its last successful verification, as in the Go adapter.
Once its token's ``exp`` passes, ``lookup`` still serves it (stale) and starts one background refresh;
a refresh that finds the key revoked removes it. Unlike the Go adapter: the token is verified against
the remote-token JWKS (``jwks.py``); only a real "invalid key" answer is cached as negative (transport
errors and bad tokens are not); and while Apigee fails, keys that are not cached get AUTH_UNAVAILABLE
without an HTTP call until a global, jittered retry time, so an outage cannot turn into a request storm.
Keys are held in memory only, never logged: under the GCP proxy ``client_id`` is the key itself, so it is
not logged either.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from authz.apigee.client import ApigeeClient
from authz.apigee.jwks import BadToken, RemoteTokenKeys
from authz.clock import Clock
from authz.decision.authorize import key_digest
from authz.decision.claims import product_list
from authz.decision.model import Credential, DenyReason
from authz.errors import ApigeeError, ApigeeUnavailable
from authz.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # global backoff after a failed call
JITTER = 0.1  # ±10 % on the global backoff
REFRESH_FIRST, REFRESH_MAX = 1.0, 60.0  # per stale key after a failed refresh
SWEEP_EVERY = 10.0  # drop expired entries at most this often (on the verify path)
_jitter = _random.random


def _products(value: Any) -> tuple[str, ...]:
    """``api_product_list``: a JSON array of names, a string holding one, or "a, b" (split and stripped)."""
    products = product_list(value)
    if products is None:
        raise BadToken("api_product_list is not a list of names")
    return products


def _text(claims: Mapping[str, Any], name: str, required: bool = False) -> str:
    value = claims.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise BadToken(f"{name}: expected a {'non-empty ' if required else ''}string")
    return value


def credential(api_key: str, claims: Mapping[str, Any]) -> Credential:
    """The Credential that a verified token's claims describe.

    Raises:
        BadToken: ``api_product_list``, ``client_id`` or ``application_name`` missing, or a claim of the
            wrong type.
    """
    if claims.get("api_product_list") is None:
        raise BadToken("api_product_list is missing")
    return Credential(
        key_sha256=key_digest(api_key),
        client_id=_text(claims, "client_id", required=True),
        app_name=_text(claims, "application_name", required=True),
        developer_email=_text(claims, "developer_email"),
        products=_products(claims["api_product_list"]),
        access_token=_text(claims, "access_token"),
        scopes=tuple(_text(claims, "scope").split()),
        custom_attributes=_text(claims, "custom_attributes"),
    )


@dataclass(slots=True)
class _Entry:
    credential: Credential
    fresh_until: float  # monotonic: the token's exp, or the end of cache_duration if sooner
    expires_at: float  # monotonic: end of cache_duration
    retry_at: float = float("-inf")  # no background refresh before this
    failures: int = 0  # refreshes failed in a row


class ApiKeyCache:
    def __init__(
        self, client: ApigeeClient, keys: RemoteTokenKeys, org: str, metrics: Metrics, clock: Clock,
        cache_duration: float = 1800.0, negative_ttl: float = 10.0, max_entries: int = 10_000,
        leeway: float = 10.0,
    ) -> None:  # fmt: skip
        self._client = client
        self._keys = keys
        self._clock = clock
        self._cache_duration = cache_duration
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._leeway = leeway
        # Keyed by the key itself: dict lookups hash it with per-process SipHash first, so timing cannot
        # reveal stored keys, and no digest is computed on the hot path.
        self._positive: OrderedDict[str, _Entry] = OrderedDict()
        self._negative: OrderedDict[str, float] = OrderedDict()  # key -> monotonic expiry
        self._inflight: dict[str, asyncio.Task[Credential | DenyReason]] = {}
        self._failures = 0  # failed calls in a row, for the global retry time
        self._retry_at = float("-inf")
        self._probing = False  # one call at a time tests Apigee once the retry time has passed
        self._swept_at = float("-inf")
        self._closed = False
        # Told the claims of every valid verification (the key index syncs the app early); never raises.
        self.on_valid: Callable[[Mapping[str, Any]], None] | None = None
        lookups, verifications = metrics.api_key_lookups, metrics.api_key_verifications
        self._hit, self._stale = lookups.labels(org, "hit"), lookups.labels(org, "stale")
        self._neg, self._miss = lookups.labels(org, "negative"), lookups.labels(org, "miss")
        self._outcomes = {r: verifications.labels(org, r) for r in ("valid", "invalid", "unavailable",
                                                                    "bad_token", "refused")}  # fmt: skip
        self._cached = metrics.credentials_cached.labels(org)

    def lookup(self, api_key: str) -> Credential | DenyReason | None:
        """The cached answer for a key (the same Credential object until replaced), or None on a miss.

        Must run on the event loop: a stale hit starts a background refresh.
        """
        entry = self._positive.get(api_key)
        if entry is not None:
            now = self._clock.monotonic()
            if now < entry.fresh_until:
                self._positive.move_to_end(api_key)
                self._hit.inc()
                return entry.credential
            if now < entry.expires_at:
                self._positive.move_to_end(api_key)
                self._stale.inc()
                if now >= entry.retry_at and api_key not in self._inflight and not self._closed:
                    self._start(api_key)
                return entry.credential
            del self._positive[api_key]
            self._cached.set(len(self._positive))
        expiry = self._negative.get(api_key)
        if expiry is not None:
            if self._clock.monotonic() < expiry:
                self._neg.inc()
                return DenyReason.UNKNOWN_KEY
            del self._negative[api_key]
        self._miss.inc()
        return None

    async def verify(self, api_key: str) -> Credential | DenyReason:
        """Verify with Apigee now, sharing a call in flight for the same key.

        Returns:
            The Credential; UNKNOWN_KEY when Apigee says the key is invalid; AUTH_UNAVAILABLE when the key
            could not be checked (a cached key's stale Credential instead, until its cache_duration ends);
            MALFORMED_CREDENTIALS, without a call, for a key that is not ASCII (it has no digest).
        """
        if not api_key.isascii():
            return DenyReason.MALFORMED_CREDENTIALS
        task = self._inflight.get(api_key)
        if task is None:
            if self._refusing() and api_key not in self._positive:
                self._outcomes["refused"].inc()
                return DenyReason.AUTH_UNAVAILABLE
            task = self._start(api_key)
        await asyncio.wait((task,))  # a cancelled caller leaves the shared call running
        return DenyReason.AUTH_UNAVAILABLE if task.cancelled() else task.result()

    def in_flight(self, api_key: str) -> bool:
        """Whether a verification of this key is under way (``verify`` would join it, not call again)."""
        return api_key in self._inflight

    async def drain(self) -> None:
        """Wait for the verifications and background refreshes in flight (for tests and shutdown)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def close(self) -> None:
        """Cancel and await the verifications and refreshes in flight."""
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, api_key: str) -> asyncio.Task[Credential | DenyReason]:
        task = asyncio.create_task(self._verify_once(api_key))
        self._inflight[api_key] = task
        task.add_done_callback(lambda done: self._forget(api_key, done))
        return task

    def _forget(self, api_key: str, task: asyncio.Task[Credential | DenyReason]) -> None:
        if self._inflight.get(api_key) is task:
            del self._inflight[api_key]

    def _refusing(self) -> bool:
        return self._failures > 0 and (self._probing or self._clock.monotonic() < self._retry_at)

    async def _verify_once(self, api_key: str) -> Credential | DenyReason:
        hint: float | None = None  # Apigee's Retry-After, if it sent one
        try:
            if self._refusing():
                result = "refused"
            else:
                probe = self._failures > 0  # after the retry time, one call tests whether Apigee is back
                self._probing = self._probing or probe
                try:
                    response = await self._client.verify_api_key(api_key)
                finally:
                    if probe:
                        self._probing = False
                if response.token is None:
                    self._failures = 0
                    self._outcomes["invalid"].inc()
                    return self._set_negative(api_key)
                claims = await self._keys.decode(response.token, self._leeway)
                found = credential(api_key, claims)
                self._failures = 0
                self._outcomes["valid"].inc()
                if self.on_valid is not None:
                    self.on_valid(claims)
                return self._set_positive(api_key, found, claims["exp"] - self._clock.now())
        except ApigeeError as exc:
            result = "unavailable"
            hint = exc.retry_after if isinstance(exc, ApigeeUnavailable) else None
            log.warning("verifyApiKey failed: %s", exc)
        except BadToken as exc:
            result = "bad_token"
            log.error("verifyApiKey returned a token that does not verify: %s", exc)
        except Exception:
            result = "unavailable"
            log.exception("verifyApiKey failed unexpectedly")
        if result != "refused":
            self._failures += 1
            delay = min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(self._failures - 1, 32))
            delay *= 1 + JITTER * (2 * _jitter() - 1)
            self._retry_at = self._clock.monotonic() + max(delay, min(hint or 0.0, RETRY_MAX))
        self._outcomes[result].inc()
        return self._keep_stale(api_key)

    def _keep_stale(self, api_key: str) -> Credential | DenyReason:
        entry = self._positive.get(api_key)
        now = self._clock.monotonic()
        if entry is None or now >= entry.expires_at:
            return DenyReason.AUTH_UNAVAILABLE
        entry.failures += 1
        entry.retry_at = now + min(REFRESH_MAX, REFRESH_FIRST * 2.0 ** min(entry.failures - 1, 32))
        return entry.credential

    def _set_positive(self, api_key: str, credential: Credential, lifetime: float) -> Credential:
        now = self._clock.monotonic()
        self._sweep(now)
        old = self._positive.pop(api_key, None)
        if old is not None and old.credential == credential:
            credential = old.credential  # unchanged claims: callers may keep what they built from it
        expires_at = now + self._cache_duration
        self._positive[api_key] = _Entry(credential, min(now + lifetime, expires_at), expires_at)
        while len(self._positive) > self._max_entries:
            self._positive.popitem(last=False)
        self._negative.pop(api_key, None)
        self._cached.set(len(self._positive))
        return credential

    def _set_negative(self, api_key: str) -> DenyReason:
        now = self._clock.monotonic()
        self._sweep(now)
        if self._positive.pop(api_key, None) is not None:
            self._cached.set(len(self._positive))
        self._negative.pop(api_key, None)
        self._negative[api_key] = now + self._negative_ttl
        while len(self._negative) > self._max_entries:
            self._negative.popitem(last=False)
        return DenyReason.UNKNOWN_KEY

    def _sweep(self, now: float) -> None:
        """Drop expired entries, so memory and ``credentials_cached`` track live keys. O(n), every 10 s."""
        if now - self._swept_at < SWEEP_EVERY:
            return
        self._swept_at = now
        for key in [k for k, e in self._positive.items() if now >= e.expires_at]:
            del self._positive[key]
        for key in [k for k, expiry in self._negative.items() if now >= expiry]:
            del self._negative[key]
        self._cached.set(len(self._positive))
