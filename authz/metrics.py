"""Every Prometheus metric of the service, on one CollectorRegistry passed down from app.py.

Names follow the Go adapter where one exists (``auth_requests_seconds``, ``products_cached``) so that
dashboards carry over. Labels are bounded: org, env, HTTP code, reason code; never a key, client id or path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# Check takes tens of microseconds; the Go adapter's DefBuckets (5 ms and up) would show nothing.
APIGEE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CHECK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _Series:
    __slots__ = ("counts", "total", "_bounds")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.total += value


class LoopHistogram(Collector):
    """A histogram for the request path, without prometheus_client's per-observation locks.

    Check and the /metrics handler run on the same event-loop thread, so plain counters are safe; the
    collector turns them into a regular Prometheus histogram at scrape time. Observing costs one bisect.
    """

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._bounds = sorted(buckets)
        self._series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Series(self._bounds)
        return series

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for values, series in list(self._series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, self._bounds), "+Inf"], series.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, series.total)
        yield family


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    auth_requests: LoopHistogram
    auth_denied: Counter
    auth_allowed_unauthorized: Counter
    auth_check_errors: Counter
    products_cached: Gauge
    credentials_cached: Gauge
    catalog_reloads: Counter
    key_syncs: Counter
    key_index_keys: Gauge
    key_index_synced: Gauge
    catalog_loaded_timestamp: Gauge
    ready: Gauge
    apigee_requests: LoopHistogram
    catalog_from_snapshot: Gauge
    api_key_lookups: Counter
    api_key_verifications: Counter
    jwks_refreshes: Counter
    jwt_verifications: Counter
    quota_checks: Counter
    quota_syncs: Counter
    quota_admitted_unsynced: Counter
    quota_buckets: Gauge
    quota_remaining: Gauge
    analytics_records: Counter
    analytics_dropped: Counter
    analytics_staged_files: Gauge
    analytics_staged_bytes: Gauge
    analytics_oldest_staged: Gauge
    analytics_uploads: Counter
    analytics_quarantined: Counter


def new_metrics(buckets: tuple[float, ...] = CHECK_BUCKETS) -> Metrics:
    """A fresh registry with every metric (each test gets its own)."""
    registry = CollectorRegistry(auto_describe=True)
    return Metrics(
        registry=registry,
        auth_requests=LoopHistogram(
            "auth_requests_seconds",
            "Time to answer one ext_authz Check, by the HTTP status the decision stands for.",
            ["org", "env", "code"],
            buckets,
            registry,
        ),
        auth_denied=Counter(
            "auth_denied",
            "Denied Check requests by HTTP status and stable reason code.",
            ["org", "env", "code", "reason"],
            registry=registry,
        ),
        auth_allowed_unauthorized=Counter(
            "auth_allowed_unauthorized",
            "Requests let through by auth.allow_unauthorized although the decision was a deny.",
            ["org", "env", "reason"],
            registry=registry,
        ),
        auth_check_errors=Counter(
            "auth_check_errors",
            "Unexpected errors caught at the Check boundary (answered with an explicit 503 deny).",
            ["org"],
            registry=registry,
        ),
        products_cached=Gauge(
            "products_cached", "API products in the current catalog.", ["org"], registry=registry
        ),
        credentials_cached=Gauge(
            "credentials_cached", "API-key credentials in the current catalog.", ["org"], registry=registry
        ),
        catalog_reloads=Counter(
            "catalog_reloads",
            "Catalog loads by result (ok, unchanged, error, snapshot_error); errors keep the last good one.",
            ["org", "result"],
            registry=registry,
        ),
        key_syncs=Counter(
            "key_syncs",
            "Full listings of apps and keys from the management API by result (ok, error, snapshot_error).",
            ["org", "result"],
            registry=registry,
        ),
        key_index_keys=Gauge(
            "key_index_keys", "API keys in the local key index.", ["org"], registry=registry
        ),
        key_index_synced=Gauge(
            "key_index_synced_timestamp_seconds",
            "When the key index in use was listed from Apigee (epoch seconds): a revocation there takes "
            "effect here by the next sync.",
            ["org"],
            registry=registry,
        ),
        catalog_loaded_timestamp=Gauge(
            "catalog_loaded_timestamp_seconds",
            "When the catalog in use was loaded (epoch seconds); age = time() - this.",
            ["org"],
            registry=registry,
        ),
        ready=Gauge("ready", "1 when Check answers with decisions, 0 otherwise.", registry=registry),
        apigee_requests=LoopHistogram(
            "apigee_requests_seconds",
            "Calls to Apigee by API (products, auth, quotas, analytics), HTTP status and method.",
            ["org", "env", "api", "code", "method"],
            APIGEE_BUCKETS,
            registry,
        ),
        catalog_from_snapshot=Gauge(
            "catalog_from_snapshot",
            "1 while the products in use come from the on-disk snapshot (Apigee unreachable since start).",
            ["org"],
            registry=registry,
        ),
        api_key_lookups=Counter(
            "api_key_cache_lookups",
            "API-key lookups by result (index: in the key index; hit, stale, negative, miss: in the "
            "verifyApiKey cache).",
            ["org", "result"],
            registry=registry,
        ),
        api_key_verifications=Counter(
            "api_key_verifications",
            "verifyApiKey outcomes (valid, invalid, unavailable, bad_token, refused while backing off, "
            "shed over auth.api_key_verify_rate while a key index is loaded).",
            ["org", "result"],
            registry=registry,
        ),
        jwks_refreshes=Counter(
            "jwks_refreshes",
            "JWKS fetches by provider and result (ok, error); an error keeps the last good keys.",
            ["org", "provider", "result"],
            registry=registry,
        ),
        jwt_verifications=Counter(
            "jwt_verifications",
            "Bearer tokens checked, by provider (issuer name from the config) and result.",
            ["org", "provider", "result"],
            registry=registry,
        ),
        quota_checks=Counter(
            "quota_checks",
            "Quota buckets charged by an authorized request, by result (allowed, exceeded).",
            ["org", "env", "result"],
            registry=registry,
        ),
        quota_syncs=Counter(
            "quota_syncs",
            "Quota syncs with Apigee's /quotas by result (ok, error).",
            ["org", "result"],
            registry=registry,
        ),
        quota_admitted_unsynced=Counter(
            "quota_admitted_unsynced",
            "Quota-bearing requests admitted on credit, without a lease paid at Apigee (Apigee mode).",
            ["org", "env"],
            registry=registry,
        ),
        quota_buckets=Gauge("quota_buckets", "Quota buckets held in memory.", ["org"], registry=registry),
        quota_remaining=Gauge(
            "quota_remaining",
            "Requests left in the current window per quota identifier (only with auth.quota_metrics_per_id).",
            ["org", "env", "quota"],
            registry=registry,
        ),
        analytics_records=Counter(
            "analytics_records",
            "Analytics records by stage: received (from the access log or a deny), accepted (durable on "
            "disk), uploaded (confirmed by Apigee or the sink).",
            ["org", "env", "status"],
            registry=registry,
        ),
        analytics_dropped=Counter(
            "analytics_records_dropped",
            "Analytics records dropped, by reason (invalid, no_metadata, queue_full, disk_full, overflow, "
            "corrupt, quarantined).",
            ["org", "reason"],
            registry=registry,
        ),
        analytics_staged_files=Gauge(
            "analytics_staged_files", "Closed analytics files waiting for upload.", ["org"], registry=registry
        ),
        analytics_staged_bytes=Gauge(
            "analytics_staged_bytes",
            "Bytes of analytics files on disk (open and staged).",
            ["org"],
            registry=registry,
        ),
        analytics_oldest_staged=Gauge(
            "analytics_oldest_staged_seconds",
            "Age of the oldest analytics file waiting for upload (0 when none).",
            ["org"],
            registry=registry,
        ),
        analytics_uploads=Counter(
            "analytics_uploads",
            "Analytics file uploads by result (ok, transient_error, permanent_error).",
            ["org", "env", "result"],
            registry=registry,
        ),
        analytics_quarantined=Counter(
            "analytics_files_quarantined",
            "Analytics files set aside (permanent upload error, corrupt) instead of retried forever.",
            ["org", "reason"],
            registry=registry,
        ),
    )


@dataclass(frozen=True)
class SupervisorMetrics:
    """The supervisor's own metrics with ``authz serve --workers N``, next to the workers' merged ones."""

    registry: CollectorRegistry
    workers: Gauge
    worker_up: Gauge
    worker_restarts: Counter


def new_supervisor_metrics() -> SupervisorMetrics:
    registry = CollectorRegistry(auto_describe=True)
    return SupervisorMetrics(
        registry=registry,
        workers=Gauge("workers", "Worker processes configured (authz serve --workers).", registry=registry),
        worker_up=Gauge(
            "worker_up",
            "1 when the worker answered the supervisor at the last scrape, 0 otherwise.",
            ["worker"],
            registry=registry,
        ),
        worker_restarts=Counter(
            "worker_restarts",
            "Workers restarted by the supervisor after an unexpected exit.",
            ["worker"],
            registry=registry,
        ),
    )
