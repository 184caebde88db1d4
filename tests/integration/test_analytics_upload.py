"""Analytics in Apigee mode: records from the access-log stream and from Check's denies, uploaded to the
fake's legacy signed URL (``tenant.internal_api``) or its axpublisher endpoint, each to its own tenant."""

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service
from authz.config import load_config
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import apigee_config_yaml
from tests.support.catalogs import ORDERS_KEY
from tests.support.check_requests import check_request

pytestmark = pytest.mark.integration

PRODUCTS = [
    {"name": "orders", "environments": ["test"],
     "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
         {"apiSource": "orders-api", "operations": [{"resource": "/v1/orders/**", "methods": ["GET"]}]}]}},
]  # fmt: skip


def access_entry(start_ms: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """What Envoy logs for a request this service allowed (its ext_authz metadata attached)."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.start_time.FromMilliseconds(start_ms)
    entry.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(4)
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(
        {
            "x-apigee-organization": "org",
            "x-apigee-environment": "test",
            "x-apigee-api": "orders-api",
            "x-apigee-application": "orders-app",
            "x-apigee-developeremail": "dev@example.com",
            "x-apigee-analytics-product": "orders",
            "x-apigee-authorized": "true",
        }
    )
    entry.request.path = "/v1/orders/1"
    entry.response.response_code.value = 200
    return entry


@pytest.fixture
async def legacy(tmp_path):
    """legacy(axpublisher=False) -> (service, fake): Apigee mode with Basic auth and tenant.internal_api."""
    fake = FakeApigee(basic_auth=("key", "secret"))
    fake.set_products(PRODUCTS)
    fake.add_key(ORDERS_KEY, app="orders-app", developer_email="dev@example.com", products=["orders"])
    services = []
    async with await fake.serve() as server:

        async def start(axpublisher: bool = False) -> tuple[Service, FakeApigee]:
            config = tmp_path / "config.yaml"
            tenant = f"  internal_api: {server.internal_api_url}\n  key: key\n  secret: secret\n"
            analytics = (
                f"analytics:\n  collection_interval: 1s\n  legacy_endpoint: {str(axpublisher).lower()}\n"
            )
            config.write_text(
                apigee_config_yaml(server.remote_service_url, str(tmp_path / "tmp"), extra_tenant=tenant)
                + analytics
            )
            service = Service(load_config(config))
            services.append(service)
            await service.start()
            return service, fake

        yield start
        for service in services:
            await service.stop()


async def send_traffic(service: Service) -> None:
    """One denied Check, and the access-log entry of one allowed request."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        denied = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request(), timeout=5)
        assert denied.denied_response.status.code == 401
        message = als_pb2.StreamAccessLogsMessage()
        message.identifier.log_name = "apigee-remote-service-envoy"
        message.http_logs.log_entry.append(access_entry(int(service.clock.now() * 1000) - 10))
        await als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter([message]), timeout=5)


@pytest.mark.parametrize("axpublisher", [False, True])
async def test_records_reach_apigee_for_their_tenant(legacy, axpublisher):
    service, fake = await legacy(axpublisher)
    await send_traffic(service)
    await service.analytics.buffer.rotate()  # stage now instead of after collection_interval
    assert await service.analytics.uploader.drain() == 1
    records = sorted(fake.analytics_records("org", "test"), key=lambda r: r["response_status_code"])
    assert [(r["response_status_code"], r.get("developer_app")) for r in records] == [
        (200, "orders-app"),
        (401, None),
    ]
    assert service.analytics.buffer.staged() == []  # deleted once Apigee confirmed
    assert ORDERS_KEY not in str(records)
    if axpublisher:
        assert fake.publishes == [("org", "test", 2)]
    else:
        assert [(org, env) for org, env, _ in fake.uploads] == [("org", "test")]


async def test_records_staged_at_shutdown_are_uploaded_once(legacy):
    service, fake = await legacy()
    await send_traffic(service)
    await service.stop()  # stages the open file and makes one upload attempt
    assert len(fake.analytics_records("org", "test")) == 2
