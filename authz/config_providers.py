"""``auth.jwt_providers``: the issuers whose bearer tokens this service validates itself.

Each provider names an issuer, where its keys are (``jwks_uri``, or OIDC discovery from the issuer), the
audiences its tokens must carry, the algorithms allowed, the clock skew, where the token is read from, and
how claims map to the caller (which claim holds the products, or a fixed product list for issuers that
know nothing of API products, such as Google). In Apigee mode a provider for Apigee's remote-token proxy
is added unless one with its issuer is configured. Parsed by ``authz.config``; imports only the stdlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from authz.config_values import Section

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
DEFAULT_CLOCK_SKEW = 60.0
DEFAULT_JWKS_REFRESH = 300.0
MIN_JWKS_REFRESH = 10.0
DEFAULT_UNKNOWN_KID_COOLDOWN = 30.0
MIN_UNKNOWN_KID_COOLDOWN = 1.0
DEFAULT_TOKEN_HEADER = "authorization"  # noqa: S105 - a header name
DEFAULT_TOKEN_PREFIX = "Bearer "  # noqa: S105 - a scheme
APIGEE_PROVIDER = "apigee"
APIGEE_AUDIENCE = "remote-service-client"


@dataclass(frozen=True)
class ClaimNames:
    """Which claim carries each part of the caller; the defaults are the Apigee token's names."""

    products: str = "api_product_list"
    client_id: str = "client_id"
    application: str = "application_name"
    developer_email: str = "developer_email"
    scope: str = "scope"
    access_token: str = "access_token"  # noqa: S105 - a claim name


@dataclass(frozen=True)
class JwtProvider:
    name: str  # a label for metrics and logs
    issuer: str  # "iss", exactly
    audiences: tuple[str, ...]  # "aud" must contain one of them
    jwks_uri: str = ""  # "" = OIDC discovery from the issuer
    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
    clock_skew: float = DEFAULT_CLOCK_SKEW
    refresh_interval: float = DEFAULT_JWKS_REFRESH
    unknown_kid_cooldown: float = DEFAULT_UNKNOWN_KID_COOLDOWN  # at most one refetch per this, for new kids
    header: str = DEFAULT_TOKEN_HEADER  # lowercase: Envoy lowercases header names
    prefix: str = DEFAULT_TOKEN_PREFIX  # matched case-insensitively; "" takes the whole header value
    products: tuple[str, ...] = ()  # granted to every valid token (when the claim is absent)
    claims: ClaimNames = ClaimNames()
    forward: bool = False  # keep the token in the upstream request (Envoy jwt_authn's "forward")


def parse_providers(items: list[Section]) -> tuple[JwtProvider, ...]:
    """Parse and cross-check the list: names and issuers unique. Raises ConfigError."""
    providers: list[JwtProvider] = []
    for s in items:
        provider = _provider(s)
        for other in providers:
            if provider.name == other.name:
                raise s.error("name", f'"{provider.name}" is used by another provider')
            if provider.issuer == other.issuer:
                raise s.error("issuer", f'"{provider.issuer}" is used by another provider')
        providers.append(provider)
    return tuple(providers)


def _provider(s: Section) -> JwtProvider:
    issuer = s.url("issuer")
    if not issuer:
        raise s.error("issuer", "required")
    audiences = s.strings("audiences")
    if not audiences:
        raise s.error("audiences", "required: without it, tokens the issuer made for other services pass")
    algorithms = s.strings("algorithms") or ASYMMETRIC_ALGORITHMS
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS:
            allowed = ", ".join(ASYMMETRIC_ALGORITHMS)
            raise s.error("algorithms", f'"{alg}" is not allowed (only asymmetric ones: {allowed})')
    names = s.child("claims", ClaimNames)
    return JwtProvider(
        name=s.text("name") or urlsplit(issuer).hostname or issuer,
        issuer=issuer,
        audiences=audiences,
        jwks_uri=s.url("jwks_uri"),
        algorithms=algorithms,
        clock_skew=s.duration("clock_skew", DEFAULT_CLOCK_SKEW),
        refresh_interval=s.duration("refresh_interval", DEFAULT_JWKS_REFRESH, MIN_JWKS_REFRESH),
        unknown_kid_cooldown=s.duration(
            "unknown_kid_cooldown", DEFAULT_UNKNOWN_KID_COOLDOWN, MIN_UNKNOWN_KID_COOLDOWN
        ),
        header=s.text("header", DEFAULT_TOKEN_HEADER, required=True).lower(),
        prefix=s.text("prefix", DEFAULT_TOKEN_PREFIX),
        products=s.strings("products"),
        claims=ClaimNames(*(names.text(f, getattr(ClaimNames, f), required=True) for f in _CLAIM_FIELDS)),
        forward=s.flag("forward"),
    )


_CLAIM_FIELDS = ("products", "client_id", "application", "developer_email", "scope", "access_token")


def apigee_provider(remote_service_api: str, jwks_url: str) -> JwtProvider:
    """The provider for tokens from Apigee's remote-token proxy (``{runtime}/remote-token/token``)."""
    parts = urlsplit(remote_service_api.rstrip("/"))
    base = parts.path.rsplit("/", 1)[0] if parts.path.endswith("/remote-service") else parts.path
    return JwtProvider(
        name=APIGEE_PROVIDER,
        issuer=f"{parts.scheme}://{parts.netloc}{base}/remote-token/token",
        audiences=(APIGEE_AUDIENCE,),
        jwks_uri=jwks_url,
        algorithms=("RS256",),
    )
