"""Readiness from components, shown the same on gRPC health and HTTP /readyz and /healthz.

Ready = a catalog is loaded and the service is not draining. SIGTERM flips ``draining`` first so Envoy and
Kubernetes stop sending before the server stops. Check does not rely on this: Envoy keeps routing to a
lone unhealthy host (panic threshold), so Check answers 503 itself while no catalog is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from authz.metrics import Metrics

SERVICES = ("", "envoy.service.auth.v3.Authorization")


class Health:
    def __init__(
        self,
        loaded: Callable[[], bool],
        metrics: Metrics,
        details: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self._loaded = loaded
        self._metrics = metrics
        self._details = details
        self.draining = False
        self.servicer = HealthServicer()

    def components(self) -> dict[str, bool]:
        """What readiness requires; each must be true."""
        return {"catalog_loaded": self._loaded(), "not_draining": not self.draining}

    def details(self) -> dict[str, str]:
        """Facts shown next to the components that do not gate readiness (for example the catalog source)."""
        return self._details() if self._details is not None else {}

    @property
    def ready(self) -> bool:
        return all(self.components().values())

    async def refresh(self) -> None:
        """Publish the current state to gRPC health and the ``ready`` gauge."""
        ready = self.ready
        self._metrics.ready.set(1 if ready else 0)
        states = health_pb2.HealthCheckResponse
        status = states.SERVING if ready else states.NOT_SERVING
        for service in SERVICES:
            await self.servicer.set(service, status)

    async def drain(self) -> None:
        self.draining = True
        self._metrics.ready.set(0)
        await self.servicer.enter_graceful_shutdown()
