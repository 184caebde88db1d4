"""LocalCatalog: holds the current catalog snapshot and reloads it when the file changes.

The file is checked every ``poll_interval`` (a stat, cheap); a changed file is parsed off the event loop.
A bad edit is logged and counted and the last good snapshot stays in use. Readers call ``current()``,
which returns the snapshot by reference: nothing shared is ever mutated.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from authz.clock import Clock
from authz.decision.model import Catalog
from authz.errors import CatalogError
from authz.metrics import Metrics
from authz.standalone.catalog_file import load_catalog

log = logging.getLogger(__name__)

_Signature = tuple[int, int, int]


def _signature(path: str) -> _Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class LocalCatalog:
    def __init__(
        self,
        path: str,
        org: str,
        metrics: Metrics,
        clock: Clock,
        poll_interval: float,
        on_change: Callable[[Catalog], None] | None = None,
    ) -> None:
        self.path = path
        self._org = org
        self._metrics = metrics
        self._clock = clock
        self._poll_interval = poll_interval
        self._on_change = on_change
        self._snapshot: Catalog | None = None
        self._seen: _Signature | None = None
        self._stopped = asyncio.Event()

    def current(self) -> Catalog | None:
        return self._snapshot

    def load(self) -> Catalog:
        """Load the file now (blocking). Raises CatalogError and keeps the last good snapshot on failure."""
        signature = _signature(self.path)
        try:
            catalog = load_catalog(self.path, self._clock.now())
        except CatalogError:
            self._seen = signature  # do not re-parse the same bad file every poll
            self._metrics.catalog_reloads.labels(self._org, "error").inc()
            raise
        self._seen = signature
        self._install(catalog)
        return catalog

    def _install(self, catalog: Catalog) -> None:
        self._snapshot = catalog
        org = self._org
        self._metrics.catalog_reloads.labels(org, "ok").inc()
        self._metrics.products_cached.labels(org).set(len(catalog.products))
        self._metrics.credentials_cached.labels(org).set(len(catalog.credentials))
        self._metrics.catalog_loaded_timestamp.labels(org).set(catalog.loaded_at)
        log.info(
            "catalog loaded from %s: %d products, %d credentials",
            self.path,
            len(catalog.products),
            len(catalog.credentials),
        )
        if self._on_change is not None:
            self._on_change(catalog)

    async def check(self) -> bool:
        """Reload if the file changed since the last load. Returns True when a new snapshot was installed."""
        signature = _signature(self.path)
        if signature is None or signature == self._seen:
            return False
        try:
            await asyncio.to_thread(self.load)
        except CatalogError as exc:
            log.error("catalog reload failed, keeping the last good catalog: %s", exc)
            return False
        return True

    async def run(self) -> None:
        """Poll until ``stop()``; never dies on an error."""
        while not self._stopped.is_set():
            try:
                async with asyncio.timeout(self._poll_interval):
                    await self._stopped.wait()
            except TimeoutError:
                pass
            if not self._stopped.is_set():
                try:
                    await self.check()
                except Exception:  # a bug here must not stop reloads for good
                    log.exception("catalog watcher error")

    def stop(self) -> None:
        self._stopped.set()
