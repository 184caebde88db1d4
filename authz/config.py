"""Load the service config once, into frozen typed dataclasses.

This module owns the config file format: the Go adapter's YAML schema (``global``, ``tenant``,
``products``, ``analytics``, ``auth``; see ``reference/apigee-adapter.md`` §2), read either as plain
YAML or as the multi-document Kubernetes stream that ``apigee-remote-service-cli provision`` prints
(a ConfigMap holding ``config.yaml`` plus policy and analytics Secrets). It applies the named
``DEFAULT_*`` values, turns Go duration strings into float seconds, and enforces types, minimums and
cross-field rules. Unlike the Go adapter, unknown keys are errors. Every problem is raised as one
``ConfigError(file, dotted.key, problem)``; nothing reads the environment.

Keys this service adds to the Go schema: ``global.graceful_shutdown_timeout``, ``tenant.catalog_file``,
``tenant.catalog_poll_interval``, ``auth.api_key_verify_wait``, ``tenant.remote_token_jwks_url``
(where the keys that sign ``/verifyApiKey`` tokens are published; derived from ``remote_service_api``
by default), ``tenant.management_api`` (the Google API base for Apigee X/hybrid analytics, which the Go
adapter hard-codes; also where the key index lists apps), ``tenant.key_sync_interval`` (0 = no key index),
``tenant.management_user``/``management_password`` (legacy Edge's management API, Basic auth),
``auth.api_key_verify_rate`` and ``analytics.endpoint`` (standalone only: where staged analytics files are
POSTed).
Relative file paths (the catalog and TLS files) are resolved against the config file's directory and
stored absolute.

The YAML documents themselves (Kubernetes stream, Secrets) are read by ``authz.config_documents``; the
value types (durations, addresses, typed getters) are in ``authz.config_values``. Imports only the
standard library, ``yaml`` and the other ``authz.config_*`` modules and ``authz.errors``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from authz.config_documents import PolicySecret, split_documents
from authz.config_documents import analytics_secret_dir as analytics_secret_reader
from authz.config_documents import policy_secret_dir as policy_secret_dir_reader
from authz.config_providers import JwtProvider, apigee_provider, parse_providers
from authz.config_values import Address, Section, format_duration
from authz.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_log = logging.getLogger(__name__)

DEFAULT_API_ADDRESS = ":5000"
DEFAULT_METRICS_ADDRESS = ":5001"
DEFAULT_TEMP_DIR = "/tmp/apigee-istio"  # noqa: S108 - the Go adapter's default, kept for parity
DEFAULT_KEEP_ALIVE_MAX_CONNECTION_AGE = 60.0
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_CLIENT_TIMEOUT = 30.0
DEFAULT_CATALOG_POLL_INTERVAL = 2.0
DEFAULT_STANDALONE_ORG = "standalone"
DEFAULT_PRODUCTS_REFRESH = 120.0
DEFAULT_ANALYTICS_FILE_LIMIT = 1024
DEFAULT_ANALYTICS_SEND_CHANNEL_SIZE = 10
DEFAULT_ANALYTICS_COLLECTION_INTERVAL = 120.0
DEFAULT_ANALYTICS_FLUSH_INTERVAL = 1.0
MIN_ANALYTICS_FLUSH_INTERVAL = 0.01
DEFAULT_ANALYTICS_DISK_LIMIT_MB = 1024
DEFAULT_API_KEY_CACHE_DURATION = 1800.0
DEFAULT_API_KEY_HEADER = "x-api-key"
DEFAULT_API_HEADER = ":authority"
DEFAULT_API_KEY_VERIFY_WAIT = 0.8  # below the 1 s ext_authz timeout of the Go adapter's sample Envoy config
DEFAULT_API_KEY_VERIFY_RATE = 10  # /verifyApiKey calls a second for keys the key index does not know
DEFAULT_QUOTA_SYNC_WAIT = 0.25  # Check waits this long for a quota sync in flight, then admits on credit

MIN_CATALOG_POLL_INTERVAL = 0.05
MIN_PRODUCTS_REFRESH = 1.0
PRODUCTS_REFRESH_WARN_BELOW = 60.0  # the Go adapter refuses anything below 1m
MIN_COLLECTION_INTERVAL = 1.0
MIN_KEY_SYNC_INTERVAL = 1.0
KEY_SYNC_WARN_BELOW = 60.0  # each sync lists every app of the org
EDGE_MANAGEMENT_API = "https://api.enterprise.apigee.com"
MASK = "***"
SECTIONS = ("global", "tenant", "products", "analytics", "auth")
APIGEE_ONLY = "required in Apigee mode (when tenant.catalog_file is not set)"
DEFAULT_POLICY_SECRET_DIR = "/policy-secret"  # noqa: S105 - a directory, as in the Go adapter
DEFAULT_ANALYTICS_SECRET_DIR = "/analytics-secret"  # noqa: S105 - a directory, as in the Go adapter
DEFAULT_MANAGEMENT_API = "https://apigee.googleapis.com"  # the Go adapter's fixed analytics base (GCP)


@dataclass(frozen=True)
class ServerTLS:
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class GlobalConfig:
    api_address: Address = Address("", 5000)
    metrics_address: Address = Address("", 5001)
    http_authz_address: Address | None = None  # the HTTP check port (Envoy's http_service); off by default
    temp_dir: str = DEFAULT_TEMP_DIR
    keep_alive_max_connection_age: float = DEFAULT_KEEP_ALIVE_MAX_CONNECTION_AGE
    tls: ServerTLS = ServerTLS()
    graceful_shutdown_timeout: float = DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT


@dataclass(frozen=True)
class TenantTLS:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    allow_unverified_ssl_cert: bool = False


@dataclass(frozen=True)
class TenantConfig:
    internal_api: str = ""
    remote_service_api: str = ""
    org_name: str = ""
    env_name: str = ""
    key: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    tls: TenantTLS = TenantTLS()
    catalog_file: str = ""
    catalog_poll_interval: float = DEFAULT_CATALOG_POLL_INTERVAL
    remote_token_jwks_url: str = ""  # "" until loaded: derived from remote_service_api
    management_api: str = DEFAULT_MANAGEMENT_API  # NEW: Apigee X/hybrid analytics and key-index base
    key_sync_interval: float = 0.0  # NEW: full listing of apps and keys this often; 0 = no key index
    management_user: str = ""  # NEW: legacy Edge only: Basic auth for the management API (key index)
    management_password: str = field(default="", repr=False)

    @property
    def key_sync(self) -> bool:
        return self.key_sync_interval > 0

    @property
    def multi_tenant(self) -> bool:
        return self.env_name == "*"

    @property
    def gcp_managed(self) -> bool:
        """Apigee X or hybrid: calls are signed with the provisioned key (legacy SaaS/OPDK use Basic auth)."""
        return self.internal_api == ""


@dataclass(frozen=True)
class ProductsConfig:
    refresh_rate: float = DEFAULT_PRODUCTS_REFRESH


@dataclass(frozen=True)
class AnalyticsConfig:
    legacy_endpoint: bool = False
    file_limit: int = DEFAULT_ANALYTICS_FILE_LIMIT
    send_channel_size: int = DEFAULT_ANALYTICS_SEND_CHANNEL_SIZE
    collection_interval: float = DEFAULT_ANALYTICS_COLLECTION_INTERVAL
    disk_limit_mb: int = DEFAULT_ANALYTICS_DISK_LIMIT_MB  # NEW: analytics files on disk; oldest dropped
    flush_interval: float = DEFAULT_ANALYTICS_FLUSH_INTERVAL  # NEW: a record is durable at most this late
    endpoint: str = ""  # NEW: standalone only: POST each staged analytics file to this http(s) URL


@dataclass(frozen=True)
class AuthConfig:
    api_key_claim: str = ""
    api_key_cache_duration: float = DEFAULT_API_KEY_CACHE_DURATION
    api_key_header: str = DEFAULT_API_KEY_HEADER  # lowercased at load: Envoy lowercases header keys
    api_header: str = DEFAULT_API_HEADER
    allow_unauthorized: bool = False
    jwt_provider_key: str = ""
    append_metadata_headers: bool = False
    api_key_verify_wait: float = DEFAULT_API_KEY_VERIFY_WAIT  # NEW: Check's wait for an uncached key
    api_key_verify_rate: int = DEFAULT_API_KEY_VERIFY_RATE  # NEW: fallback calls/s with a key index
    jwt_providers: tuple[JwtProvider, ...] = ()  # NEW: issuers whose bearer tokens are validated here
    quota_headers: bool = False  # NEW: ratelimit-* headers on allowed responses too (always on a 429)
    quota_sync_wait: float = DEFAULT_QUOTA_SYNC_WAIT  # NEW: Check's wait for a quota sync in flight
    quota_metrics_per_id: bool = False  # NEW: a quota_remaining gauge per quota identifier


@dataclass(frozen=True)
class Config:
    path: str
    global_: GlobalConfig
    tenant: TenantConfig
    products: ProductsConfig
    analytics: AnalyticsConfig
    auth: AuthConfig
    policy_secret: PolicySecret | None = field(default=None, repr=False)
    analytics_secret_json: str | None = field(default=None, repr=False)

    @property
    def standalone(self) -> bool:
        return self.tenant.catalog_file != ""


def load_config(
    path: str | os.PathLike[str],
    policy_secret_dir: str | None = None,
    analytics_secret_dir: str | None = None,
) -> Config:
    """Read, parse and validate the config file at ``path``; raises ``ConfigError``.

    The policy secret comes from the file's Kubernetes Secret, else from ``policy_secret_dir`` (files
    ``remote-service.key``, ``.properties``, ``.crt``), as with the Go adapter's ``--policy-secret``. The
    analytics service-account JSON likewise comes from the file's analytics Secret, else from
    ``{analytics_secret_dir}/client_secret.json`` (the Go adapter's ``--analytics-secret``; a missing file
    is an error unless the directory is ``DEFAULT_ANALYTICS_SECRET_DIR``).
    """
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", "cannot read: not UTF-8 text") from exc
    raw, policy, analytics_json = split_documents(file, text)
    if policy is None and policy_secret_dir and os.path.isdir(policy_secret_dir):
        policy = policy_secret_dir_reader(policy_secret_dir)
    if analytics_json is None and analytics_secret_dir:
        required = analytics_secret_dir != DEFAULT_ANALYTICS_SECRET_DIR  # the Go adapter's rule
        analytics_json = analytics_secret_reader(analytics_secret_dir, required)
    top = Section(file, "", raw, SECTIONS, os.path.dirname(os.path.abspath(file)))
    config = Config(
        path=os.path.abspath(file),
        global_=_global(top.child("global", GlobalConfig)),
        tenant=_tenant(top.child("tenant", TenantConfig)),
        products=_products(top.child("products", ProductsConfig)),
        analytics=_analytics(top.child("analytics", AnalyticsConfig)),
        auth=_auth(top.child("auth", AuthConfig)),
        policy_secret=policy,
        analytics_secret_json=analytics_json,
    )
    return _cross_check(file, config)


def _cross_check(file: str, config: Config) -> Config:
    api, metrics, tenant = config.global_.api_address, config.global_.metrics_address, config.tenant
    if api.port and api == metrics:
        raise ConfigError(file, "global.metrics_address", f"same as global.api_address ({api})")
    checks = config.global_.http_authz_address
    for name, other in (("api_address", api), ("metrics_address", metrics)):
        if checks is not None and checks.port and checks == other:
            raise ConfigError(file, "global.http_authz_address", f"same as global.{name} ({other})")
    if not config.standalone:
        return _check_apigee(file, _check_key_sync(file, config))
    if tenant.key_sync:
        raise ConfigError(
            file, "tenant.key_sync_interval", "only for Apigee mode (tenant.catalog_file is set)"
        )
    if not tenant.env_name:
        raise ConfigError(file, "tenant.env_name", "required when tenant.catalog_file is set")
    if not tenant.org_name:
        return replace(config, tenant=replace(tenant, org_name=DEFAULT_STANDALONE_ORG))
    return config


def _check_apigee(file: str, config: Config) -> Config:
    tenant = config.tenant
    for name in ("remote_service_api", "org_name", "env_name"):
        if not getattr(tenant, name):
            raise ConfigError(file, f"tenant.{name}", APIGEE_ONLY)
    if config.analytics.endpoint:
        raise ConfigError(
            file,
            "analytics.endpoint",
            "only for standalone mode (tenant.catalog_file set); in Apigee mode analytics go to Apigee",
        )
    if tenant.gcp_managed and config.policy_secret is None:
        raise ConfigError(
            file,
            "tenant.internal_api",
            "empty, so this is Apigee X or hybrid, whose calls are signed with the provisioned key: add the "
            "policy Secret to this file or mount remote-service.key, remote-service.properties and "
            "remote-service.crt in the --policy-secret directory (or set internal_api, key and secret for "
            "legacy Apigee SaaS or OPDK)",
        )
    if not tenant.gcp_managed and config.analytics_secret_json is not None:
        raise ConfigError(
            file,
            "tenant.internal_api",
            "set, so this is legacy Apigee SaaS or OPDK, whose analytics use Basic auth, but an analytics "
            "service-account Secret (client_secret.json) is given too; it is for Apigee X or hybrid only: "
            "remove one (the Go adapter refuses both as mutually exclusive)",
        )
    if not tenant.gcp_managed:
        for name in ("key", "secret"):
            if not getattr(tenant, name):
                raise ConfigError(
                    file, f"tenant.{name}", "required when tenant.internal_api is set (Basic auth)"
                )
    if not tenant.remote_token_jwks_url:
        tenant = replace(tenant, remote_token_jwks_url=remote_token_jwks_url(tenant.remote_service_api))
    auth = config.auth
    apigee = apigee_provider(tenant.remote_service_api, tenant.remote_token_jwks_url)
    if all(p.issuer != apigee.issuer for p in auth.jwt_providers):
        names = {p.name for p in auth.jwt_providers}
        name = apigee.name if apigee.name not in names else f"{apigee.name}-remote-token"
        auth = replace(auth, jwt_providers=(replace(apigee, name=name), *auth.jwt_providers))
    return replace(config, tenant=tenant, auth=auth)


def _check_key_sync(file: str, config: Config) -> Config:
    """The key index's management access: Google credentials on Apigee X/hybrid, Basic auth on Edge."""
    tenant = config.tenant
    edge = bool(tenant.internal_api)
    for name in ("management_user", "management_password"):
        if getattr(tenant, name) and not (edge and tenant.key_sync):
            raise ConfigError(
                file,
                f"tenant.{name}",
                "only for legacy Edge (tenant.internal_api set) with tenant.key_sync_interval; Apigee X and "
                "hybrid list apps with Google credentials (the analytics service account or ADC)",
            )
    if not (edge and tenant.key_sync):
        return config
    for name in ("management_user", "management_password"):
        if not getattr(tenant, name):
            raise ConfigError(
                file, f"tenant.{name}", "required for tenant.key_sync_interval on legacy Edge (Basic auth)"
            )
    if tenant.management_api == DEFAULT_MANAGEMENT_API:
        raise ConfigError(
            file,
            "tenant.management_api",
            f"set it to your Edge management API ({EDGE_MANAGEMENT_API} for Edge SaaS) for "
            "tenant.key_sync_interval on legacy Edge",
        )
    return config


def remote_token_jwks_url(remote_service_api: str) -> str:
    """``https://host/remote-service`` -> ``https://host/remote-token/certs`` (the provisioned proxies)."""
    parts = urlsplit(remote_service_api.rstrip("/"))
    base = parts.path.rsplit("/", 1)[0] if parts.path.endswith("/remote-service") else parts.path
    return f"{parts.scheme}://{parts.netloc}{base}/remote-token/certs"


def _global(s: Section) -> GlobalConfig:
    tls = s.child("tls", ServerTLS)
    return GlobalConfig(
        api_address=s.address("api_address", DEFAULT_API_ADDRESS),
        metrics_address=s.address("metrics_address", DEFAULT_METRICS_ADDRESS),
        http_authz_address=s.address("http_authz_address", "") if s.text("http_authz_address") else None,
        temp_dir=s.text("temp_dir", DEFAULT_TEMP_DIR, required=True),
        keep_alive_max_connection_age=s.duration(
            "keep_alive_max_connection_age", DEFAULT_KEEP_ALIVE_MAX_CONNECTION_AGE, positive=True
        ),
        tls=ServerTLS(*tls.file_set(("cert_file", "key_file"))),
        graceful_shutdown_timeout=s.duration("graceful_shutdown_timeout", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT),
    )


def _tenant(s: Section) -> TenantConfig:
    tls = s.child("tls", TenantTLS)
    ca_file, cert_file, key_file = tls.file_set(("ca_file", "cert_file", "key_file"))
    return TenantConfig(
        internal_api=s.url("internal_api"),
        remote_service_api=s.url("remote_service_api"),
        org_name=s.text("org_name"),
        env_name=s.text("env_name"),
        key=s.text("key"),
        secret=s.text("secret"),
        client_timeout=s.duration("client_timeout", DEFAULT_CLIENT_TIMEOUT, positive=True),
        tls=TenantTLS(ca_file, cert_file, key_file, tls.flag("allow_unverified_ssl_cert")),
        catalog_file=s.file_path("catalog_file"),
        catalog_poll_interval=s.duration(
            "catalog_poll_interval", DEFAULT_CATALOG_POLL_INTERVAL, MIN_CATALOG_POLL_INTERVAL
        ),
        remote_token_jwks_url=s.url("remote_token_jwks_url"),
        management_api=s.url("management_api", DEFAULT_MANAGEMENT_API, required=True),
        key_sync_interval=_key_sync_interval(s),
        management_user=s.text("management_user"),
        management_password=s.text("management_password"),
    )


def _key_sync_interval(s: Section) -> float:
    interval = s.duration("key_sync_interval", 0.0)
    if 0 < interval < MIN_KEY_SYNC_INTERVAL:
        raise s.error(
            "key_sync_interval", f"must be 0s (off) or at least {format_duration(MIN_KEY_SYNC_INTERVAL)}"
        )
    if 0 < interval < KEY_SYNC_WARN_BELOW:
        _log.warning(
            "%s: tenant.key_sync_interval %s is below 1m; every sync lists every app of the org",
            s.file,
            format_duration(interval),
        )
    return interval


def _products(s: Section) -> ProductsConfig:
    rate = s.duration("refresh_rate", DEFAULT_PRODUCTS_REFRESH, MIN_PRODUCTS_REFRESH)
    if rate < PRODUCTS_REFRESH_WARN_BELOW:
        _log.warning(
            "%s: products.refresh_rate %s is below 1m (the Go adapter's minimum); "
            "every refresh downloads all API products from Apigee",
            s.file,
            format_duration(rate),
        )
    return ProductsConfig(refresh_rate=rate)


def _analytics(s: Section) -> AnalyticsConfig:
    collection = s.duration(
        "collection_interval", DEFAULT_ANALYTICS_COLLECTION_INTERVAL, MIN_COLLECTION_INTERVAL
    )
    flush = s.duration("flush_interval", DEFAULT_ANALYTICS_FLUSH_INTERVAL, MIN_ANALYTICS_FLUSH_INTERVAL)
    if flush > collection:
        raise s.error(
            "flush_interval", f"must be at most collection_interval ({format_duration(collection)})"
        )
    return AnalyticsConfig(
        legacy_endpoint=s.flag("legacy_endpoint"),
        file_limit=s.integer("file_limit", DEFAULT_ANALYTICS_FILE_LIMIT, 1),
        send_channel_size=s.integer("send_channel_size", DEFAULT_ANALYTICS_SEND_CHANNEL_SIZE, 1),
        collection_interval=collection,
        disk_limit_mb=s.integer("disk_limit_mb", DEFAULT_ANALYTICS_DISK_LIMIT_MB, 1),
        flush_interval=flush,
        endpoint=_endpoint_url(s),
    )


def _endpoint_url(s: Section) -> str:
    """``analytics.endpoint``: an http(s) URL without ``user:password@`` (httpx would send it as Basic auth,
    and the effective config would print it)."""
    url = s.url("endpoint")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise s.error("endpoint", "must not carry credentials (user:password@)")
    return url


def _auth(s: Section) -> AuthConfig:
    return AuthConfig(
        api_key_claim=s.text("api_key_claim"),
        api_key_cache_duration=s.duration("api_key_cache_duration", DEFAULT_API_KEY_CACHE_DURATION),
        api_key_header=s.text("api_key_header", DEFAULT_API_KEY_HEADER, required=True).lower(),
        api_header=s.text("api_header", DEFAULT_API_HEADER, required=True).lower(),
        allow_unauthorized=s.flag("allow_unauthorized"),
        jwt_provider_key=s.text("jwt_provider_key"),
        append_metadata_headers=s.flag("append_metadata_headers"),
        api_key_verify_wait=s.duration("api_key_verify_wait", DEFAULT_API_KEY_VERIFY_WAIT, positive=True),
        api_key_verify_rate=s.integer("api_key_verify_rate", DEFAULT_API_KEY_VERIFY_RATE, 1),
        jwt_providers=parse_providers(s.items("jwt_providers", JwtProvider)),
        quota_headers=s.flag("quota_headers"),
        quota_sync_wait=s.duration("quota_sync_wait", DEFAULT_QUOTA_SYNC_WAIT, positive=True),
        quota_metrics_per_id=s.flag("quota_metrics_per_id"),
    )


def effective_config(config: Config) -> dict[str, object]:
    """The config as loaded, in the file's own shape: Go key names, Go-style durations, secrets masked."""
    result: dict[str, object] = {
        "global": _render(config.global_),
        "tenant": _render(config.tenant),
        "products": _render(config.products),
        "analytics": _render(config.analytics),
        "auth": _render(config.auth),
    }
    if config.policy_secret is not None:
        result["policy_secret"] = _render(config.policy_secret)
    if config.analytics_secret_json is not None:
        result["analytics_secret"] = MASK
    return result


def _render(obj: DataclassInstance) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not f.repr:  # the secret fields
            value = MASK if value else ""
        elif isinstance(value, float):  # every float field is a duration in seconds
            value = format_duration(value)
        elif isinstance(value, Address):
            value = str(value)
        elif value is None:  # an optional address left off
            value = ""
        elif is_dataclass(value) and not isinstance(value, type):
            value = _render(value)
        elif isinstance(value, tuple):  # lists in the file
            value = [_render(v) if is_dataclass(v) and not isinstance(v, type) else v for v in value]
        out[f.name] = value
    return out
