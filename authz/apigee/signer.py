"""The ``Authorization`` header for calls to Apigee, exactly as the Go adapter builds it.

GCP-managed (Apigee X / hybrid): a short-lived RS256 JWT signed with the provisioned policy key
(``iss`` apigee-remote-service-envoy, ``aud`` remote-service-client, ``kid`` from remote-service.properties,
10 minutes of life, a new one every 30 s; ENVOY:server/authmanager.go). Legacy SaaS / OPDK: HTTP Basic
``tenant.key:tenant.secret``. Tokens are made lazily when a call needs one, so no loop is needed.
"""

from __future__ import annotations

import base64
from typing import Protocol

import jwt

from authz.clock import Clock

INTERNAL_JWT_ISSUER = "apigee-remote-service-envoy"
INTERNAL_JWT_AUDIENCE = "remote-service-client"
INTERNAL_JWT_LIFETIME = 600.0
INTERNAL_JWT_RENEW_AFTER = 30.0


class Authorizer(Protocol):
    def authorization(self) -> str:
        """The value of the Authorization header for the next call."""
        ...


class BasicAuthorizer:
    def __init__(self, key: str, secret: str) -> None:
        token = base64.b64encode(f"{key}:{secret}".encode()).decode("ascii")
        self._header = f"Basic {token}"

    def authorization(self) -> str:
        return self._header

    def __repr__(self) -> str:
        return "BasicAuthorizer(***)"


class InternalJWTAuthorizer:
    """Signs the internal JWT with the policy secret's private key (PEM, PKCS#1 or PKCS#8)."""

    def __init__(self, kid: str, private_key_pem: str, clock: Clock) -> None:
        self._kid = kid
        self._key = private_key_pem
        self._clock = clock
        self._header = ""
        self._made_at = float("-inf")

    def authorization(self) -> str:
        now = self._clock.now()
        if now - self._made_at >= INTERNAL_JWT_RENEW_AFTER or now < self._made_at:
            issued = int(now)
            claims = {
                "iss": INTERNAL_JWT_ISSUER,
                "aud": INTERNAL_JWT_AUDIENCE,
                "iat": issued,
                "exp": issued + int(INTERNAL_JWT_LIFETIME),
            }
            token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self._kid})
            self._header = f"Bearer {token}"
            self._made_at = now
        return self._header

    def __repr__(self) -> str:
        return f"InternalJWTAuthorizer(kid={self._kid!r})"
