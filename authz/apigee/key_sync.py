"""KeySync: keeps the KeyIndex current from the management API, and on disk for a cold start.

A full listing (developers, then apps) as ``run()`` starts and every ``interval`` (±10 % jitter) builds
a new index, swapped in whole like the product catalog; a failure backs off from 1 s, doubling up to
``interval``, and keeps the last good index. After each good sync the index is written to
``snapshot_path`` (atomic, 0600): digests and what they grant, never a key. ``restore()`` reads it at
start-up, so every key known at the last sync works at once, and through an outage. ``refresh_app`` is
the early, incremental sync of one app, after ``/verifyApiKey`` vouched for a key the index lacked.

Revocation latency: a change in Apigee takes effect here at the next good sync, at most ``interval`` (plus
the listing's own duration) later; ``key_index_synced_timestamp_seconds`` says when that was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random as _random
from collections.abc import Callable
from typing import Any, Final

from authz.apigee.catalog import poll_delay
from authz.apigee.key_index import Developer, KeyIndex, apps_of, build, developers_from
from authz.apigee.management import ManagementClient
from authz.apigee.snapshot_file import write_json
from authz.clock import Clock
from authz.decision.model import Credential
from authz.errors import ApigeeError, ApigeeUnavailable
from authz.metrics import Metrics

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT: Final = 1


class KeySync:
    def __init__(
        self, client: ManagementClient, org: str, metrics: Metrics, clock: Clock, interval: float,
        snapshot_path: str | None, random: Callable[[], float] = _random.random,
    ) -> None:  # fmt: skip
        self._client = client
        self._org = org
        self._metrics = metrics
        self._clock = clock
        self._interval = interval
        self._snapshot_path = snapshot_path
        self._random = random
        self.index: KeyIndex | None = None
        self.generation = 0  # bumped whenever the index changes (swapped, or one app added)
        self.source = "none"  # where the index in use came from: none, snapshot, apigee
        self._developers: dict[str, Developer] = {}
        self._failures = 0
        self._retry_after = 0.0
        self._stopped = asyncio.Event()
        self._refreshing: set[str] = set()

    def next_delay(self) -> float:
        return poll_delay(self._interval, self._failures, self._retry_after, self._random())

    async def restore(self) -> None:
        """Install the snapshot, if usable (a start-up before the first listing). Never raises."""
        if self._snapshot_path is not None:
            await self._load_snapshot(self._snapshot_path)

    async def run(self) -> None:
        """Sync now, then every ``next_delay()`` until ``stop()``."""
        while not self._stopped.is_set():
            await self.sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.next_delay())

    def stop(self) -> None:
        self._stopped.set()

    async def sync(self) -> bool:
        """One full listing. Returns whether it succeeded; a failure keeps the current index."""
        started = self._clock.monotonic()
        try:
            developer_pages = [page async for page in self._client.developers()]
            developers = developers_from(developer_pages)
            apps: list[Any] = []
            async for page in self._client.apps():
                apps += apps_of(page)
            index = await asyncio.to_thread(build, apps, developers)
        except Exception as exc:
            self._failures += 1
            self._retry_after = (exc.retry_after or 0.0) if isinstance(exc, ApigeeUnavailable) else 0.0
            self._metrics.key_syncs.labels(self._org, "error").inc()
            kept = f"keeping {len(self.index)} keys" if self.index is not None else "no key index yet"
            log.warning(
                "key sync failed (%d in a row, %s): %s", self._failures, kept, exc,
                exc_info=not isinstance(exc, ApigeeError | ValueError),
            )  # fmt: skip
            return False
        self._failures, self._retry_after = 0, 0.0
        self._developers = developers
        self._install(index, self._clock.now())
        self.source = "apigee"
        log.info(
            "key index synced: %d keys of %d apps (%d left to /verifyApiKey) in %.1f s",
            len(index), len(apps), index.skipped, self._clock.monotonic() - started,
        )  # fmt: skip
        if self._snapshot_path is not None:
            try:
                await asyncio.to_thread(
                    _write_snapshot, self._snapshot_path, self._org, index, self._clock.now()
                )
            except Exception as exc:  # serving never depends on the snapshot file
                self._metrics.key_syncs.labels(self._org, "snapshot_error").inc()
                log.error("cannot write the key snapshot %s: %s", self._snapshot_path, exc)
        self._metrics.key_syncs.labels(self._org, "ok").inc()  # after the snapshot: "ok" means on disk too
        return True

    async def refresh_app(self, app_id: str) -> None:
        """Fetch one app (and its developer, if new since the listing or after a restart from the
        snapshot) and add its credentials to the index (one fetch per app at a time). Never raises."""
        if self.index is None or not app_id or app_id in self._refreshing:
            return
        self._refreshing.add(app_id)
        try:
            app = await self._client.app(app_id)
            if app is not None:
                await self._learn_developer(app)
            if app is not None and self.index is not None:
                self.index.add_app(app, self._developers)
                self.generation += 1
                self._metrics.key_index_keys.labels(self._org).set(len(self.index))
        except Exception as exc:
            log.warning("key sync of app %s failed: %s", app_id, exc)
        finally:
            self._refreshing.discard(app_id)

    async def _learn_developer(self, app: dict[str, Any]) -> None:
        """Fetch the app's developer unless known (an app group's app has none)."""
        wanted = [w for k in ("developerEmail", "developerId") if isinstance(w := app.get(k), str) and w]
        if not wanted or any(w in self._developers or w.lower() in self._developers for w in wanted):
            return
        developer = await self._client.developer(wanted[0])
        if developer is not None:
            self._developers.update(developers_from([{"developer": [developer]}]))

    def _install(self, index: KeyIndex, synced_at: float) -> None:
        self.index = index
        self.generation += 1
        self._metrics.key_index_keys.labels(self._org).set(len(index))
        self._metrics.key_index_synced.labels(self._org).set(synced_at)

    async def _load_snapshot(self, path: str) -> None:
        try:
            index, synced_at = await asyncio.to_thread(_read_snapshot, path, self._org)
        except FileNotFoundError:
            log.info("no key snapshot at %s: keys are checked with /verifyApiKey until a sync", path)
            return
        except Exception as exc:
            log.error("ignoring the key snapshot %s: %s", path, exc)
            return
        self._install(index, synced_at)
        self.source = "snapshot"
        log.info(
            "%d keys from the snapshot %s, synced %.0f s ago, until the first listing",
            len(index), path, max(0.0, self._clock.now() - synced_at),
        )  # fmt: skip


def _write_snapshot(path: str, org: str, index: KeyIndex, synced_at: float) -> None:
    """Group the digests by their (shared) credential and write atomically: temp file 0600, fsync, rename."""
    groups: dict[int, tuple[Credential, list[str]]] = {}
    for key_digest, credential in index.entries.items():
        groups.setdefault(id(credential), (credential, []))[1].append(key_digest.hex())
    document = {
        "format": SNAPSHOT_FORMAT,
        "org": org,
        "syncedAt": synced_at,
        "credentials": [
            {"app": c.app_name, "developer": c.developer_email, "products": list(c.products),
             "active": c.active, "expiresAt": c.expires_at, "keys": keys}
            for c, keys in groups.values()
        ],
    }  # fmt: skip
    write_json(path, document, ".keys-")


def _read_snapshot(path: str, org: str) -> tuple[KeyIndex, float]:
    """The index and its sync time in a snapshot file. Raises OSError or ValueError when unusable."""
    with open(path, "rb") as file:
        document = json.load(file)
    if not isinstance(document, dict) or document.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"not a format {SNAPSHOT_FORMAT} key snapshot")
    if document.get("org") != org:
        raise ValueError(f"written for org {document.get('org')!r}, not {org!r}")
    synced_at, groups = document.get("syncedAt"), document.get("credentials")
    if not isinstance(synced_at, int | float) or isinstance(synced_at, bool) or not isinstance(groups, list):
        raise ValueError("syncedAt or credentials: wrong type")
    index = KeyIndex()
    for group in groups:
        try:
            credential = Credential(
                key_sha256="",
                client_id="",
                app_name=_string(group["app"]),
                developer_email=_string(group["developer"]),
                products=tuple(_string(p) for p in group["products"]),
                active=group["active"] is True,
                expires_at=None if group["expiresAt"] is None else float(group["expiresAt"]),
            )
            for key in group["keys"]:
                index.entries[bytes.fromhex(_string(key))] = credential
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a credential of the wrong shape ({type(exc).__name__})") from None
    return index, float(synced_at)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value
