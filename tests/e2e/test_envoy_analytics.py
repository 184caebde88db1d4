"""Analytics end to end: Envoy's gRPC access log into the service, one record per request on disk.

Standalone mode keeps the staged gzip NDJSON files under ``global.temp_dir`` (nothing to upload to), so
the test reads them there: an allowed request's record comes from Envoy's access log with the ext_authz
metadata; a denied request's from Check itself (Envoy passes no metadata on a deny).
"""

import gzip
import json
from pathlib import Path

import httpx
import pytest

from devstack.stack import APIGEE_TEMP_DIR
from tests.support.catalogs import ORDERS_KEY, catalog_yaml
from tests.support.http_polling import poll

pytestmark = pytest.mark.e2e


def staged_records(work_dir: Path) -> list[dict]:
    records = []
    for path in sorted((work_dir / APIGEE_TEMP_DIR / "analytics" / "staging").rglob("*.gz")):
        records += [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    return records


def envoy_stat(stack, name: str) -> int:
    with httpx.Client(timeout=5, trust_env=False) as client:
        text = client.get(f"{stack.admin_url}/stats", params={"filter": name}).text
    values = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(":")[0] == name]
    return sum(values)


def test_one_record_per_request_allowed_or_denied(authz_stack, http):
    stack = authz_stack(catalog_yaml(), {"analytics": {"collection_interval": "1s"}}, api_name="orders-api")
    sent = [
        (
            http.get(
                f"{stack.url}/v1/orders/1?x=1", headers={"x-api-key": ORDERS_KEY, "user-agent": "e2e/1"}
            ),
            200,
        ),
        (http.get(f"{stack.url}/v1/orders/2", headers={"user-agent": "e2e/1"}), 401),
        (http.get(f"{stack.url}/v2/x", headers={"x-api-key": ORDERS_KEY, "user-agent": "e2e/1"}), 403),
    ]
    assert [r.status_code for r, _ in sent] == [status for _, status in sent], stack.logs()
    records = poll(lambda: staged_records(stack.work_dir), lambda found: len(found) >= 3, "3 staged records")
    by_status = {r["response_status_code"]: r for r in records}
    assert sorted(by_status) == [200, 401, 403] and len(records) == 3  # no second record for a deny
    allowed = by_status[200]
    assert (allowed["request_uri"], allowed["request_path"], allowed["request_verb"]) == (
        "/v1/orders/1?x=1",
        "/v1/orders/1",
        "GET",
    )
    assert (allowed["developer_app"], allowed["developer_email"], allowed["api_product"]) == (
        "orders-app",
        "dev@example.com",
        "orders",
    )
    assert (allowed["organization"], allowed["environment"], allowed["apiproxy"]) == (
        "demo",  # devstack's default org
        "test",
        "orders-api",
    )
    assert allowed["useragent"] == "e2e/1" and allowed["client_ip"] == "127.0.0.1"
    assert allowed["client_received_start_timestamp"] <= allowed["client_sent_end_timestamp"]
    assert by_status[403]["developer_app"] == "orders-app"  # a known caller without a grant
    assert "developer_app" not in by_status[401]
    assert ORDERS_KEY not in json.dumps(records)
    assert envoy_stat(stack, "access_logs.grpc_access_log.logs_dropped") == 0
