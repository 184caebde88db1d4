"""BearerTokens: find a request's bearer token, verify it against its issuer's keys, cache the answer.

A token is verified once (signature and claims, by ``authz.jwt.validate``) and then served from a bounded
cache keyed by its SHA-256 until it expires, so a JWT costs about what an API key costs. Tokens that fail
are remembered briefly, so a client repeating a bad token does not cost a signature check each time. The
issuer named in the (unverified) payload only picks which provider's rules and keys apply.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from authz.clock import Clock
from authz.config_providers import JwtProvider
from authz.decision.claims import product_list
from authz.decision.model import AuthContext, DenyReason
from authz.jwt.jwks import JwksCache
from authz.jwt.validate import InvalidToken, Parsed, Rules, check, check_header, parse
from authz.metrics import Metrics

log = logging.getLogger(__name__)

NEGATIVE_TTL = 10.0  # seconds a failed token is answered from memory
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Verified:
    """A token that verified: who calls, and until when the answer holds (epoch seconds)."""

    auth: AuthContext
    valid_until: float


@dataclass(frozen=True)
class Provider:
    config: JwtProvider
    rules: Rules
    keys: JwksCache


def auth_from_claims(provider: JwtProvider, claims: Mapping[str, Any]) -> AuthContext:
    """The caller as the provider's claim names describe it; a missing product claim grants the provider's
    fixed ``products`` (often none)."""
    names = provider.claims

    def text(name: str) -> str:
        value = claims.get(name)
        return value if isinstance(value, str) else ""

    products = product_list(claims.get(names.products)) if names.products in claims else None
    return AuthContext(
        client_id=text(names.client_id) or text("sub"),
        app_name=text(names.application),
        developer_email=text(names.developer_email),
        products=products if products is not None else provider.products,
        access_token=text(names.access_token),
        scopes=tuple(text(names.scope).split()),
    )


class BearerTokens:
    def __init__(self, providers: Sequence[Provider], org: str, metrics: Metrics, clock: Clock) -> None:
        self._by_issuer = {p.config.issuer: p for p in providers}
        self._sources = tuple(dict.fromkeys((p.config.header, p.config.prefix.lower()) for p in providers))
        self._max_bytes = max((p.rules.max_token_bytes for p in providers), default=0)
        self._clock = clock
        self._org = org
        self._metrics = metrics
        self._good: OrderedDict[bytes, Verified] = OrderedDict()
        self._bad: OrderedDict[bytes, tuple[DenyReason, float]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Verified | DenyReason]] = {}
        self._counters: dict[tuple[str, str], Any] = {}

    @property
    def headers(self) -> tuple[str, ...]:
        """The header names tokens are read from (they key the servicer's allow cache)."""
        return tuple(dict.fromkeys(name for name, _ in self._sources))

    def find(self, headers: Mapping[str, str]) -> str | None:
        """The request's bearer token, if a provider's header carries one with its prefix."""
        for name, prefix in self._sources:
            value = headers.get(name)
            if value is not None and value[: len(prefix)].lower() == prefix:
                token = value[len(prefix) :].strip()
                if token:
                    return token
        return None

    def lookup(self, token: str) -> Verified | DenyReason | None:
        """The cached answer for ``token``, or None when it must be verified. No I/O."""
        return self._cached(self._digest(token))

    def check_now(self, token: str) -> tuple[Verified | DenyReason | None, bool]:
        """The cached answer, else a verification without waiting when the issuer's key is in memory;
        None when keys must be fetched (then await ``verify``). The flag says the answer was cached."""
        digest = self._digest(token)
        cached = self._cached(digest)
        if cached is not None:
            return cached, True
        return self._run(token, digest, None, fetched_keys=False), False

    def _cached(self, digest: bytes) -> Verified | DenyReason | None:
        now = self._clock.now()
        good = self._good.get(digest)
        if good is not None:
            if now < good.valid_until:
                return good
            del self._good[digest]
        bad = self._bad.get(digest)
        if bad is not None:
            if now < bad[1]:
                return bad[0]
            del self._bad[digest]
        return None

    async def verify(self, token: str) -> Verified | DenyReason:
        """Verify and cache, fetching the issuer's keys if needed; concurrent calls for one token share one
        verification (single flight)."""
        digest = self._digest(token)
        task = self._inflight.get(digest)
        if task is None:
            task = self._inflight[digest] = asyncio.ensure_future(self._verify(token, digest))
            task.add_done_callback(lambda _: self._inflight.pop(digest, None))
        return await asyncio.shield(task)

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    async def _verify(self, token: str, digest: bytes) -> Verified | DenyReason:
        found = self._run(token, digest, None, fetched_keys=False)
        if found is not None:
            return found
        try:  # _run just parsed this token and passed these checks: only the key was missing
            parsed = parse(token, self._max_bytes)
            provider = self._provider(parsed)
            key = await provider.keys.key_for(check_header(parsed, provider.rules).get("kid"))
        except InvalidToken:
            return DenyReason.INVALID_TOKEN
        found = self._run(token, digest, key, fetched_keys=True)
        return found if found is not None else DenyReason.TOKEN_UNAVAILABLE

    def _provider(self, parsed: Parsed) -> Provider:
        issuer = parsed.claims.get("iss")
        provider = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if provider is None:
            raise InvalidToken("unknown_issuer")
        return provider

    def _run(
        self, token: str, digest: bytes, fetched: jwt.PyJWK | None, *, fetched_keys: bool
    ) -> Verified | DenyReason | None:
        """One verification: the token parsed once, its provider by ``iss``, its key by ``kid`` (from
        memory, or ``fetched``). None when the key is not in memory and no fetch was tried yet. After a
        fetch, keys that never loaded give TOKEN_UNAVAILABLE (not a bad token, not cached)."""
        provider: Provider | None = None
        try:
            parsed = parse(token, self._max_bytes)
            provider = self._provider(parsed)
            kid = check_header(parsed, provider.rules).get("kid")
            key = provider.keys.key(kid) or fetched
            if key is None:
                if not fetched_keys:
                    return None
                if not provider.keys.loaded:
                    self._count(provider, "keys_unavailable")
                    return DenyReason.TOKEN_UNAVAILABLE  # not cached: the next request retries
                raise InvalidToken("unknown_kid")
            claims = check(parsed, key, provider.rules, self._clock.now())
        except InvalidToken as exc:
            self._count(provider, exc.reason)
            log.info("bearer token rejected (%s): %s", provider.config.name if provider else "-", exc.reason)
            self._remember(self._bad, digest, (DenyReason.INVALID_TOKEN, self._clock.now() + NEGATIVE_TTL))
            return DenyReason.INVALID_TOKEN
        expires = float(claims["exp"]) + provider.rules.clock_skew
        verified = Verified(auth_from_claims(provider.config, claims), expires)
        self._count(provider, "valid")
        self._remember(self._good, digest, verified)
        return verified

    def _count(self, provider: Provider | None, result: str) -> None:
        name = provider.config.name if provider is not None else "-"
        counter = self._counters.get((name, result))
        if counter is None:  # reason codes and provider names are bounded sets
            counter = self._counters[(name, result)] = self._metrics.jwt_verifications.labels(
                self._org, name, result
            )
        counter.inc()

    @staticmethod
    def _remember(cache: OrderedDict[bytes, Any], digest: bytes, value: Any) -> None:
        cache[digest] = value
        if len(cache) > MAX_ENTRIES:
            cache.popitem(last=False)
