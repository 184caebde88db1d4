"""RemoteTokenKeys: the remote-token proxy's JWKS (``{runtime}/remote-token/certs``), cached in memory.

The keys verify the JWT that ``/verifyApiKey`` returns (the Go adapter never checks its signature). The
caching, key filtering and pinning, single-flight refetch and cooldowns are ``authz.jwt.jwks.JwksCache``'s
(reliability.md J01-J07, J25-J27); this layer fetches through ``ApigeeClient.jwks`` under the provider
label ``apigee-remote-token``. ``decode`` checks a token against these keys: the signature, ``aud``, and
``exp`` (required), ``nbf`` and ``iat`` against the injected clock.
"""

from __future__ import annotations

from typing import Any

from authz.apigee.client import ApigeeClient
from authz.clock import Clock
from authz.errors import AuthzError
from authz.jwt.jwks import JwksCache
from authz.jwt.validate import ASYMMETRIC, InvalidToken, Rules, header, validate
from authz.metrics import Metrics

AUDIENCE = "remote-service-client"
MAX_TOKEN_CHARS = 16 * 1024  # reliability.md J18: no parsing of huge tokens
PROVIDER = "apigee-remote-token"  # the provider label of this key set in metrics


class BadToken(AuthzError):
    """A remote-token JWT that does not verify. The message never holds the token."""

    code = "bad_token"


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
        """The claims of ``token`` once verified by the strict validator (``authz.jwt.validate``), except
        ``iss``, which is not checked: the proxy puts its own host there (and the Go adapter ignores it).

        Raises:
            BadToken: unreadable, no key for its kid, bad signature or algorithm, ``aud`` without
                remote-service-client, ``exp`` missing or past, ``nbf``/``iat`` in the future (± ``leeway``).
        """
        try:
            rules = Rules(
                issuer=None,
                audiences=frozenset({AUDIENCE}),
                algorithms=ASYMMETRIC,
                clock_skew=leeway,
                max_token_bytes=MAX_TOKEN_CHARS,
            )
            key = await self.key_for(header(token, rules).get("kid"))
            if key is None:
                raise BadToken("no key for the token's kid")
            return validate(token, key, rules, self._clock.now())
        except InvalidToken as exc:
            raise BadToken(exc.reason) from None
