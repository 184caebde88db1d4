"""RemoteTokenKeys: the remote-token proxy's JWKS (``{runtime}/remote-token/certs``), cached in memory.

The keys verify the JWT that ``/verifyApiKey`` returns (the Go adapter never checks its signature). The
caching, key filtering and pinning, single-flight refetch and cooldowns are ``authz.jwt.jwks.JwksCache``'s
(reliability.md J01-J07, J25-J27); this layer fetches through ``ApigeeClient.jwks`` under the provider
label ``apigee-remote-token``. ``decode`` checks a token against these keys: the signature, ``aud``, and
``exp`` (required), ``nbf`` and ``iat`` against the injected clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jwt

from authz.apigee.client import ApigeeClient
from authz.clock import Clock
from authz.errors import AuthzError
from authz.jwt.jwks import ALLOWED_ALGORITHMS, RETRY_AFTER_FAILURE, JwksCache, JWKSError, parse_jwks
from authz.metrics import Metrics

__all__ = [
    "ALLOWED_ALGORITHMS",
    "AUDIENCE",
    "PROVIDER",
    "RETRY_AFTER_FAILURE",
    "BadToken",
    "JWKSError",
    "RemoteTokenKeys",
    "parse_jwks",
]

AUDIENCE = "remote-service-client"
MAX_TOKEN_CHARS = 16 * 1024  # reliability.md J18: no parsing of huge tokens
MAX_KID_CHARS = 256  # J05
PROVIDER = "apigee-remote-token"  # the provider label of this key set in metrics


class BadToken(AuthzError):
    """A remote-token JWT that does not verify. The message never holds the token."""

    code = "bad_token"


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    try:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    except OverflowError:
        pass
    raise BadToken(f"{name} is not a finite number")  # J16: never read an odd value as absent


class RemoteTokenKeys(JwksCache):
    """The remote-token keys, fetched with ``client.jwks(url)``; see ``JwksCache`` for the rest."""

    def __init__(
        self, client: ApigeeClient, url: str, org: str, metrics: Metrics, clock: Clock,
        refresh_interval: float = 300.0, unknown_kid_cooldown: float = 30.0,
    ) -> None:  # fmt: skip
        super().__init__(
            lambda: client.jwks(url), org, PROVIDER, metrics, clock, refresh_interval, unknown_kid_cooldown
        )

    async def decode(self, token: str, leeway: float) -> dict[str, Any]:
        """The claims of ``token`` once verified (never ``iss``: the proxy puts its own host there).

        Raises:
            BadToken: unreadable, no key for its kid, bad signature or algorithm, ``aud`` without
                remote-service-client, ``exp`` missing or past, ``nbf``/``iat`` in the future (± ``leeway``).
        """
        if len(token) > MAX_TOKEN_CHARS:
            raise BadToken(f"token over {MAX_TOKEN_CHARS} characters")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise BadToken(f"unreadable header: {exc}") from None
        if kid is not None and not (isinstance(kid, str) and len(kid) <= MAX_KID_CHARS):
            raise BadToken("kid is not a short string")
        key = await self.key_for(kid)
        if key is None:
            raise BadToken(f"no key for kid {kid!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[key.algorithm_name], audience=AUDIENCE,
                options={"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            raise BadToken(f"{type(exc).__name__}: {exc}") from None
        now = self._clock.now()  # times use the injected clock, not PyJWT's wall clock
        if now >= _numeric_date(claims, "exp") + leeway:
            raise BadToken("expired")
        for name in ("nbf", "iat"):
            if name in claims and _numeric_date(claims, name) > now + leeway:
                raise BadToken(f"{name} is in the future")
        return claims
