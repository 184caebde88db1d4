"""The service in process: a real grpc.aio server on loopback, driven by a gRPC client stub."""

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.app import Service
from authz.config import load_config
from authz.server import codec
from tests.support.catalogs import LEGACY_KEY, ORDERS_KEY, REVOKED_KEY, catalog_yaml, config_yaml
from tests.support.check_requests import check_request, outcome

pytestmark = pytest.mark.integration


@pytest.fixture
async def service(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml())
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(str(catalog)))
    svc = Service(load_config(config))
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def channel(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        yield ch


def request(key=ORDERS_KEY, **kwargs):
    return check_request(key=key, **kwargs)


async def check(channel, req):
    return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=5)


def denied(response):
    return outcome(response)


async def test_allow_and_denies(channel):
    ok = await check(channel, request(headers={"x-apigee-clientid": "spoof"}))
    assert ok.status.code == 0
    assert set(ok.ok_response.headers_to_remove) == {"x-api-key", "x-apigee-clientid"}
    assert codec.metadata_struct(ok)["x-apigee-application"] == "orders-app"

    assert denied(await check(channel, request(key=None))) == (401, "missing_credentials")
    assert denied(await check(channel, request(key="nope"))) == (401, "unknown_key")
    assert denied(await check(channel, request(key=REVOKED_KEY))) == (401, "revoked_key")
    assert denied(await check(channel, request(path="/v2/x"))) == (403, "not_authorized")
    # a granted prefix does not cover a dot segment out of it (Envoy without normalize_path sends it raw)
    assert denied(await check(channel, request(path="/v1/orders/../admin"))) == (400, "unsafe_path")
    assert denied(await check(channel, request(path="/v1/orders/%2e%2E/admin"))) == (400, "unsafe_path")
    assert denied(await check(channel, request(method="DELETE"))) == (403, "not_authorized")
    assert denied(await check(channel, request(key=LEGACY_KEY))) == (403, "not_authorized")
    assert (await check(channel, request(key=LEGACY_KEY, api="legacy-api", method="DELETE"))).status.code == 0


async def test_health_and_http_endpoints(service, channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await check(channel, request(key=None))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        assert (await http.get("/livez")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"catalog_loaded": True, "not_draining": True, "catalog_source": "file"}
        assert (await http.get("/healthz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert (
            'auth_denied_total{code="401",env="test",org="org",reason="missing_credentials"} 1.0' in metrics
        )
        assert 'products_cached{org="org"} 2.0' in metrics
        assert 'auth_requests_seconds_count{code="401",env="test",org="org"} 1.0' in metrics
        assert ORDERS_KEY not in metrics
        assert (await http.get("/nope")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405


async def test_catalog_reload_and_bad_edit_keeps_last_good(service, channel, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    assert (await check(channel, request(method="POST"))).status.code == 0
    catalog.write_text(catalog_yaml(orders_methods="[GET]"))
    assert await service.local.check() is True
    assert denied(await check(channel, request(method="POST"))) == (403, "not_authorized")

    catalog.write_text("products: [{name: broken, enviroments: [test]}]\n")
    assert await service.local.check() is False
    assert (await check(channel, request())).status.code == 0  # the last good catalog still answers
    errors = service.metrics.registry.get_sample_value(
        "catalog_reloads_total", {"org": "org", "result": "error"}
    )
    assert errors == 1.0

    catalog.write_text(catalog_yaml(revoke_orders=True))
    assert await service.local.check() is True
    assert denied(await check(channel, request())) == (401, "revoked_key")


async def test_drain_reports_not_serving(service, channel):
    health = health_pb2_grpc.HealthStub(channel)
    await service.health.drain()
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not service.health.ready


async def test_port_in_use_fails_start_with_a_clear_error(service, tmp_path):
    from authz.errors import ListenError

    catalog = tmp_path / "catalog.yaml"
    config = tmp_path / "busy.yaml"
    config.write_text(
        config_yaml(str(catalog))
        .replace('metrics_address: "127.0.0.1:0"', f'metrics_address: "127.0.0.1:{service.http_port}"')
        .replace(".temp", ".temp2")  # its own temp_dir: the running service holds the first
    )
    second = Service(load_config(config))
    with pytest.raises(ListenError, match=r"cannot listen on 127.0.0.1:\d+ \(global.metrics_address\)"):
        await second.start()
