"""Analytics in Apigee X/hybrid mode end to end: Envoy's access log and Check's denies become records, and
they reach the fake's ``datalocation`` + signed URL (with a Google token from the fake's ``/token`` for the
analytics service account), even after an outage of the upload path during steady traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.stack import Stack, start_stack
from devstack.upstream import EchoUpstream
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import new_service_account, write_analytics_secret, write_policy_secret
from tests.support.apigee_thread import ApigeeThread
from tests.support.http_polling import poll

pytestmark = pytest.mark.e2e

ORG, ENV, API = "demo", "test", "orders.example.com"
KEY = "orders-key-analytics-7d1e"
PRODUCTS = [
    {"name": "orders", "environments": [ENV],
     "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
         {"apiSource": API, "operations": [{"resource": "/v1/orders/**", "methods": ["GET"]}]}]}},
]  # fmt: skip
RATE = 200  # requests a second, each one analytics record
SECONDS = 3


@pytest.fixture
def apigee_stack(
    tmp_path: Path,
    echo_upstream: EchoUpstream,
    envoy_bin: str,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
) -> Iterator[tuple[Stack, ApigeeThread]]:
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(org=ORG, env=ENV, policy_jwks=secret.jwks)
    fake.set_products(PRODUCTS)
    fake.add_key(KEY, app="orders-app", developer_email="dev@example.com", products=["orders"])
    apigee = ApigeeThread(fake)
    account = new_service_account(f"{apigee.base_url}/token")
    apigee.call(fake.add_service_account, account.client_email, account.public_key_pem)
    monkeypatch.setenv(
        "AUTHZ_ANALYTICS_SECRET", str(write_analytics_secret(tmp_path / "analytics", account).parent)
    )
    stack = start_stack(
        tmp_path / "stack",
        None,
        echo_upstream.port,
        overrides={
            "tenant": {
                "remote_service_api": apigee.remote_service_url,
                "management_api": apigee.base_url,
                "client_timeout": "2s",
            },
            "analytics": {"collection_interval": "1s"},
        },
        policy_secret_dir=secret.directory,
        transport=transport,
    )
    yield stack, apigee
    stack.close()
    print(f"logs of {stack.work_dir}:\n{stack.logs()}")  # shown by pytest when a test failed
    apigee.close()


def envoy_stat(stack: Stack, name: str) -> int:
    with httpx.Client(timeout=5, trust_env=False) as client:
        text = client.get(f"{stack.admin_url}/stats", params={"filter": name}).text
    return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(":")[0] == name)


def steady_traffic(stack: Stack, rate: int, seconds: int) -> list[int]:
    """``rate`` requests a second for ``seconds`` (a paced load generator), alternating allowed and denied."""
    statuses = []
    start = time.monotonic()
    with httpx.Client(timeout=5, trust_env=False) as client:
        for i in range(rate * seconds):
            headers = {"host": API, **({"x-api-key": KEY} if i % 2 == 0 else {})}
            statuses.append(client.get(f"{stack.url}/v1/orders/{i}", headers=headers).status_code)
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing the load, not waiting for a result
    return statuses


def test_records_survive_an_upload_outage_under_steady_traffic(apigee_stack):
    stack, apigee = apigee_stack
    fake = apigee.fake
    apigee.call(fake.fail_next, "datalocation", 503, 1_000_000)  # the upload path is down
    statuses = steady_traffic(stack, RATE, SECONDS)
    sent = len(statuses)
    assert statuses.count(200) == sent // 2 and statuses.count(401) == sent // 2, stack.logs()
    assert envoy_stat(stack, "access_logs.grpc_access_log.logs_dropped") == 0  # Envoy never stalled on us
    assert apigee.call(fake.analytics_records, ORG, ENV) == []

    apigee.call(fake.clear_faults, "datalocation")  # Apigee is back
    records = poll(
        lambda: apigee.call(fake.analytics_records, ORG, ENV),
        lambda found: len(found) >= sent,
        f"{sent} records at Apigee",
        timeout=90,  # the uploader's backoff reaches 60 s at most
    )
    assert len(records) == sent  # one per request, none lost, none twice
    assert len({r["gateway_flow_id"] for r in records}) == sent
    codes = [r["response_status_code"] for r in records]
    assert codes.count(200) == sent // 2 and codes.count(401) == sent // 2
    assert {r["developer_app"] for r in records if r["response_status_code"] == 200} == {"orders-app"}
