"""Value objects of the decision core: request attributes, catalog, policy and the decision.

Everything here is a frozen dataclass or an enum, built by the edges (codec, catalog loaders, app) and
read by ``authorize.decide``. Imports: the standard library only.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ALL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE"})


class DenyReason(enum.Enum):
    """Why a request was denied. The value is the stable reason code (deny body, metrics label, logs)."""

    MISSING_CREDENTIALS = "missing_credentials"  # no API key at all
    MALFORMED_CREDENTIALS = "malformed_credentials"  # too long, bad characters
    AMBIGUOUS_CREDENTIALS = "ambiguous_credentials"  # several different keys in one request
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"  # credential, app or developer not active
    EXPIRED_KEY = "expired_key"
    MISSING_API = "missing_api"  # neither the apigee_api context extension nor the API header
    NOT_AUTHORIZED = "not_authorized"  # no product grants environment + API + path + method
    MISSING_ENVIRONMENT = "missing_environment"  # multi-tenant and no apigee_environment extension
    ENVIRONMENT_MISMATCH = "environment_mismatch"  # extension names another environment than the config
    NOT_READY = "not_ready"  # no catalog loaded yet
    AUTH_UNAVAILABLE = "auth_unavailable"  # the key could not be checked (Apigee unreachable), not a bad key
    INVALID_CLAIMS = "invalid_claims"  # JWT claims without a usable api_product_list, client_id, app name
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - a bearer token that does not verify (signature, exp, ...)
    TOKEN_UNAVAILABLE = "token_unavailable"  # noqa: S105 - the issuer's keys cannot be fetched: cannot decide
    UNSAFE_PATH = "unsafe_path"  # a "." or ".." segment, raw or percent-encoded: the path is not normalised
    QUOTA_EXCEEDED = "quota_exceeded"  # a quota of an authorized operation has no room left in its window
    INTERNAL_ERROR = "internal_error"  # an unexpected error while deciding


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What the decision needs from one Envoy CheckRequest (built by the codec).

    Header names are lowercase (Envoy lowercases them); duplicate headers arrive joined with ",".
    """

    method: str
    path: str  # without the query string, raw (not decoded or normalised)
    query: str  # the raw query string without "?"
    headers: Mapping[str, str]
    context_extensions: Mapping[str, str] = field(default_factory=dict)
    # metadata_context["envoy.filters.http.jwt_authn"]: provider (payload_in_metadata name) -> claims
    jwt_metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Quota:
    limit: int
    interval: int
    time_unit: str


@dataclass(frozen=True, slots=True)
class ResourcePattern:
    """An Apigee resource path (``/``, ``/v1/*/items``, ``/v1/**``) and its compiled regex."""

    resource: str
    regex: re.Pattern[str] | None  # None: "/" which matches every path

    def matches(self, path: str) -> bool:
        return self.regex is None or self.regex.match(path) is not None


@dataclass(frozen=True, slots=True)
class Operation:
    resource: ResourcePattern
    methods: frozenset[str]  # upper case; an empty list in the product means ALL_METHODS


@dataclass(frozen=True, slots=True)
class OperationConfig:
    api_source: str
    operations: tuple[Operation, ...]
    quota: Quota | None = None
    # The Go adapter's ``oc.ID``: "{apiSource}-{md5 hex of its operations as Go marshals them}", the suffix
    # of this config's own quota bucket (meaningful only when ``quota`` is set).
    quota_id: str = ""


@dataclass(frozen=True, slots=True)
class Product:
    """An API product in the shape Apigee's remote-service API returns it, parsed once."""

    name: str
    environments: frozenset[str]
    scopes: frozenset[str] = frozenset()
    targets: frozenset[str] = frozenset()  # attribute apigee-remote-service-targets (legacy binding)
    api_resources: tuple[ResourcePattern, ...] = ()
    operation_configs: tuple[OperationConfig, ...] | None = None  # None: no operationGroup
    quota: Quota | None = None
    display_name: str = ""


class CredentialStatus(enum.Enum):
    APPROVED = "approved"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Credential:
    """One API key of one app, as the local catalog (or a key index) knows it. Never holds the key itself."""

    key_sha256: str  # lowercase hex
    client_id: str  # standalone: a digest prefix; Apigee: its client_id, the consumer key itself: never log
    app_name: str
    developer_email: str
    products: tuple[str, ...]
    active: bool = True  # credential approved, app approved and developer active
    expires_at: float | None = None  # epoch seconds
    access_token: str = ""
    scopes: tuple[str, ...] = ()
    custom_attributes: str = ""


@dataclass(frozen=True, slots=True)
class Catalog:
    """An immutable snapshot of products and credentials, swapped whole on reload."""

    products: Mapping[str, Product]
    credentials: Mapping[str, Credential]  # by key_sha256
    loaded_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The configuration the decision reads (built by app.py from the config)."""

    org: str
    env: str  # "*" = multi-tenant: taken from the apigee_environment context extension
    api_key_header: str = "x-api-key"
    api_header: str = ":authority"
    allow_unauthorized: bool = False
    append_metadata_headers: bool = False
    api_key_claim: str = ""  # a JWT claim that carries an API key to verify
    jwt_provider_key: str = ""  # which jwt_authn provider's claims to read ("" = any that fits)
    # (header, lowercase prefix) of bearer tokens removed upstream on allow (providers without forward)
    token_headers: tuple[tuple[str, str], ...] = ()

    @property
    def multi_tenant(self) -> bool:
        return self.env == "*"


@dataclass(frozen=True, slots=True)
class AuthContext:
    """Who is calling, once the credential is known."""

    client_id: str
    app_name: str
    developer_email: str
    products: tuple[str, ...]
    access_token: str = ""
    scopes: tuple[str, ...] = ()
    custom_attributes: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizedOperation:
    """One product operation that grants this request (each quota-bearing one is charged later)."""

    product: str
    api_source: str
    quota: Quota | None
    # The quota bucket, as the Go adapter names it: "{product}-{env}-{developer_email}-{app}", plus
    # "-{OperationConfig.quota_id}" when the operation config has its own quota; "" without a quota.
    quota_id: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of ``decide``: an allow (``reason is None``) or a deny with a reason.

    ``fail_open`` marks a policy deny turned into an allow by ``auth.allow_unauthorized``; it keeps the
    original ``reason``.
    """

    reason: DenyReason | None
    api: str = ""
    environment: str = ""
    auth: AuthContext | None = None
    operations: tuple[AuthorizedOperation, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    query_params_to_remove: tuple[str, ...] = ()
    fail_open: bool = False
    valid_until: float | None = None  # epoch seconds after which the same request may decide otherwise

    @property
    def allowed(self) -> bool:
        return self.reason is None or self.fail_open
