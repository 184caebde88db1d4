"""ApigeeCatalog: polls Apigee's ``GET /products`` and holds the current catalog snapshot.

The first fetch runs at start-up, then one every ``refresh_rate`` (±10 % jitter) with ``If-None-Match``; a
failure backs off from 1 s, doubling up to ``refresh_rate``, and keeps the last good catalog. A product that
does not parse is logged and skipped, as the Go adapter does with invalid resource patterns. Each good 200
is also written to ``snapshot_path``: after a restart during an Apigee outage the service answers from that
file instead of denying everything until Apigee is back (the Go adapter blocks Checks until the first load).
Readers call ``current()``, which returns the snapshot by reference: nothing shared is ever mutated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random as _random
from collections.abc import Callable, Sequence
from typing import Any

from authz.apigee.client import ApigeeClient, ProductsResponse
from authz.apigee.snapshot_file import write_json
from authz.clock import Clock
from authz.decision.model import Catalog, Product
from authz.decision.products import ProductError, parse_product
from authz.errors import ApigeeError, ApigeeUnavailable
from authz.metrics import Metrics

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
INITIAL_BACKOFF = 1.0
JITTER = 0.1  # ±10 % on every wait, so replicas restarted together do not poll in step


def poll_delay(interval: float, failures: int, retry_after: float, draw: float) -> float:
    """Seconds to a poller's next call: ``interval`` after a success, else a backoff from 1 s doubling up
    to ``interval``; ±10 % jitter (``draw`` in [0, 1)); never before Apigee's ``Retry-After``."""
    if failures == 0:
        base = interval
    else:
        first = min(INITIAL_BACKOFF, interval)
        base = min(interval, first * 2.0 ** min(failures - 1, 32))
    return max(base * (1 + JITTER * (2 * draw - 1)), retry_after)


def build_catalog(raw_products: Sequence[dict[str, Any]], loaded_at: float) -> Catalog:
    """Parse Apigee's product list; invalid products are logged and skipped, a repeated name replaces."""
    products: dict[str, Product] = {}
    for raw in raw_products:
        try:
            product = parse_product(raw)
        except ProductError as exc:
            log.warning("product %r skipped: %s", raw.get("name"), exc)
            continue
        if product.name in products:
            log.warning("product %r listed more than once; the last one wins", product.name)
        products[product.name] = product
    return Catalog(products, {}, loaded_at)


def _write_snapshot(path: str, document: dict[str, Any]) -> None:
    """Write atomically: a temp file (mode 0o600) in the same directory, fsync, rename."""
    write_json(path, document, ".products-")


def _read_snapshot(path: str, org: str) -> tuple[Catalog, str | None]:
    """The catalog and ETag in a snapshot file. Raises OSError or ValueError when it cannot be used."""
    with open(path, "rb") as file:
        document = json.load(file)
    if not isinstance(document, dict) or document.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"not a format {SNAPSHOT_FORMAT} products snapshot")
    if document.get("org") != org:
        raise ValueError(f"written for org {document.get('org')!r}, not {org!r}")
    raw, etag = document.get("apiProduct"), document.get("etag")
    fetched_at: Any = document.get("fetchedAt")
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise ValueError("apiProduct: expected a list of objects")
    if type(fetched_at) not in (int, float) or not isinstance(etag, str | None):
        raise ValueError("fetchedAt or etag: wrong type")
    return build_catalog(raw, float(fetched_at)), etag


class ApigeeCatalog:
    def __init__(
        self, client: ApigeeClient, org: str, metrics: Metrics, clock: Clock, refresh_rate: float,
        snapshot_path: str | None, random: Callable[[], float] = _random.random,
    ) -> None:  # fmt: skip
        self._client = client
        self._org = org
        self._metrics = metrics
        self._clock = clock
        self._refresh_rate = refresh_rate
        self._snapshot_path = snapshot_path
        self._random = random
        self._snapshot: Catalog | None = None
        self._etag: str | None = None
        self._from_snapshot = False
        self._failures = 0  # failed polls in a row
        self._retry_after = 0.0  # Apigee's Retry-After on the last failure, seconds
        self._stopped = asyncio.Event()

    def current(self) -> Catalog | None:
        return self._snapshot

    @property
    def from_snapshot(self) -> bool:
        """True while serving the disk snapshot: Apigee has not answered since start-up."""
        return self._from_snapshot

    def next_delay(self) -> float:
        """Seconds to the next poll: ``refresh_rate`` after a success, else the capped backoff; jittered."""
        return poll_delay(self._refresh_rate, self._failures, self._retry_after, self._random())

    async def load(self) -> None:
        """First fetch at start-up. Never raises: if Apigee fails, serves the disk snapshot, if any."""
        if not await self.refresh() and self._snapshot is None and self._snapshot_path is not None:
            await self._load_snapshot(self._snapshot_path)

    async def refresh(self) -> bool:
        """Poll Apigee once. Returns True when it answered (200 or 304); a failure keeps the catalog."""
        try:
            response = await self._client.products(self._etag)
            if response.not_modified and self._snapshot is None:
                response = await self._client.products(None)  # nothing to keep: ask for the list
                if response.not_modified:
                    raise ApigeeUnavailable("GET products: 304 without If-None-Match")
            catalog = None
            if not response.not_modified:
                catalog = await asyncio.to_thread(build_catalog, response.products, self._clock.now())
        except Exception as exc:
            self._failures += 1
            self._retry_after = (exc.retry_after or 0.0) if isinstance(exc, ApigeeUnavailable) else 0.0
            self._metrics.catalog_reloads.labels(self._org, "error").inc()
            kept = "keeping the last good catalog" if self._snapshot is not None else "no catalog yet"
            log.warning(
                "products fetch failed (%d in a row, %s): %s", self._failures, kept, exc,
                exc_info=not isinstance(exc, ApigeeError),  # a traceback only for a bug
            )  # fmt: skip
            return False
        self._failures = 0
        self._retry_after = 0.0
        if catalog is None:
            self._metrics.catalog_reloads.labels(self._org, "unchanged").inc()
            self._metrics.catalog_loaded_timestamp.labels(self._org).set(self._clock.now())  # still current
            log.debug("products unchanged (304)")
            if self._from_snapshot:
                log.info("Apigee confirmed that the products snapshot is current")
                self._set_from_snapshot(False)
        else:
            await self._replace(catalog, response)
        return True

    async def _replace(self, catalog: Catalog, response: ProductsResponse) -> None:
        previous = self._snapshot
        if not catalog.products and previous is not None and previous.products:
            log.warning("Apigee returned no products; the previous catalog had %d", len(previous.products))
        self._etag = response.etag
        self._install(catalog, from_snapshot=False)
        self._metrics.catalog_reloads.labels(self._org, "ok").inc()
        log.info("products loaded from Apigee: %d products", len(catalog.products))
        if self._snapshot_path is None:
            return
        document = {"format": SNAPSHOT_FORMAT, "org": self._org, "fetchedAt": catalog.loaded_at,
                    "etag": response.etag, "apiProduct": list(response.products)}  # fmt: skip
        try:
            await asyncio.to_thread(_write_snapshot, self._snapshot_path, document)
        except Exception as exc:  # serving never depends on the snapshot file
            self._metrics.catalog_reloads.labels(self._org, "snapshot_error").inc()
            log.error("cannot write the products snapshot %s: %s", self._snapshot_path, exc)

    async def _load_snapshot(self, path: str) -> None:
        try:
            catalog, etag = await asyncio.to_thread(_read_snapshot, path, self._org)
        except FileNotFoundError:
            log.warning("no products snapshot at %s: Check answers 503 until Apigee answers", path)
            return
        except Exception as exc:
            log.error("ignoring the products snapshot %s: %s", path, exc)
            return
        self._etag = etag
        self._install(catalog, from_snapshot=True)
        age = max(0.0, self._clock.now() - catalog.loaded_at)
        log.warning(
            "Apigee unreachable: serving %d products from the snapshot %s, fetched %.0f s ago",
            len(catalog.products), path, age,
        )  # fmt: skip

    def _install(self, catalog: Catalog, from_snapshot: bool) -> None:
        self._snapshot = catalog
        self._metrics.products_cached.labels(self._org).set(len(catalog.products))
        self._metrics.catalog_loaded_timestamp.labels(self._org).set(catalog.loaded_at)
        self._set_from_snapshot(from_snapshot)

    def _set_from_snapshot(self, value: bool) -> None:
        self._from_snapshot = value
        self._metrics.catalog_from_snapshot.labels(self._org).set(1 if value else 0)

    async def run(self) -> None:
        """Poll until ``stop()``, which also abandons a poll in flight; never dies on an error."""
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.next_delay()):
                    await self._stopped.wait()
            if self._stopped.is_set():
                return
            poll = asyncio.create_task(self.refresh())
            stopped = asyncio.create_task(self._stopped.wait())
            try:
                await asyncio.wait((poll, stopped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                poll.cancel()
                stopped.cancel()
                await asyncio.gather(poll, stopped, return_exceptions=True)

    def stop(self) -> None:
        self._stopped.set()
