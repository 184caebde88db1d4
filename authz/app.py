"""The composition root and lifecycle: the only module that builds the long-lived service objects.

Config -> metrics -> catalog -> decision policy -> servicers -> grpc.aio server + HTTP side port.
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

import grpc
from grpc_health.v1 import health_pb2_grpc

from authz.clock import Clock, SystemClock
from authz.config import Config
from authz.decision.model import Policy
from authz.errors import ListenError
from authz.metrics import Metrics, new_metrics
from authz.server.authorization import AuthorizationServicer, add_to_server
from authz.server.health import Health
from authz.server.http import HttpEndpoints
from authz.standalone.watcher import LocalCatalog

log = logging.getLogger(__name__)


def policy_from(config: Config) -> Policy:
    auth = config.auth
    return Policy(
        org=config.tenant.org_name,
        env=config.tenant.env_name,
        api_key_header=auth.api_key_header,
        api_header=auth.api_header,
        allow_unauthorized=auth.allow_unauthorized,
        append_metadata_headers=auth.append_metadata_headers,
    )


def _grpc_options(config: Config) -> list[tuple[str, int]]:
    age_ms = int(config.global_.keep_alive_max_connection_age * 1000)
    return [
        # Recycle connections so long-lived streams rebalance across replicas (Go adapter issue #77).
        ("grpc.max_connection_age_ms", age_ms),
        ("grpc.max_connection_age_grace_ms", int(config.global_.graceful_shutdown_timeout * 1000)),
        # Two servers must never share a port silently.
        ("grpc.so_reuseport", 0),
    ]


def _server_tls(config: Config) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
    tls = config.global_.tls
    if not tls.cert_file:
        return None, None
    with open(tls.key_file, "rb") as key, open(tls.cert_file, "rb") as cert:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return credentials, context


class Service:
    """One running service: start() binds the ports, stop() drains and closes."""

    def __init__(self, config: Config, clock: Clock | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.metrics = metrics or new_metrics()
        org = config.tenant.org_name
        self.catalog = LocalCatalog(
            config.tenant.catalog_file, org, self.metrics, self.clock, config.tenant.catalog_poll_interval
        )
        self.health = Health(lambda: self.catalog.current() is not None, self.metrics)
        self.authorization = AuthorizationServicer(
            self.catalog.current, policy_from(config), self.metrics, self.clock
        )
        self.grpc_port = 0
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load the catalog (a bad one fails start-up with CatalogError), then open both ports."""
        await asyncio.to_thread(self.catalog.load)
        credentials, http_tls = _server_tls(self.config)
        server = grpc.aio.server(options=_grpc_options(self.config))
        add_to_server(self.authorization, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
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
            self._http = await endpoints.start(address.http_host(), address.port, http_tls)
        except OSError as exc:
            await server.stop(0)
            raise ListenError(
                f"cannot listen on {address} (global.metrics_address): {exc.strerror}"
            ) from None
        self.http_port = self._http.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self.catalog.run(), name="catalog-watcher"))
        await self.health.refresh()
        log.info(
            "serving ext_authz on %s (port %d), metrics on port %d", target, self.grpc_port, self.http_port
        )

    async def stop(self) -> None:
        """Drain: unready first, then let in-flight RPCs finish, then stop loops and ports."""
        await self.health.drain()
        if self._server is not None:
            await self._server.stop(self.config.global_.graceful_shutdown_timeout)
        self.catalog.stop()
        for task in self._tasks:
            try:
                async with asyncio.timeout(5):
                    await task
            except TimeoutError:
                task.cancel()
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        log.info("stopped")


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then shut down in order. Returns the exit code."""
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
    service = Service(config)
    await service.start()
    await stop.wait()
    await service.stop()
    return 0
