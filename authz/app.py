"""The composition root and lifecycle: the only module that builds the long-lived service objects.

Config -> metrics -> catalog (a local file, or Apigee: client, product poller, key cache) -> decision policy
-> servicers -> grpc.aio server + HTTP side port.
Shutdown order (SIGTERM/SIGINT): report NOT_SERVING and unready, let in-flight RPCs finish within
``global.graceful_shutdown_timeout``, stop background loops, close the HTTP port. A second SIGINT exits
at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from typing import Any, Literal

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from grpc_health.v1 import health_pb2_grpc

from authz.analytics.adopt import adopt_orphans, worker_temp_dir
from authz.analytics.buffer import Buffer
from authz.analytics.uploader import Uploader
from authz.apigee.analytics import AnalyticsClient, new_endpoint_http_client
from authz.apigee.catalog import ApigeeCatalog
from authz.apigee.client import ApigeeClient, new_google_http_client, new_http_client
from authz.apigee.google_token import GoogleTokens, service_account_credentials
from authz.apigee.jwks import RemoteTokenKeys
from authz.apigee.key_lookup import IndexedKeys
from authz.apigee.key_sync import KeySync
from authz.apigee.keys import ApiKeyCache
from authz.apigee.management import ManagementClient
from authz.apigee.signer import Authorizer, BasicAuthorizer, InternalJWTAuthorizer
from authz.clock import Clock, SystemClock
from authz.config import Config
from authz.decision.model import Catalog, Policy
from authz.errors import ConfigError, ListenError
from authz.jwt.fetch import JwksSource
from authz.jwt.fetch import new_http_client as new_jwks_client
from authz.jwt.jwks import JwksCache
from authz.jwt.validate import Rules
from authz.jwt.verifier import BearerTokens, Provider
from authz.metrics import Metrics, new_metrics
from authz.quota.manager import QuotaManager
from authz.server import codec, http_codec
from authz.server.accesslog import AccessLogServicer
from authz.server.authorization import AuthorizationServicer, add_to_server
from authz.server.check import Checker, Codec
from authz.server.health import Health
from authz.server.http import HttpEndpoints, server_ssl_context
from authz.server.http_check import HttpCheckServer
from authz.standalone.watcher import LocalCatalog
from authz.workers import Role

log = logging.getLogger(__name__)

READINESS_POLL = 0.5  # seconds between readiness checks (a catalog arriving after start-up)
QUOTA_FLUSH_TIMEOUT = 5.0  # seconds to send unsynced quota weight at shutdown
ANALYTICS_FLUSH_TIMEOUT = 5.0  # seconds for the last upload attempt of staged analytics files


def policy_from(config: Config) -> Policy:
    auth = config.auth
    return Policy(
        org=config.tenant.org_name,
        env=config.tenant.env_name,
        api_key_header=auth.api_key_header,
        api_header=auth.api_header,
        allow_unauthorized=auth.allow_unauthorized,
        append_metadata_headers=auth.append_metadata_headers,
        api_key_claim=auth.api_key_claim,
        jwt_provider_key=auth.jwt_provider_key,
        token_headers=tuple(
            dict.fromkeys((p.header, p.prefix.lower()) for p in auth.jwt_providers if not p.forward)
        ),
    )


def authorizer_from(config: Config, clock: Clock) -> Authorizer:
    """How calls to Apigee authenticate; a policy key that cannot sign fails start-up."""
    tenant, secret = config.tenant, config.policy_secret
    if not tenant.gcp_managed or secret is None:
        return BasicAuthorizer(tenant.key, tenant.secret)
    authorizer = InternalJWTAuthorizer(secret.kid, secret.private_key_pem, clock)
    try:
        authorizer.authorization()
    except Exception as exc:  # pyjwt/cryptography raise several types for a bad key
        raise ConfigError(config.path, "policy_secret", f"remote-service.key cannot sign: {exc}") from None
    return authorizer


def snapshot_path(config: Config) -> str:
    """Where the last good product list is kept for a cold start while Apigee is unreachable."""
    tenant = config.tenant
    env = "multi-tenant" if tenant.multi_tenant else tenant.env_name
    return os.path.join(config.global_.temp_dir, "products", f"{tenant.org_name}~{env}.json")


def key_snapshot_path(config: Config) -> str:
    """Where the last good key index (digests, never keys) is kept for a cold start; one per org."""
    return os.path.join(config.global_.temp_dir, "keys", f"{config.tenant.org_name}.json")


class _Tokens:
    """Bearer-token validation for ``auth.jwt_providers``: one JWKS cache per provider.

    The Apigee remote-token provider shares the key cache that checks ``/verifyApiKey`` tokens (same
    JWKS, fetched through the Apigee client); other issuers' keys come over a client with default TLS.
    """

    def __init__(self, config: Config, metrics: Metrics, clock: Clock, apigee: _Apigee | None) -> None:
        org = config.tenant.org_name
        self.http = new_jwks_client(config.tenant.client_timeout)
        providers, self.caches = [], []
        for p in config.auth.jwt_providers:
            keys: JwksCache
            if apigee is not None and p.jwks_uri == config.tenant.remote_token_jwks_url:
                keys = apigee.jwks  # started and stopped with Apigee
            else:
                uri = p.jwks_uri or None
                source = JwksSource(self.http, p.issuer, uri, metrics=metrics, org=org, provider=p.name)
                keys = JwksCache(
                    source, org, p.name, metrics, clock,
                    refresh_interval=p.refresh_interval, unknown_kid_cooldown=p.unknown_kid_cooldown,
                )  # fmt: skip
                self.caches.append(keys)
            rules = Rules(p.issuer, frozenset(p.audiences), frozenset(p.algorithms), p.clock_skew)
            providers.append(Provider(p, rules, keys))
        self.tokens = BearerTokens(providers, org, metrics, clock)

    async def start(self) -> list[asyncio.Task[None]]:
        await asyncio.gather(*(cache.refresh() for cache in self.caches))
        return [asyncio.create_task(cache.run(), name="jwks-refresh") for cache in self.caches]

    def stop(self) -> None:
        for cache in self.caches:
            cache.stop()

    async def close(self) -> None:
        await asyncio.gather(*(cache.close() for cache in self.caches))
        await self.http.aclose()


class _Analytics:
    """Analytics records: the durable buffer under ``global.temp_dir``, the access-log servicer that fills
    it, and the uploader that empties it: to Apigee, or standalone to ``analytics.endpoint`` (with an HTTP
    client of its own). Standalone without an endpoint, or on Apigee X/hybrid without Google credentials,
    the staged gzip NDJSON files stay on disk (rotated every ``analytics.collection_interval``, oldest
    dropped past the disk cap)."""

    def __init__(
        self, config: Config, metrics: Metrics, clock: Clock, apigee: _Apigee | None, role: Role | None
    ) -> None:
        org = config.tenant.org_name
        self._role = role
        self.buffer = Buffer(
            worker_temp_dir(config.global_.temp_dir, role.index if role is not None else 0),
            org,
            metrics,
            clock,
            flush_interval=config.analytics.flush_interval,
            collection_interval=config.analytics.collection_interval,
            max_bytes=config.analytics.disk_limit_mb << 20,
            max_files=config.analytics.file_limit,
        )
        self.servicer = AccessLogServicer(
            self.buffer, metrics, org, clock, config.global_.keep_alive_max_connection_age
        )
        self.uploader: Uploader[Any] | None = None
        self.google = apigee.google if apigee is not None else None  # closed with _Apigee
        self._client = client = _analytics_client(config, metrics, apigee, self.google)
        if client is not None:
            self.uploader = Uploader(self.buffer, client, org, metrics, clock)
        self._config = config

    async def start(self) -> list[asyncio.Task[None]]:
        role = self._role
        if role is None or role.index == 0:  # files of workers that no longer run (after scaling down)
            await asyncio.to_thread(adopt_orphans, self._config.global_.temp_dir, role.count if role else 1)
        await self.buffer.recover()  # files a crash left behind, each for its own org and env
        tasks = [asyncio.create_task(self.buffer.run(), name="analytics-buffer")]
        if self.google is not None and not await self.google.load():  # ADC: a worker thread
            log.warning(
                "analytics upload to %s needs Google credentials and there are none (no analytics Secret "
                "client_secret.json, no Application Default Credentials): records stay staged under %s",
                self._config.tenant.management_api,
                self._config.global_.temp_dir,
            )
            self.uploader = None
        if self.uploader is not None:
            tasks.append(asyncio.create_task(self.uploader.run(), name="analytics-uploader"))
        return tasks

    async def close(self, within: float) -> None:
        """Stage everything, then one bounded upload attempt per staged file."""
        await self.buffer.close()
        if self.uploader is not None:
            await self.uploader.final_attempt(within)
            self.uploader.stop()

    async def close_http(self) -> None:
        """After the background tasks ended: the connections of the ``analytics.endpoint`` client (the
        Apigee kinds share ``_Apigee``'s clients, closed with it)."""
        if self._client is not None:
            await self._client.aclose()


def google_tokens_from(config: Config, clock: Clock, metrics: Metrics | None = None) -> GoogleTokens:
    """The Google credentials of Apigee X/hybrid analytics: the analytics Secret's service account, else
    Application Default Credentials (searched at start). A Secret google-auth cannot use fails start-up."""
    org = config.tenant.org_name
    if config.analytics_secret_json is None:
        return GoogleTokens(clock, timeout=config.tenant.client_timeout, metrics=metrics, org=org)
    try:
        credentials = service_account_credentials(config.analytics_secret_json)
    except ValueError as exc:
        raise ConfigError(config.path, "analytics_secret", f"client_secret.json: {exc}") from None
    email = getattr(credentials, "service_account_email", None) or type(credentials).__name__
    log.info("Google credentials for analytics: service account %s", email)
    return GoogleTokens(clock, credentials, timeout=config.tenant.client_timeout, metrics=metrics, org=org)


def _analytics_client(
    config: Config, metrics: Metrics, apigee: _Apigee | None, google: GoogleTokens | None
) -> AnalyticsClient | None:
    """Where records go in Apigee mode: ``axpublisher`` (``analytics.legacy_endpoint``), the legacy signed
    URL (``tenant.internal_api``), or Apigee X/hybrid's ``datalocation`` on ``tenant.management_api`` with
    a Google token (``google``). Standalone: ``analytics.endpoint`` when set, else nowhere (None)."""
    if apigee is None:
        if not config.analytics.endpoint:
            return None
        endpoint = config.analytics.endpoint
        log.info("analytics: staged files are POSTed to %s", endpoint)
        http = new_endpoint_http_client()
        return AnalyticsClient(http, "endpoint", endpoint, metrics, owns_http=True)
    internal = config.tenant.internal_api
    if not internal:
        assert google is not None and apigee.google_http is not None
        base = config.tenant.management_api
        return AnalyticsClient(apigee.google_http, "gcp", base, metrics, token=google)
    kind: Literal["legacy", "axpublisher"] = "axpublisher" if config.analytics.legacy_endpoint else "legacy"
    return AnalyticsClient(apigee.http, kind, internal, metrics, authorizer=apigee.authorizer)


class _Apigee:
    """The Apigee control plane of one service: HTTP clients, Google credentials (Apigee X/hybrid), product
    poller, JWKS, key cache and, with ``tenant.key_sync_interval``, the key index in front of it."""

    def __init__(self, config: Config, metrics: Metrics, clock: Clock) -> None:
        tenant, org = config.tenant, config.tenant.org_name
        self.http = new_http_client(tenant)
        # Apigee X/hybrid analytics go to Google's public endpoints, with their own TLS (not tenant.tls).
        timeout = tenant.client_timeout
        self.google_http = new_google_http_client(timeout) if tenant.gcp_managed else None
        self.authorizer = authorizer_from(config, clock)  # Apigee's own calls and legacy analytics uploads
        self.client = client = ApigeeClient(
            self.http,
            tenant.remote_service_api,
            self.authorizer,
            metrics,
            org,
            tenant.env_name,
        )
        self.catalog = ApigeeCatalog(
            client, org, metrics, clock, config.products.refresh_rate, snapshot_path(config)
        )
        self.jwks = RemoteTokenKeys(client, tenant.remote_token_jwks_url, org, metrics, clock)
        self.cache = ApiKeyCache(
            client, self.jwks, org, metrics, clock, cache_duration=config.auth.api_key_cache_duration
        )
        # Apigee X/hybrid: analytics uploads and the key index's listings use these credentials.
        self.google = google_tokens_from(config, clock, metrics) if tenant.gcp_managed else None
        self.keys: ApiKeyCache | IndexedKeys = self.cache
        self.key_sync: KeySync | None = None
        self.indexed: IndexedKeys | None = None
        self.management: ManagementClient | None = None
        if tenant.key_sync:
            self.management = self._management(config, metrics)
            self.key_sync = KeySync(
                self.management, org, metrics, clock, tenant.key_sync_interval, key_snapshot_path(config)
            )
            self.keys = self.indexed = IndexedKeys(
                self.key_sync, self.cache, org, metrics, clock, config.auth.api_key_verify_rate
            )

    def _management(self, config: Config, metrics: Metrics) -> ManagementClient:
        """Apigee X/hybrid: Google's API with the Google credentials; legacy Edge: Basic auth (a public
        endpoint too, so the system's trust roots rather than ``tenant.tls``)."""
        tenant = config.tenant
        if self.google is not None and self.google_http is not None:
            return ManagementClient(
                self.google_http, tenant.management_api, tenant.org_name, self.google, metrics
            )
        http = new_google_http_client(tenant.client_timeout)
        basic = (tenant.management_user, tenant.management_password)
        return ManagementClient(
            http, tenant.management_api, tenant.org_name, None, metrics, basic=basic, owns_http=True
        )

    async def start(self) -> list[asyncio.Task[None]]:
        restore = self.key_sync.restore() if self.key_sync is not None else asyncio.sleep(0)
        await asyncio.gather(self.catalog.load(), self.jwks.refresh(), restore)
        tasks = [
            asyncio.create_task(self.catalog.run(), name="products-poller"),
            asyncio.create_task(self.jwks.run(), name="jwks-refresh"),
        ]
        if self.key_sync is not None:  # the first full listing runs now, in the background
            tasks.append(asyncio.create_task(self.key_sync.run(), name="key-sync"))
        return tasks

    def stop(self) -> None:
        self.catalog.stop()
        self.jwks.stop()
        if self.key_sync is not None:
            self.key_sync.stop()

    async def close(self) -> None:
        if self.indexed is not None:
            await self.indexed.close()
        await self.cache.close()
        await self.http.aclose()
        if self.google_http is not None:
            await self.google_http.aclose()
        if self.management is not None:
            await self.management.aclose()
        if self.google is not None:
            self.google.close()


def _grpc_options(config: Config, shared: bool = False) -> list[tuple[str, int]]:
    age_ms = int(config.global_.keep_alive_max_connection_age * 1000)
    return [
        # Recycle connections so long-lived streams rebalance across replicas (Go adapter issue #77).
        ("grpc.max_connection_age_ms", age_ms),
        ("grpc.max_connection_age_grace_ms", int(config.global_.graceful_shutdown_timeout * 1000)),
        # Two servers must never share a port silently; only the workers of one supervisor do (its
        # pre-flight check made sure nothing else listens there).
        ("grpc.so_reuseport", 1 if shared else 0),
    ]


def _server_tls(config: Config) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
    tls = config.global_.tls
    if not tls.cert_file:
        return None, None
    with open(tls.key_file, "rb") as key, open(tls.cert_file, "rb") as cert:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    return credentials, server_ssl_context(tls)


class Service:
    """One running service: start() binds the ports, stop() drains and closes.

    With a ``role`` it is one worker of ``authz serve --workers N`` (``authz.workers``): the gRPC and HTTP
    check ports are shared with the other workers (SO_REUSEPORT), the metrics and probes are served on the
    role's private unix socket for the supervisor, and analytics go to the worker's own directory.
    """

    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        role: Role | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.clock = clock or SystemClock()
        self.metrics = metrics or new_metrics()
        org = config.tenant.org_name
        self.apigee: _Apigee | None = None
        self.local: LocalCatalog | None = None
        if config.standalone:
            self.local = LocalCatalog(
                config.tenant.catalog_file, org, self.metrics, self.clock, config.tenant.catalog_poll_interval
            )
            self.current_catalog: Callable[[], Catalog | None] = self.local.current
        else:
            self.apigee = _Apigee(config, self.metrics, self.clock)
            self.current_catalog = self.apigee.catalog.current
        self.jwt: _Tokens | None = None
        if config.auth.jwt_providers:
            self.jwt = _Tokens(config, self.metrics, self.clock, self.apigee)
        self.health = Health(lambda: self.current_catalog() is not None, self.metrics, self._details)
        self.analytics = _Analytics(config, self.metrics, self.clock, self.apigee, role)
        self.quotas = QuotaManager(
            self.metrics,
            org,
            self.clock,
            self.apigee.client if self.apigee is not None else None,
            wait=config.auth.quota_sync_wait,
            per_id_metrics=config.auth.quota_metrics_per_id,
        )
        self.authorization = AuthorizationServicer(self._checker(codec))
        self.http_checks: HttpCheckServer | None = None
        if config.global_.http_authz_address is not None:
            self.http_checks = HttpCheckServer(self._checker(http_codec))
        self.grpc_port = 0
        self.http_authz_port = 0
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._readiness: asyncio.Task[None] | None = None

    def _checker(self, codec: Codec) -> Checker:
        """The check flow over one transport; every edge shares the catalog, caches, quotas and buffer."""
        config = self.config
        return Checker(
            codec,
            self.current_catalog,
            policy_from(config),
            self.metrics,
            self.clock,
            keys=self.apigee.keys if self.apigee is not None else None,
            verify_wait=config.auth.api_key_verify_wait,
            tokens=self.jwt.tokens if self.jwt is not None else None,
            quotas=self.quotas,
            quota_headers=config.auth.quota_headers,
            analytics=self.analytics.buffer,
        )

    def _details(self) -> dict[str, str]:
        apigee = self.apigee
        if apigee is None:
            return {"catalog_source": "file"}
        if apigee.catalog.current() is None:
            details = {"catalog_source": "none"}
        else:
            details = {"catalog_source": "snapshot" if apigee.catalog.from_snapshot else "apigee"}
        if apigee.key_sync is not None:
            details["key_index_source"] = apigee.key_sync.source
        return details

    async def start(self) -> None:
        """Load the catalog, then open both ports.

        A bad local catalog fails start-up with CatalogError. In Apigee mode start-up never waits on an
        outage: without products (and no snapshot) the service starts unready and Check answers 503.
        """
        if self.local is not None:
            await asyncio.to_thread(self.local.load)
            self._tasks.append(asyncio.create_task(self.local.run(), name="catalog-watcher"))
        elif self.apigee is not None:
            self._tasks.extend(await self.apigee.start())
        if self.jwt is not None:
            self._tasks.extend(await self.jwt.start())
        self._tasks.append(asyncio.create_task(self.quotas.run(), name="quota-sync"))
        self._tasks.extend(await self.analytics.start())
        credentials, http_tls = _server_tls(self.config)
        shared = self.role is not None
        server = grpc.aio.server(options=_grpc_options(self.config, shared))
        add_to_server(self.authorization, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.analytics.servicer, server)
        target = self.config.global_.api_address.grpc_target()
        try:
            if credentials is None:
                self.grpc_port = server.add_insecure_port(target)
            else:
                self.grpc_port = server.add_secure_port(target, credentials)
        except RuntimeError as exc:  # grpc reports a bind failure this way
            raise ListenError(f"cannot listen on {target} (global.api_address): {exc}") from None
        await server.start()
        self._server = server
        address = self.config.global_.metrics_address
        endpoints = HttpEndpoints(self.health, self.metrics)
        try:
            if self.role is not None:
                self._http = await endpoints.start_unix(self.role.socket)
            else:
                self._http = await endpoints.start(address.http_host(), address.port, http_tls)
        except OSError as exc:
            await server.stop(0)
            raise ListenError(
                f"cannot listen on {address} (global.metrics_address): {exc.strerror}"
            ) from None
        if self.role is None:
            self.http_port = self._http.sockets[0].getsockname()[1]
        checks = self.config.global_.http_authz_address
        if self.http_checks is not None and checks is not None:
            try:
                self.http_authz_port = await self.http_checks.start(
                    checks.http_host(), checks.port, http_tls, reuse_port=shared
                )
            except OSError as exc:
                await server.stop(0)
                self._http.close()
                raise ListenError(
                    f"cannot listen on {checks} (global.http_authz_address): {exc.strerror}"
                ) from None
        self._readiness = asyncio.create_task(self._publish_readiness(), name="readiness")
        await self.health.refresh()
        metrics = f"port {self.http_port}" if self.role is None else self.role.socket
        log.info("serving ext_authz on %s (port %d), metrics on %s", target, self.grpc_port, metrics)
        if checks is not None:
            log.info("serving HTTP ext_authz on %s (port %d)", checks, self.http_authz_port)

    async def stop(self) -> None:
        """Drain: unready first, then let in-flight RPCs finish, then stop loops and ports."""
        await self.health.drain()
        grace = self.config.global_.graceful_shutdown_timeout
        draining = [self.http_checks.stop(grace)] if self.http_checks is not None else []
        if self._server is not None:
            draining.append(self._server.stop(grace))
        await asyncio.gather(*draining)  # both edges drain at once, within one grace period
        await self.quotas.flush(QUOTA_FLUSH_TIMEOUT)  # weight admitted but not synced yet goes to Apigee
        await self.analytics.close(ANALYTICS_FLUSH_TIMEOUT)
        if self.local is not None:
            self.local.stop()
        if self.apigee is not None:
            self.apigee.stop()
        if self.jwt is not None:
            self.jwt.stop()
        if self._readiness is not None:
            self._readiness.cancel()
        for task in self._tasks:
            try:
                async with asyncio.timeout(5):
                    await task
            except TimeoutError:
                task.cancel()
        if self.jwt is not None:
            await self.jwt.close()
        if self.apigee is not None:
            await self.apigee.close()
        await self.analytics.close_http()
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        log.info("stopped")

    async def _publish_readiness(self) -> None:
        """Follow the catalog into gRPC health: a service that started without products becomes ready
        when the first load arrives."""
        ready = self.health.ready
        while True:
            await asyncio.sleep(READINESS_POLL)
            if self.health.ready != ready and not self.health.draining:
                ready = self.health.ready
                await self.health.refresh()


class _Supervisor(asyncio.Protocol):
    """A worker's stdin: a pipe its supervisor holds and never writes. EOF means the supervisor is gone
    (even killed with SIGKILL): drain as on SIGTERM rather than serve on, unsupervised."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop

    def eof_received(self) -> bool | None:
        self.connection_lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._stop.is_set():
            log.warning("the supervisor is gone: draining")
            self._stop.set()


async def serve(config: Config, role: Role | None = None) -> int:
    """Run until SIGTERM or SIGINT (a worker: or its supervisor's exit), then shut down in order. Returns
    the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            log.warning("second interrupt: exiting now")
            os._exit(130)
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if role is not None:
        await loop.connect_read_pipe(lambda: _Supervisor(stop), sys.stdin)
    service = Service(config, role=role)
    await service.start()
    await stop.wait()
    await service.stop()
    return 0
