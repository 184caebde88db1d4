"""``decide``: one pure function from request attributes, catalog and policy to a Decision.

It never awaits, logs or touches metrics; the gRPC servicer gathers the inputs and turns the Decision into
a CheckResponse. ``auth.allow_unauthorized`` is applied in one place, at the end. Imports: stdlib only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, unquote

from authz.decision import dynamic_metadata as md
from authz.decision.claims import PRODUCT_LIST, auth_context
from authz.decision.model import (
    AuthContext,
    Catalog,
    Credential,
    Decision,
    DenyReason,
    Policy,
    RequestAttrs,
)
from authz.decision.products import authorized_operations

MAX_KEY_LENGTH = 256
# Apigee consumer keys are alphanumeric; this also admits base64/url-safe keys imported by hand. "!" is
# left out on purpose: Envoy replaces non-UTF-8 bytes with "!", so two different keys could collide.
_KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+\Z")
FAILURE_MODE_HEADER = "x-envoy-auth-failure-mode-allowed"
# A "." or ".." path segment (after percent-decoding; "\\" counts as "/", as some upstreams read it).
# Products match the raw path, so "/v1/orders/../admin" would match "/v1/orders/**" while the upstream
# serves /v1/admin. Envoy's normalize_path (envoy/sidecar*.yaml) removes them before the check; a
# hand-written Envoy config without it gets this deny instead of a bypass.
_DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.\.?(?:[/\\]|\Z)")
# What an API key stands for: its credential, or why it grants nothing (unknown, unavailable, ...).
KeyLookup = Callable[[str], "Credential | DenyReason"]

# Denies that allow_unauthorized may turn into an allow: the caller or its rights, never our own state.
_POLICY_DENIES = frozenset(
    {
        DenyReason.MISSING_CREDENTIALS,
        DenyReason.MALFORMED_CREDENTIALS,
        DenyReason.AMBIGUOUS_CREDENTIALS,
        DenyReason.UNKNOWN_KEY,
        DenyReason.REVOKED_KEY,
        DenyReason.EXPIRED_KEY,
        DenyReason.NOT_AUTHORIZED,
        DenyReason.INVALID_CLAIMS,
        DenyReason.INVALID_TOKEN,
    }
)


def key_digest(key: str) -> str:
    """The catalog's form of an API key: lowercase hex SHA-256 of its ASCII bytes."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def unsafe_path(path: str) -> bool:
    """True when ``path`` has a dot segment, raw or percent-encoded (``%2e``, ``%2f``): not normalised."""
    return bool(_DOT_SEGMENT.search(unquote(path) if "%" in path else path))


def _environment(attrs: RequestAttrs, policy: Policy) -> str | DenyReason:
    requested = attrs.context_extensions.get("apigee_environment", "")
    if policy.multi_tenant:
        return requested or DenyReason.MISSING_ENVIRONMENT
    if requested and requested != policy.env:
        return DenyReason.ENVIRONMENT_MISMATCH
    return policy.env


def _query_keys(query: str, name: str) -> list[str]:
    if not query or name not in query:
        return []
    return [v for k, v in parse_qsl(query, keep_blank_values=True) if k == name]


def _api_key(attrs: RequestAttrs, policy: Policy) -> str | DenyReason:
    """The request's API key.

    The header wins, as in the Go adapter; a different key in the query string, or several different
    keys in duplicate headers (Envoy joins them with ","), is ambiguous and denied.
    """
    header = attrs.headers.get(policy.api_key_header)
    query_values = _query_keys(attrs.query, policy.api_key_header)
    values = {v.strip() for v in header.split(",")} if header is not None else set()
    values.update(query_values)
    values.discard("")
    if not values:
        return DenyReason.MISSING_CREDENTIALS
    if len(values) > 1:
        return DenyReason.AMBIGUOUS_CREDENTIALS
    key = values.pop()
    if len(key) > MAX_KEY_LENGTH or not _KEY_CHARS.match(key):
        return DenyReason.MALFORMED_CREDENTIALS
    return key


def catalog_lookup(catalog: Catalog) -> KeyLookup:
    """The key lookup of a catalog that holds its own credentials (standalone mode)."""

    def lookup(key: str) -> Credential | DenyReason:
        return catalog.credentials.get(key_digest(key)) or DenyReason.UNKNOWN_KEY

    return lookup


def _usable(credential: Credential | DenyReason, now: float) -> Credential | DenyReason:
    if isinstance(credential, DenyReason):
        return credential
    if not credential.active:
        return DenyReason.REVOKED_KEY
    if credential.expires_at is not None and credential.expires_at <= now:
        return DenyReason.EXPIRED_KEY
    return credential


def jwt_claims(attrs: RequestAttrs, policy: Policy) -> Mapping[str, Any] | None:
    """The JWT claims Envoy's jwt_authn filter verified for this request, if any.

    With ``auth.jwt_provider_key`` the claims of that provider; otherwise the first provider (by name,
    for a stable answer) whose claims carry ``api_key_claim`` or ``api_product_list``.
    """
    providers = attrs.jwt_metadata
    if not providers:
        return None
    if policy.jwt_provider_key:
        return providers.get(policy.jwt_provider_key) or None
    for name in sorted(providers):
        claims = providers[name]
        if (policy.api_key_claim and policy.api_key_claim in claims) or PRODUCT_LIST in claims:
            return claims
    return None


def requested_key(attrs: RequestAttrs, policy: Policy) -> str | DenyReason:
    """The API key this request asks to verify: the ``api_key_claim`` of its JWT claims first, then the
    header or query parameter. A DenyReason when there is none or it is malformed or ambiguous."""
    claims = jwt_claims(attrs, policy)
    if claims is not None and policy.api_key_claim:
        value = claims.get(policy.api_key_claim)
        if isinstance(value, str) and value:
            return (
                value
                if len(value) <= MAX_KEY_LENGTH and _KEY_CHARS.match(value)
                else (DenyReason.MALFORMED_CREDENTIALS)
            )
    return _api_key(attrs, policy)


def _authenticate(
    attrs: RequestAttrs,
    policy: Policy,
    lookup: KeyLookup,
    now: float,
    bearer: AuthContext | DenyReason | None,
) -> tuple[AuthContext, Credential | None] | DenyReason:
    """Who is calling.

    1. A bearer token this service verified (``bearer``) that failed denies, whatever else comes along.
    2. An API key (from ``api_key_claim`` or the request) that is valid names the caller.
    3. With a valid bearer token, a presented key that fails denies (strict: a bad key next to a valid
       token is not an allow); no key at all leaves the token's caller.
    4. Otherwise Envoy's jwt_authn claims, as in the Go adapter: a bad or uncheckable key does not stop a
       request whose claims are valid, since Envoy verified the token.
    Returns the credential too when a key authenticated the call (scopes then do not apply).
    """
    if isinstance(bearer, DenyReason):
        return bearer
    key = requested_key(attrs, policy)
    found = _usable(lookup(key), now) if isinstance(key, str) else key
    if bearer is not None and not isinstance(found, Credential):
        return (bearer, None) if found is DenyReason.MISSING_CREDENTIALS else found
    if isinstance(found, Credential):
        auth = AuthContext(
            client_id=found.client_id,
            app_name=found.app_name,
            developer_email=found.developer_email,
            products=found.products,
            access_token=found.access_token,
            scopes=found.scopes,
            custom_attributes=found.custom_attributes,
        )
        return auth, found
    claims = jwt_claims(attrs, policy)
    if claims is None:
        return found
    from_claims = auth_context(claims)
    return (from_claims, None) if from_claims is not None else DenyReason.INVALID_CLAIMS


def _strip(attrs: RequestAttrs, policy: Policy, keep: frozenset[str]) -> tuple[str, ...]:
    """Headers to remove upstream: the API key, a bearer token (unless its provider forwards it) and any
    client-sent x-apigee-* we do not overwrite."""
    remove = [
        name
        for name, value in attrs.headers.items()
        if (name.startswith(md.PREFIX) and name not in keep)
        or name == policy.api_key_header
        or name == FAILURE_MODE_HEADER
        or any(
            name == header and value[: len(prefix)].lower() == prefix
            for header, prefix in policy.token_headers
        )
    ]
    return tuple(remove)


def _remove_query(attrs: RequestAttrs, policy: Policy) -> tuple[str, ...]:
    return (policy.api_key_header,) if _query_keys(attrs.query, policy.api_key_header) else ()


def _deny(
    reason: DenyReason,
    attrs: RequestAttrs,
    policy: Policy,
    api: str = "",
    env: str = "",
    auth: AuthContext | None = None,
) -> Decision:
    """A deny (``auth``: the caller, when known, for its analytics record), or under allow_unauthorized
    a marked allow."""
    if not policy.allow_unauthorized or reason not in _POLICY_DENIES:
        return Decision(reason=reason, api=api, environment=env, auth=auth)
    metadata = md.build(policy.org, env, api, auth, "")
    metadata[md.UNAUTHORIZED_REASON] = reason.value
    return Decision(
        reason=reason,
        api=api,
        environment=env,
        auth=auth,
        metadata=metadata,
        headers_to_remove=_strip(attrs, policy, frozenset()),
        query_params_to_remove=_remove_query(attrs, policy),
        fail_open=True,
    )


def decide(
    attrs: RequestAttrs,
    catalog: Catalog | None,
    policy: Policy,
    now: float,
    lookup: KeyLookup | None = None,
    bearer: AuthContext | DenyReason | None = None,
) -> Decision:
    """Decide one request.

    Args:
        attrs: the request as the codec extracted it.
        catalog: the current catalog snapshot, or None while none is loaded.
        policy: settings from the config.
        now: the current time, epoch seconds (for credential expiry).
        lookup: what an API key stands for; by default the catalog's own credentials. In Apigee mode the
            servicer has verified the key already and passes its answer.
        bearer: the caller named by a bearer token the servicer verified, or why it failed; None when
            the request carries none.

    Returns:
        An allow with metadata and header changes, or a deny with its reason.
    """
    if catalog is None:
        return Decision(reason=DenyReason.NOT_READY)
    env = _environment(attrs, policy)
    if isinstance(env, DenyReason):
        return Decision(reason=env)
    api = attrs.context_extensions.get("apigee_api") or attrs.headers.get(policy.api_header, "")
    if not api:
        return _deny(DenyReason.MISSING_API, attrs, policy, env=env)
    if unsafe_path(attrs.path):  # never covered by allow_unauthorized: the request's target is unclear
        return Decision(reason=DenyReason.UNSAFE_PATH, api=api, environment=env)
    found = _authenticate(attrs, policy, lookup or catalog_lookup(catalog), now, bearer)
    if isinstance(found, DenyReason):
        return _deny(found, attrs, policy, api, env)
    auth, credential = found
    # Scopes restrict tokens, not API keys (Go adapter).
    scopes = None if credential is not None else frozenset(auth.scopes)
    operations = authorized_operations(
        catalog, auth.products, env, api, attrs.path, attrs.method, scopes,
        caller=f"{auth.developer_email}-{auth.app_name}",
    )  # fmt: skip
    if not operations:
        return _deny(DenyReason.NOT_AUTHORIZED, attrs, policy, api, env, auth)
    metadata = md.build(policy.org, env, api, auth, operations[0].product)
    metadata[md.AUTHORIZED] = "true"
    headers_to_set: tuple[tuple[str, str], ...] = ()
    if policy.append_metadata_headers:
        headers_to_set = tuple((k, v) for k, v in metadata.items() if k not in md.NEVER_UPSTREAM)
    return Decision(
        reason=None,
        api=api,
        environment=env,
        auth=auth,
        operations=operations,
        metadata=metadata,
        headers_to_set=headers_to_set,
        headers_to_remove=_strip(attrs, policy, frozenset(k for k, _ in headers_to_set)),
        query_params_to_remove=_remove_query(attrs, policy),
        valid_until=credential.expires_at if credential is not None else None,
    )


def over_quota(decision: Decision, policy: Policy) -> Decision:
    """An allow whose quota has no room left: a 429 deny. Under ``allow_unauthorized`` the request goes
    on as in the Go adapter, with its metadata but without ``x-apigee-authorized``."""
    if not policy.allow_unauthorized:
        return Decision(
            reason=DenyReason.QUOTA_EXCEEDED,
            api=decision.api,
            environment=decision.environment,
            auth=decision.auth,
            operations=decision.operations,
        )
    metadata = {k: v for k, v in decision.metadata.items() if k != md.AUTHORIZED}
    metadata[md.UNAUTHORIZED_REASON] = DenyReason.QUOTA_EXCEEDED.value
    return replace(
        decision,
        reason=DenyReason.QUOTA_EXCEEDED,
        metadata=metadata,
        headers_to_set=tuple((k, v) for k, v in decision.headers_to_set if k != md.AUTHORIZED),
        fail_open=True,
    )
