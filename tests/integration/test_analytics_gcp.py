"""Apigee X/hybrid analytics end to end in process: a denied Check's record goes to the fake's
``datalocation`` with a Google access token the fake issued for the analytics service account, then to the
signed URL (reference §3.4). The service account comes the way the Go adapter's deployment mounts it
(``client_secret.json`` in the ``--analytics-secret`` directory, or the analytics Secret in the config
stream), or from Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``)."""

import base64

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service
from authz.config import load_config
from authz.errors import ConfigError
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import (
    apigee_config_yaml,
    new_service_account,
    write_analytics_secret,
    write_policy_secret,
)
from tests.support.check_requests import check_request

pytestmark = pytest.mark.integration


@pytest.fixture
async def gcp(tmp_path, monkeypatch):
    """gcp(how="directory") -> (service, fake): Apigee X/hybrid mode, management_api = the fake."""
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(policy_jwks=secret.jwks)
    services = []
    async with await fake.serve() as server:
        account = new_service_account(f"{server.base_url}/token")
        fake.add_service_account(account.client_email, account.public_key_pem)

        async def start(how: str = "directory") -> tuple[Service, FakeApigee]:
            config = tmp_path / "config.yaml"
            tenant = f"  management_api: {server.analytics_url}"
            text = apigee_config_yaml(server.remote_service_url, str(tmp_path / "tmp"), extra_tenant=tenant)
            analytics_dir = None
            if how == "directory":
                config.write_text(text)
                analytics_dir = str(write_analytics_secret(tmp_path / "analytics-secret", account).parent)
            elif how == "adc":
                config.write_text(text)
                adc = write_analytics_secret(tmp_path / "adc", account)
                monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
            else:  # the provision stream: ConfigMap + analytics Secret
                inner = "\n".join("    " + line for line in text.strip("\n").splitlines())
                b64 = base64.b64encode(account.json().encode()).decode()
                config.write_text(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: apigee-remote-service-envoy}\n"
                    f"data:\n  config.yaml: |\n{inner}\n---\n"
                    "apiVersion: v1\nkind: Secret\nmetadata: {name: org-test-analytics-secret}\n"
                    f"data:\n  client_secret.json: {b64}\n"
                )
            service = Service(load_config(config, str(secret.directory), analytics_dir))
            services.append(service)
            await service.start()
            return service, fake

        yield start
        for service in services:
            await service.stop()


@pytest.mark.parametrize("how", ["directory", "stream", "adc"])
async def test_a_denied_request_reaches_apigee_x_with_a_google_token(gcp, how):
    service, fake = await gcp(how)
    assert service.analytics.uploader is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        denied = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request(), timeout=5)
    assert denied.denied_response.status.code == 401
    await service.analytics.buffer.rotate()
    assert await service.analytics.uploader.drain() == 1

    records = fake.analytics_records("org", "test")
    assert [(r["response_status_code"], r["organization"], r["environment"]) for r in records] == [
        (401, "org", "test")
    ]
    assert [(org, env) for org, env, _ in fake.uploads] == [("org", "test")]
    assert fake.google_tokens_issued and fake.calls["oauth_token"] == 1
    assert fake.last_headers["datalocation"]["authorization"] == f"Bearer {fake.google_tokens_issued[0]}"
    assert "authorization" not in fake.last_headers["signed_put"]  # GCS refuses a second auth mechanism
    assert service.analytics.buffer.staged() == []


async def test_without_google_credentials_records_stay_staged(tmp_path, caplog):
    """No analytics Secret and no Application Default Credentials (tests/conftest.py hides the machine's):
    the service starts and serves, warns once, and keeps the records on disk."""
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(policy_jwks=secret.jwks)
    async with await fake.serve() as server:
        config = tmp_path / "config.yaml"
        tenant = f"  management_api: {server.analytics_url}"
        config.write_text(
            apigee_config_yaml(server.remote_service_url, str(tmp_path / "tmp"), extra_tenant=tenant)
        )
        service = Service(load_config(config, str(secret.directory)))
        await service.start()
        try:
            assert service.analytics.uploader is None
            assert caplog.text.count("needs Google credentials and there are none") == 1
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                assert (await stub.Check(check_request(), timeout=5)).denied_response.status.code == 401
            await service.analytics.buffer.rotate()
            assert len(service.analytics.buffer.staged()) == 1
        finally:
            await service.stop()
        assert fake.calls["datalocation"] == 0 and fake.calls["oauth_token"] == 0
        assert len(service.analytics.buffer.staged()) == 1


async def test_an_analytics_secret_google_auth_cannot_use_fails_start_up(tmp_path):
    secret = write_policy_secret(tmp_path / "policy-secret")
    analytics = tmp_path / "analytics-secret"
    analytics.mkdir()
    (analytics / "client_secret.json").write_text('{"type": "service_account", "client_email": "a@b"}')
    config = tmp_path / "config.yaml"
    config.write_text(apigee_config_yaml("http://127.0.0.1:9/remote-service", str(tmp_path / "tmp")))
    with pytest.raises(
        ConfigError, match=r"analytics_secret: client_secret.json: not usable Google credentials"
    ):
        Service(load_config(config, str(secret.directory), str(analytics)))
