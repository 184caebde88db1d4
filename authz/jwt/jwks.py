"""JwksCache: one issuer's JSON Web Key Set, cached in memory and refreshed in the background.

Only RSA and EC signing keys are kept, each pinned to one algorithm (its ``alg``, else the one its kty/crv
implies: RS256 for RSA), so a token's header can never choose HMAC or ``none`` (reliability.md J01-J04,
J25). Key material comes only from the configured source, never from a token header (J08, J09). A fetch
that fails or yields no usable key keeps the last good set (J27). An unknown kid triggers at most one
refetch per ``unknown_kid_cooldown``, shared by every concurrent caller (J07); after a failed fetch the
wait is ``RETRY_AFTER_FAILURE`` (Envoy's ``failed_refetch_duration``). A kid reused with new key material
takes effect at the next refresh (J26). The document comes from an injected ``fetch``; this module does
no I/O of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from authz.clock import Clock
from authz.errors import ApigeeError
from authz.jwt.fetch import FetchError
from authz.metrics import Metrics

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
MIN_RSA_BITS = 2048  # RFC 7518 §3.3
MAX_KEYS = 100  # more than any rotation needs; bounds the work per fetch
JITTER = 0.1  # ±10 % on each wait so replicas do not fetch in step
# After a failed fetch (the issuer was down), a token whose kid we lack may refetch after this long, and the
# background loop retries this often: one fetch a second at most, and recovery within a second or two.
RETRY_AFTER_FAILURE = 1.0
_jitter = _random.random


class JWKSError(ValueError):
    """A JWKS document without one usable key."""


EXPECTED_ERRORS = (ApigeeError, JWKSError, FetchError)  # a failed fetch that needs no traceback in the log


def _usable(raw: Any) -> jwt.PyJWK | str:
    """The key pinned to its algorithm, or why it is skipped."""
    if not isinstance(raw, dict):
        return "not an object"
    if raw.get("kty") not in ("RSA", "EC"):
        return f"kty {raw.get('kty')!r} is not RSA or EC"
    if raw.get("use", "sig") != "sig":
        return f"use {raw.get('use')!r}"
    if "alg" in raw and not (isinstance(raw["alg"], str) and raw["alg"] in ALLOWED_ALGORITHMS):
        return f"alg {raw['alg']!r} is not allowed"
    if not isinstance(raw.get("kid", ""), str):
        return "kid is not a string"
    try:
        key = jwt.PyJWK(raw)
    except Exception as exc:  # whatever a malformed key makes PyJWT raise, only this key is skipped
        return f"unreadable: {exc}"
    public = key.key
    if isinstance(public, RSAPublicKey):
        if not key.algorithm_name.startswith(("RS", "PS")):
            return f"alg {key.algorithm_name} does not fit an RSA key"
        if public.key_size < MIN_RSA_BITS:
            return f"RSA key of {public.key_size} bits"
    elif isinstance(public, EllipticCurvePublicKey):
        if CURVE_ALGORITHMS.get(raw.get("crv", "")) != key.algorithm_name:
            return f"alg {key.algorithm_name} does not fit curve {raw.get('crv')!r}"
    else:
        return "not a public key"  # for example a JWK with private parts
    return key


def parse_jwks(document: Mapping[str, Any]) -> list[jwt.PyJWK]:
    """The usable keys of a JWKS document, in order; unusable ones are skipped one by one (J25).

    Raises:
        JWKSError: no ``keys`` list, more than ``MAX_KEYS`` keys, or no usable key.
    """
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, list):
        raise JWKSError('not {"keys": [...]}')
    if len(raw_keys) > MAX_KEYS:
        raise JWKSError(f"{len(raw_keys)} keys, more than {MAX_KEYS}")
    keys: list[jwt.PyJWK] = []
    for raw in raw_keys:
        found = _usable(raw)
        kid = raw.get("kid") if isinstance(raw, dict) else None
        if isinstance(found, str):
            log.debug("JWKS key %r skipped: %s", kid, found)
        elif kid is not None and any(k.key_id == kid for k in keys):
            log.debug("JWKS key %r skipped: the kid is listed twice", kid)
        else:
            keys.append(found)
    if not keys:
        raise JWKSError("no usable key")
    return keys


class JwksCache:
    """The keys of one provider; ``fetch`` returns the JWKS document (a dict) or raises."""

    def __init__(
        self, fetch: Callable[[], Awaitable[Any]], org: str, provider: str, metrics: Metrics, clock: Clock,
        refresh_interval: float = 300.0, unknown_kid_cooldown: float = 30.0,
    ) -> None:  # fmt: skip
        self._fetch_document = fetch
        self._provider = provider
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._cooldown = unknown_kid_cooldown
        self._ok = metrics.jwks_refreshes.labels(org, provider, "ok")
        self._error = metrics.jwks_refreshes.labels(org, provider, "error")
        self._by_kid: dict[str, jwt.PyJWK] = {}
        self._sole: jwt.PyJWK | None = None
        self._count = 0
        self._fetched_at = float("-inf")  # monotonic start of the last fetch, good or not
        self._last_ok = False  # after a failed fetch, unknown kids may retry sooner (RETRY_AFTER_FAILURE)
        self._inflight: asyncio.Task[bool] | None = None
        self._stopped = asyncio.Event()

    @property
    def loaded(self) -> bool:
        """True once a good key set has been installed: a miss then means a bad token, not "no keys"."""
        return self._count > 0

    def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for ``kid``; a token without kid gets the only key of a one-key set. No I/O."""
        return self._sole if kid is None else self._by_kid.get(kid)

    async def key_for(self, kid: str | None) -> jwt.PyJWK | None:
        """Like ``key``, but a miss refetches first, at most once per cooldown (joining a fetch in flight)."""
        key = self.key(kid)
        if key is not None:
            return key
        cooldown = self._cooldown if self._last_ok else min(self._cooldown, RETRY_AFTER_FAILURE)
        if self._inflight is None and self._clock.monotonic() - self._fetched_at < cooldown:
            return None
        await self.refresh()
        return self.key(kid)

    async def refresh(self) -> bool:
        """Fetch now, or join the fetch in flight. False on any failure; the last good keys stay."""
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.create_task(self._fetch())
            task.add_done_callback(self._forget)
        await asyncio.wait((task,))  # a cancelled caller leaves the shared fetch running
        return not task.cancelled() and task.result()

    def _forget(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self) -> bool:
        self._fetched_at = self._clock.monotonic()
        try:
            document = await self._fetch_document()
            if not isinstance(document, Mapping):
                raise JWKSError("the document is not a JSON object")
            keys = parse_jwks(document)
        except Exception as exc:
            self._last_ok = False
            self._error.inc()
            log.warning(
                "JWKS of %s: fetch failed, keeping %d keys: %s", self._provider, self._count, exc,
                exc_info=not isinstance(exc, EXPECTED_ERRORS),  # a traceback only for a bug
            )  # fmt: skip
            return False
        self._by_kid = {k.key_id: k for k in keys if k.key_id is not None}
        self._sole = keys[0] if len(keys) == 1 else None
        self._count = len(keys)
        self._last_ok = True
        self._ok.inc()
        log.debug("JWKS of %s loaded: %d keys", self._provider, len(keys))
        return True

    async def run(self) -> None:
        """Fetch now, then every ``refresh_interval`` (after a failure, every second) until ``stop()``."""
        fresh = self._last_ok  # a fetch at start-up counts as the first one
        while not self._stopped.is_set():
            ok = True if fresh else await self.refresh()
            fresh = False
            delay = self._refresh_interval if ok else min(self._refresh_interval, RETRY_AFTER_FAILURE)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * (1 + JITTER * (2 * _jitter() - 1))):
                    await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        """Stop and abandon a fetch in flight."""
        self.stop()
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
