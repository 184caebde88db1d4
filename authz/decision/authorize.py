"""``decide``: one pure function from request attributes, catalog and policy to a Decision.

It never awaits, logs or touches metrics; the gRPC servicer gathers the inputs and turns the Decision into
a CheckResponse. ``auth.allow_unauthorized`` is applied in one place, at the end. Imports: stdlib only.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import parse_qsl

from authz.decision import dynamic_metadata as md
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
    }
)


def key_digest(key: str) -> str:
    """The catalog's form of an API key: lowercase hex SHA-256 of its ASCII bytes."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


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


def _credential(catalog: Catalog, key: str, now: float) -> Credential | DenyReason:
    credential = catalog.credentials.get(key_digest(key))
    if credential is None:
        return DenyReason.UNKNOWN_KEY
    if not credential.active:
        return DenyReason.REVOKED_KEY
    if credential.expires_at is not None and credential.expires_at <= now:
        return DenyReason.EXPIRED_KEY
    return credential


def _strip(attrs: RequestAttrs, policy: Policy, keep: frozenset[str]) -> tuple[str, ...]:
    """Headers to remove upstream: the API key and any client-sent x-apigee-* we do not overwrite."""
    remove = [
        name
        for name in attrs.headers
        if (name.startswith(md.PREFIX) and name not in keep)
        or name == policy.api_key_header
        or name == FAILURE_MODE_HEADER
    ]
    return tuple(remove)


def _remove_query(attrs: RequestAttrs, policy: Policy) -> tuple[str, ...]:
    return (policy.api_key_header,) if _query_keys(attrs.query, policy.api_key_header) else ()


def _deny(reason: DenyReason, attrs: RequestAttrs, policy: Policy, api: str = "", env: str = "") -> Decision:
    if not policy.allow_unauthorized or reason not in _POLICY_DENIES:
        return Decision(reason=reason, api=api, environment=env)
    metadata = md.build(policy.org, env, api, None, "")
    metadata[md.UNAUTHORIZED_REASON] = reason.value
    return Decision(
        reason=reason,
        api=api,
        environment=env,
        metadata=metadata,
        headers_to_remove=_strip(attrs, policy, frozenset()),
        query_params_to_remove=_remove_query(attrs, policy),
        fail_open=True,
    )


def decide(attrs: RequestAttrs, catalog: Catalog | None, policy: Policy, now: float) -> Decision:
    """Decide one request.

    Args:
        attrs: the request as the codec extracted it.
        catalog: the current catalog snapshot, or None while none is loaded.
        policy: settings from the config.
        now: the current time, epoch seconds (for credential expiry).

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
    found = _api_key(attrs, policy)
    if isinstance(found, DenyReason):
        return _deny(found, attrs, policy, api, env)
    credential = _credential(catalog, found, now)
    if isinstance(credential, DenyReason):
        return _deny(credential, attrs, policy, api, env)
    auth = AuthContext(
        client_id=credential.client_id,
        app_name=credential.app_name,
        developer_email=credential.developer_email,
        products=credential.products,
    )
    operations = authorized_operations(catalog, auth.products, env, api, attrs.path, attrs.method)
    if not operations:
        return _deny(DenyReason.NOT_AUTHORIZED, attrs, policy, api, env)
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
        valid_until=credential.expires_at,
    )
