"""Analytics on a full disk: a real size-capped tmpfs under ``global.temp_dir``, a real Envoy in front.

Reliability §6.4 (disk full): authorization is unaffected, every record that does not fit is dropped and
counted (received = accepted + dropped), and writing resumes by itself once there is room again.
Mounting needs root (CI here runs as root); elsewhere the test says so and is skipped.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import APIGEE_TEMP_DIR
from tests.support.catalogs import ORDERS_KEY, catalog_yaml
from tests.support.http_polling import poll

pytestmark = pytest.mark.e2e

DISK = "64k"  # about a thousand compressed records
ROUNDS = 1500  # each an allowed and a denied request: far more than fit


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted where the first stack's ``global.temp_dir`` will be; unmounted after the stack."""
    if os.geteuid() != 0:
        pytest.skip(
            "mounting a size-capped tmpfs needs root; tests/unit/analytics/test_buffer.py covers ENOSPC without it"
        )
    mount_point = tmp_path / "stack0" / APIGEE_TEMP_DIR
    mount_point.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def analytics_counts(stack) -> Counter[str]:
    """analytics_records_total by status plus ``dropped:{reason}`` from the service's /metrics."""
    with httpx.Client(timeout=5, trust_env=False) as client:
        text = client.get(f"{stack.metrics_url}/metrics").text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "analytics_records_total":
                counts[sample.labels["status"]] += int(sample.value)
            elif sample.name == "analytics_records_dropped_total":
                counts[f"dropped:{sample.labels['reason']}"] += int(sample.value)
    return counts


def settled(counts: Counter[str]) -> bool:
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped:"))
    return counts["received"] > 0 and counts["received"] == counts["accepted"] + dropped


def send_rounds(stack, http: httpx.Client, rounds: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    for i in range(rounds):
        statuses[http.get(f"{stack.url}/v1/orders/{i}", headers={"x-api-key": ORDERS_KEY}).status_code] += 1
        statuses[
            http.get(f"{stack.url}/v1/orders/{i}", headers={"x-api-key": "no-such-key"}).status_code
        ] += 1
    return statuses


def test_full_disk_drops_counted_authorization_unaffected_and_writing_resumes(small_disk, authz_stack, http):
    stack = authz_stack(catalog_yaml(), {"analytics": {"collection_interval": "1s"}}, api_name="orders-api")
    assert Path(stack.config_path).parent / APIGEE_TEMP_DIR == small_disk

    assert send_rounds(stack, http, ROUNDS) == {200: ROUNDS, 401: ROUNDS}, stack.logs()

    counts = poll(  # Envoy sends its access log about once a second
        lambda: analytics_counts(stack),
        lambda c: settled(c) and c["received"] == 2 * ROUNDS,
        "a record for every request, each accepted or dropped",
    )
    assert counts["dropped:disk_full"] > 0 and counts["accepted"] > 0, counts
    log = stack.authz_proc.log_path.read_text()
    assert log.count("dropped (disk_full)") >= 1 and ORDERS_KEY not in log

    # Room again (an operator collects the staged files): the next records are written, with no restart.
    staged = small_disk / "analytics" / "staging"
    for path in staged.rglob("*.gz"):
        path.unlink()
    before = counts
    assert send_rounds(stack, http, 20) == {200: 20, 401: 20}
    after = poll(
        lambda: analytics_counts(stack),
        lambda c: settled(c) and c["received"] == before["received"] + 40,
        "the records sent after the disk was emptied",
    )
    assert after["accepted"] == before["accepted"] + 40
    assert after["dropped:disk_full"] == before["dropped:disk_full"]
    assert stack.envoy_stats().get("access_logs.grpc_access_log.logs_dropped", 0) == 0
