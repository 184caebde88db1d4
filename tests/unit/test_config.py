"""Tests for authz.config: defaults, every key, the Kubernetes form, durations, and one fixture per error."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz import config as cfg
from authz.config import (
    AnalyticsConfig,
    AuthConfig,
    Config,
    GlobalConfig,
    PolicySecret,
    ProductsConfig,
    ServerTLS,
    TenantConfig,
    TenantTLS,
    effective_config,
    load_config,
)
from authz.config_values import Address, format_duration, parse_address, parse_duration
from authz.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "config"
CATALOG = str(FIXTURES / "catalog.yaml")


def test_minimal_config_gets_every_default() -> None:
    config = load_config(FIXTURES / "valid_minimal.yaml")

    assert config == Config(
        path=str(FIXTURES / "valid_minimal.yaml"),
        global_=GlobalConfig(),
        tenant=TenantConfig(org_name="standalone", env_name="test", catalog_file=CATALOG),
        products=ProductsConfig(),
        analytics=AnalyticsConfig(),
        auth=AuthConfig(),
    )
    assert config.standalone
    assert not config.tenant.multi_tenant


def test_dataclass_defaults_match_the_named_constants() -> None:
    g, t, p, a, u = GlobalConfig(), TenantConfig(), ProductsConfig(), AnalyticsConfig(), AuthConfig()
    assert g.api_address == parse_address(cfg.DEFAULT_API_ADDRESS, "f", "k") == Address("", 5000)
    assert g.metrics_address == parse_address(cfg.DEFAULT_METRICS_ADDRESS, "f", "k") == Address("", 5001)
    assert (g.temp_dir, g.keep_alive_max_connection_age, g.graceful_shutdown_timeout) == (
        "/tmp/apigee-istio",
        60.0,
        10.0,
    )
    assert (t.client_timeout, t.catalog_poll_interval) == (30.0, 2.0)
    assert p.refresh_rate == cfg.DEFAULT_PRODUCTS_REFRESH == 120.0
    assert (
        a.legacy_endpoint,
        a.file_limit,
        a.send_channel_size,
        a.collection_interval,
        a.flush_interval,
    ) == (
        False,
        1024,
        10,
        120.0,
        1.0,
    )
    assert (u.api_key_cache_duration, u.api_key_header, u.api_header) == (1800.0, "x-api-key", ":authority")


def test_full_config_sets_every_key() -> None:
    config = load_config(FIXTURES / "valid_full.yaml")

    tls = FIXTURES / "tls"
    assert config == Config(
        path=str(FIXTURES / "valid_full.yaml"),
        global_=GlobalConfig(
            api_address=Address("127.0.0.1", 0),
            metrics_address=Address("::1", 9001),
            temp_dir="/var/tmp/authz",
            keep_alive_max_connection_age=300.0,
            tls=ServerTLS(cert_file=str(tls / "server.crt"), key_file=str(tls / "server.key")),
            graceful_shutdown_timeout=2.5,
        ),
        tenant=TenantConfig(
            internal_api="https://istioservices.apigee.net/edgemicro",
            remote_service_api="http://localhost:8080/remote-service",
            org_name="acme",
            env_name="*",
            key="the-key",
            secret="the-secret",
            client_timeout=90.0,
            tls=TenantTLS(
                ca_file=str(tls / "ca.crt"),
                cert_file=str(tls / "client.crt"),
                key_file=str(tls / "client.key"),
                allow_unverified_ssl_cert=True,
            ),
            catalog_file=CATALOG,
            catalog_poll_interval=0.25,
        ),
        products=ProductsConfig(refresh_rate=3600.0),
        analytics=AnalyticsConfig(
            legacy_endpoint=True,
            file_limit=10,
            send_channel_size=3,
            collection_interval=10.0,
            flush_interval=0.25,
            endpoint="https://collector.example.com/analytics",
        ),
        auth=AuthConfig(
            api_key_claim="api_key",
            api_key_cache_duration=0.0,
            api_key_header="x-custom-key",  # lowercased: Envoy lowercases header keys
            api_header="x-api-name",
            allow_unauthorized=True,
            jwt_provider_key="https://apigee.example.com/remote-token/token",
            append_metadata_headers=True,
            api_key_verify_wait=0.3,
            api_key_verify_rate=50,
        ),
    )
    assert config.tenant.multi_tenant


def test_config_is_frozen_and_its_repr_hides_secrets() -> None:
    config = load_config(FIXTURES / "valid_full.yaml")

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tenant.env_name = "prod"  # type: ignore[misc]
    assert "the-key" not in repr(config)
    assert "the-secret" not in repr(config)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _int_b64url(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _provision_output(catalog_file: str) -> tuple[str, str, str, str]:
    """A stream shaped like `apigee-remote-service-cli provision` prints (go-adapter.md §2.3)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    numbers = key.public_key().public_numbers()
    kid = "2024-01-01T00:00:00Z"
    jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid}
    jwks = json.dumps({"keys": [jwk | {"n": _int_b64url(numbers.n), "e": _int_b64url(numbers.e)}]})
    properties = f"kid={kid}\n"
    service_account = json.dumps({"type": "service_account", "client_email": "sa@acme.iam.example"})
    catalog_line = f"catalog_file: {catalog_file}" if catalog_file else ""
    stream = f"""\
# Configuration for apigee-remote-service-envoy (platform: GCP)
# generated by apigee-remote-service-cli provision on 2024-01-01 00:00:00
apiVersion: v1
kind: ConfigMap
metadata:
  name: apigee-remote-service-envoy
  namespace: apigee
data:
  config.yaml: |
    tenant:
      remote_service_api: https://apigee.example.com/remote-service
      org_name: acme
      env_name: test
      {catalog_line}
    analytics:
      collection_interval: 10s
    auth:
      jwt_provider_key: https://apigee.example.com/remote-token/token
      append_metadata_headers: true
---
apiVersion: v1
kind: Secret
type: Opaque
metadata:
  name: acme-test-policy-secret
  namespace: apigee
data:
  remote-service.crt: {_b64(jwks)}
  remote-service.key: {_b64(pem)}
  remote-service.properties: {_b64(properties)}
---
apiVersion: v1
kind: Secret
type: Opaque
metadata:
  name: acme-test-analytics-secret
  namespace: apigee
data:
  client_secret.json: {_b64(service_account)}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: apigee-remote-service-envoy
  namespace: apigee
  labels:
    org: acme
"""
    return stream, pem, jwks, service_account, properties


def test_provision_stream_runs_in_apigee_mode(tmp_path: Path) -> None:
    stream, pem, jwks, *_ = _provision_output("")
    (tmp_path / "config.yaml").write_text(stream)

    config = load_config(tmp_path / "config.yaml")

    assert not config.standalone and config.tenant.gcp_managed
    assert config.tenant.remote_token_jwks_url == "https://apigee.example.com/remote-token/certs"
    assert config.policy_secret == PolicySecret(kid="2024-01-01T00:00:00Z", private_key_pem=pem, jwks=jwks)


def _policy_secret_dir(tmp_path: Path) -> tuple[Path, str, str]:
    """The three policy-secret files in ``tmp_path/policy-secret``; returns (dir, pem, jwks)."""
    _, pem, jwks, _, properties = _provision_output("")
    secret_dir = tmp_path / "policy-secret"
    secret_dir.mkdir()
    for name, text in (("crt", jwks), ("key", pem), ("properties", properties)):
        (secret_dir / f"remote-service.{name}").write_text(text)
    return secret_dir, pem, jwks


def _apigee_plain_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "tenant:\n  remote_service_api: https://apigee.example.com/remote-service\n"
        "  org_name: acme\n  env_name: test\n"
    )
    return path


def test_policy_secret_from_a_directory(tmp_path: Path) -> None:
    secret_dir, pem, jwks = _policy_secret_dir(tmp_path)

    config = load_config(_apigee_plain_config(tmp_path), policy_secret_dir=str(secret_dir))

    assert config.policy_secret == PolicySecret(kid="2024-01-01T00:00:00Z", private_key_pem=pem, jwks=jwks)


def test_policy_secret_directory_problems_name_the_file(tmp_path: Path) -> None:
    _, pem, jwks, _, properties = _provision_output("")
    secret_dir = tmp_path / "policy-secret"
    secret_dir.mkdir()
    config = _apigee_plain_config(tmp_path)
    (secret_dir / "remote-service.key").write_text(pem)
    with pytest.raises(ConfigError, match="missing remote-service.crt, remote-service.properties"):
        load_config(config, policy_secret_dir=str(secret_dir))
    (secret_dir / "remote-service.crt").write_text(jwks)
    (secret_dir / "remote-service.properties").write_text("no kid here\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, policy_secret_dir=str(secret_dir))
    assert str(info.value) == f"{secret_dir}/remote-service.properties: no kid= entry"
    (secret_dir / "remote-service.properties").write_bytes(b"kid=\xff\n")
    with pytest.raises(ConfigError, match="remote-service.properties: cannot read"):
        load_config(config, policy_secret_dir=str(secret_dir))


def test_missing_policy_secret_directory_is_the_missing_secret_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="signed with the provisioned key"):
        load_config(_apigee_plain_config(tmp_path), policy_secret_dir=str(tmp_path / "none"))


@pytest.mark.parametrize(
    ("remote_service_api", "jwks_url"),
    [
        ("https://acme-test.apigee.net/remote-service", "https://acme-test.apigee.net/remote-token/certs"),
        ("https://h.example/remote-service/", "https://h.example/remote-token/certs"),
        ("https://h.example/prefix/remote-service", "https://h.example/prefix/remote-token/certs"),
        ("http://127.0.0.1:8080/rs", "http://127.0.0.1:8080/rs/remote-token/certs"),
    ],
)
def test_remote_token_jwks_url_is_derived(remote_service_api: str, jwks_url: str) -> None:
    assert cfg.remote_token_jwks_url(remote_service_api) == jwks_url


def test_management_api_defaults_to_google_and_can_point_elsewhere(tmp_path: Path) -> None:
    secret_dir, *_ = _policy_secret_dir(tmp_path)
    path = _apigee_plain_config(tmp_path)
    assert load_config(path, str(secret_dir)).tenant.management_api == "https://apigee.googleapis.com"
    path.write_text(path.read_text() + "  management_api: http://127.0.0.1:8080\n")
    assert load_config(path, str(secret_dir)).tenant.management_api == "http://127.0.0.1:8080"


def test_analytics_secret_from_a_directory(tmp_path: Path) -> None:
    secret_dir, *_ = _policy_secret_dir(tmp_path)
    analytics_dir = tmp_path / "analytics-secret"
    analytics_dir.mkdir()
    (analytics_dir / "client_secret.json").write_text('{"type": "service_account"}')
    path = _apigee_plain_config(tmp_path)

    config = load_config(path, str(secret_dir), str(analytics_dir))

    assert config.analytics_secret_json == '{"type": "service_account"}'
    assert effective_config(config)["analytics_secret"] == "***"


def test_analytics_secret_directory_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_dir, *_ = _policy_secret_dir(tmp_path)
    path = _apigee_plain_config(tmp_path)
    analytics_dir = tmp_path / "analytics-secret"
    with pytest.raises(ConfigError) as info:  # a directory named on purpose must hold the file
        load_config(path, str(secret_dir), str(analytics_dir))
    assert str(info.value) == (
        f"{analytics_dir}/client_secret.json: not found (the --analytics-secret directory needs "
        "client_secret.json)"
    )
    analytics_dir.mkdir()
    (analytics_dir / "client_secret.json").write_text("not json")
    with pytest.raises(ConfigError) as info:
        load_config(path, str(secret_dir), str(analytics_dir))
    assert str(info.value) == f"{analytics_dir}/client_secret.json: not a JSON object"
    (analytics_dir / "client_secret.json").write_bytes(b"\xff")
    with pytest.raises(ConfigError, match="client_secret.json: cannot read"):
        load_config(path, str(secret_dir), str(analytics_dir))
    # The default directory may be absent (the Go adapter's rule): then ADC, at start.
    monkeypatch.setattr(cfg, "DEFAULT_ANALYTICS_SECRET_DIR", str(tmp_path / "default"))
    config = load_config(path, str(secret_dir), str(tmp_path / "default"))
    assert config.analytics_secret_json is None


def test_the_stream_analytics_secret_wins_over_the_directory(tmp_path: Path) -> None:
    stream, *_, service_account, _ = _provision_output("")
    (tmp_path / "config.yaml").write_text(stream)
    analytics_dir = tmp_path / "analytics-secret"
    analytics_dir.mkdir()
    (analytics_dir / "client_secret.json").write_text('{"other": 1}')
    config = load_config(tmp_path / "config.yaml", None, str(analytics_dir))
    assert config.analytics_secret_json == service_account


def test_legacy_apigee_uses_basic_auth_without_a_policy_secret(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "tenant:\n  internal_api: https://istioservices.apigee.net/edgemicro\n"
        "  remote_service_api: https://acme-test.apigee.net/remote-service\n"
        "  org_name: acme\n  env_name: test\n  key: k\n  secret: s\n"
        "  remote_token_jwks_url: https://acme-test.apigee.net/edgemicro-auth/jwkPublicKeys\n"
    )
    tenant = load_config(path).tenant
    assert not tenant.gcp_managed
    assert tenant.remote_token_jwks_url == "https://acme-test.apigee.net/edgemicro-auth/jwkPublicKeys"


def test_kubernetes_stream_from_provision(tmp_path: Path) -> None:
    stream, pem, jwks, service_account, _ = _provision_output(CATALOG)
    (tmp_path / "config.yaml").write_text(stream)

    config = load_config(tmp_path / "config.yaml")

    assert config.tenant == TenantConfig(
        remote_service_api="https://apigee.example.com/remote-service",
        org_name="acme",
        env_name="test",
        catalog_file=CATALOG,
    )
    assert config.analytics.collection_interval == 10.0
    assert config.auth.jwt_provider_key == "https://apigee.example.com/remote-token/token"
    assert config.auth.append_metadata_headers
    assert config.policy_secret == PolicySecret(kid="2024-01-01T00:00:00Z", private_key_pem=pem, jwks=jwks)
    assert config.analytics_secret_json == service_account
    assert pem not in repr(config)


def test_kubernetes_configmap_resolves_catalog_against_the_stream_file(tmp_path: Path) -> None:
    (tmp_path / "products.yaml").write_text("products: []\ndevelopers: []\n")
    stream, *_ = _provision_output("products.yaml")
    (tmp_path / "config.yaml").write_text(stream)

    assert load_config(tmp_path / "config.yaml").tenant.catalog_file == str(tmp_path / "products.yaml")


DURATIONS = [
    ("0s", 0.0),
    ("30s", 30.0),
    ("2m", 120.0),
    ("1h", 3600.0),
    ("1m30s", 90.0),
    ("500ms", 0.5),
    ("1.5h", 5400.0),
    ("2.5s", 2.5),
    (".5s", 0.5),
    ("1h2m3s4ms", 3723.004),
    ("250us", 0.00025),
    ("250µs", 0.00025),
    ("10ns", 1e-8),
    ("+5s", 5.0),
    ("-0s", 0.0),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "f.yaml", "k") == pytest.approx(seconds)


BAD_DURATIONS = [
    (30, 'expected a duration string such as "30s" or "2m", got integer'),
    (1.5, 'expected a duration string such as "30s" or "2m", got number'),
    (True, 'expected a duration string such as "30s" or "2m", got boolean'),
    (None, 'expected a duration string such as "30s" or "2m", got null'),
    ("", 'expected a duration such as "30s" or "2m", got an empty string'),
    ("30", 'missing unit in duration "30" (use ns, us, ms, s, m or h)'),
    ("0", 'missing unit in duration "0" (use ns, us, ms, s, m or h)'),
    ("-5s", 'must not be negative, got "-5s"'),
    ("-1m30s", 'must not be negative, got "-1m30s"'),
    ("5 s", 'invalid duration "5 s" (expected e.g. "30s", "1m30s", "1.5h")'),
    ("5d", 'invalid duration "5d" (expected e.g. "30s", "1m30s", "1.5h")'),
    ("s", 'invalid duration "s" (expected e.g. "30s", "1m30s", "1.5h")'),
    (".s", 'invalid duration ".s" (expected e.g. "30s", "1m30s", "1.5h")'),
    ("1m30", 'invalid duration "1m30" (expected e.g. "30s", "1m30s", "1.5h")'),
    ("+", 'missing unit in duration "+" (use ns, us, ms, s, m or h)'),
    ("3000000h", 'invalid duration "3000000h" (expected e.g. "30s", "1m30s", "1.5h")'),
]


@pytest.mark.parametrize(("value", "problem"), BAD_DURATIONS)
def test_parse_duration_rejects(value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "f.yaml", "products.refresh_rate")
    assert str(info.value) == f"f.yaml: products.refresh_rate: {problem}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (30.0, "30s"),
        (120.0, "2m0s"),
        (90.0, "1m30s"),
        (3600.0, "1h0m0s"),
        (5400.5, "1h30m0.5s"),
        (0.5, "500ms"),
        (0.05, "50ms"),
        (0.00025, "250µs"),
        (1e-8, "10ns"),
        (2.5, "2.5s"),
    ],
)
def test_format_duration_is_go_style_and_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text, "f", "k") == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "address", "grpc_target", "http_host", "rendered"),
    [
        (":5000", Address("", 5000), "[::]:5000", "", ":5000"),
        ("127.0.0.1:0", Address("127.0.0.1", 0), "127.0.0.1:0", "127.0.0.1", "127.0.0.1:0"),
        ("[::1]:5000", Address("::1", 5000), "[::1]:5000", "::1", "[::1]:5000"),
        ("localhost:65535", Address("localhost", 65535), "localhost:65535", "localhost", "localhost:65535"),
    ],
)
def test_addresses(text: str, address: Address, grpc_target: str, http_host: str, rendered: str) -> None:
    parsed = parse_address(text, "f", "k")
    assert parsed == address
    assert (parsed.grpc_target(), parsed.http_host(), str(parsed)) == (grpc_target, http_host, rendered)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("localhost", 'expected "host:port" or ":port", got "localhost"'),
        (":", 'invalid port "" (expected 0-65535)'),
        (":http", 'invalid port "http" (expected 0-65535)'),
        (":-1", 'invalid port "-1" (expected 0-65535)'),
        ("[nope]:5000", 'invalid IPv6 host "nope"'),
        ("a b:5000", 'invalid host "a b"'),
    ],
)
def test_parse_address_rejects(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, "f.yaml", "global.api_address")
    assert str(info.value) == f"f.yaml: global.api_address: {problem}"


def test_refresh_rate_below_a_minute_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"tenant: {{env_name: test, catalog_file: {CATALOG}}}\nproducts: {{refresh_rate: 30s}}\n")

    with caplog.at_level(logging.WARNING, logger="authz.config"):
        assert load_config(path).products.refresh_rate == 30.0

    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: products.refresh_rate 30s is below 1m (the Go adapter's minimum); "
        "every refresh downloads all API products from Apigee"
    ]


def test_null_sections_mean_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"global:\n  tls:\nauth:\ntenant: {{env_name: test, catalog_file: {CATALOG}}}\n")

    config = load_config(path)

    assert (config.global_, config.auth) == (GlobalConfig(), AuthConfig())


def test_effective_config_masks_secrets(tmp_path: Path) -> None:
    stream, pem, jwks, service_account, _ = _provision_output(CATALOG)
    stream = stream.replace(
        "      env_name: test\n", "      env_name: test\n      key: k1\n      secret: s1\n"
    )
    (tmp_path / "config.yaml").write_text(stream)

    effective = effective_config(load_config(tmp_path / "config.yaml"))

    tenant = effective["tenant"]
    assert isinstance(tenant, dict)
    assert (tenant["key"], tenant["secret"]) == ("***", "***")
    assert effective["policy_secret"] == {
        "kid": "2024-01-01T00:00:00Z",
        "private_key_pem": "***",
        "jwks": "***",
    }
    assert effective["analytics_secret"] == "***"
    dumped = yaml.safe_dump(effective)
    for secret in ("k1", "s1", pem, jwks, service_account, "client_email"):
        assert secret not in dumped


def test_effective_config_renders_the_file_shape_and_loads_back(tmp_path: Path) -> None:
    config = load_config(FIXTURES / "valid_minimal.yaml")

    effective = effective_config(config)

    assert effective == {
        "global": {
            "api_address": ":5000",
            "metrics_address": ":5001",
            "http_authz_address": "",
            "temp_dir": "/tmp/apigee-istio",
            "keep_alive_max_connection_age": "1m0s",
            "tls": {"cert_file": "", "key_file": ""},
            "graceful_shutdown_timeout": "10s",
        },
        "tenant": {
            "internal_api": "",
            "remote_service_api": "",
            "org_name": "standalone",
            "env_name": "test",
            "key": "",
            "secret": "",
            "client_timeout": "30s",
            "tls": {"ca_file": "", "cert_file": "", "key_file": "", "allow_unverified_ssl_cert": False},
            "catalog_file": CATALOG,
            "catalog_poll_interval": "2s",
            "remote_token_jwks_url": "",
            "management_api": "https://apigee.googleapis.com",
            "key_sync_interval": "0s",
            "management_user": "",
            "management_password": "",
        },
        "products": {"refresh_rate": "2m0s"},
        "analytics": {
            "legacy_endpoint": False,
            "file_limit": 1024,
            "send_channel_size": 10,
            "collection_interval": "2m0s",
            "disk_limit_mb": 1024,
            "flush_interval": "1s",
            "endpoint": "",
        },
        "auth": {
            "api_key_claim": "",
            "api_key_cache_duration": "30m0s",
            "api_key_header": "x-api-key",
            "api_header": ":authority",
            "allow_unauthorized": False,
            "jwt_provider_key": "",
            "append_metadata_headers": False,
            "api_key_verify_wait": "800ms",
            "api_key_verify_rate": 10,
            "jwt_providers": [],
            "quota_headers": False,
            "quota_sync_wait": "250ms",
            "quota_metrics_per_id": False,
        },
    }
    path = tmp_path / "effective.yaml"
    path.write_text(yaml.safe_dump(effective))
    assert dataclasses.replace(load_config(path), path=config.path) == config


def test_missing_file() -> None:
    path = FIXTURES / "no-such-config.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_is_not_a_config() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FIXTURES)
    assert str(info.value) == f"{FIXTURES}: cannot read: Is a directory"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"tenant:\n  env_name: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: not UTF-8 text"


def test_yaml_reader_errors_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("tenant:\n  env_name: te\x01st\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid YAML: unacceptable character #x0001")


def test_kubernetes_objects_that_carry_no_config_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: envoy-bootstrap}\ndata: {envoy.yaml: x}\n"
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: adapter}\n"
        f"data:\n  config.yaml: 'tenant: {{env_name: test, catalog_file: {CATALOG}}}'\n"
        "---\napiVersion: v1\nkind: Secret\nmetadata: {name: acme-test-policy-secret}\ndata: {}\n"
        "---\napiVersion: v1\nkind: Secret\nmetadata: {name: tls-certs}\ndata: {tls.crt: '!!'}\n"
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: adapter}\ndata: [1]\n"
    )

    config = load_config(path)

    assert (config.tenant.env_name, config.policy_secret, config.analytics_secret_json) == (
        "test",
        None,
        None,
    )


def test_key_sync_on_apigee_x_uses_the_management_api_with_google_credentials(tmp_path: Path) -> None:
    secret_dir, *_ = _policy_secret_dir(tmp_path)
    path = _apigee_plain_config(tmp_path)
    assert not load_config(path, str(secret_dir)).tenant.key_sync  # off by default
    path.write_text(path.read_text() + "  key_sync_interval: 5m\n")

    tenant = load_config(path, str(secret_dir)).tenant

    assert (tenant.key_sync, tenant.key_sync_interval, tenant.management_api) == (
        True,
        300.0,
        "https://apigee.googleapis.com",
    )


def test_key_sync_on_legacy_edge_uses_basic_auth_and_its_own_management_api() -> None:
    config = load_config(FIXTURES / "valid_legacy_key_sync.yaml")

    tenant = config.tenant
    assert (tenant.key_sync_interval, tenant.management_api, tenant.management_user) == (
        600.0,
        "https://api.enterprise.apigee.com",
        "ops@acme.example",
    )
    assert tenant.management_password == "hunter2"
    assert "hunter2" not in repr(config)
    assert effective_config(config)["tenant"]["management_password"] == "***"  # type: ignore[index]


def test_a_short_key_sync_interval_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret_dir, *_ = _policy_secret_dir(tmp_path)
    path = _apigee_plain_config(tmp_path)
    path.write_text(path.read_text() + "  key_sync_interval: 5s\n")

    assert load_config(path, str(secret_dir)).tenant.key_sync_interval == 5.0
    assert "tenant.key_sync_interval 5s is below 1m" in caplog.text


# One fixture per invalid case; {dir} stands for the fixtures directory.
INVALID = {
    "invalid_key_sync_below_minimum.yaml": "tenant.key_sync_interval: must be 0s (off) or at least 1s",
    "invalid_key_sync_standalone.yaml": (
        "tenant.key_sync_interval: only for Apigee mode (tenant.catalog_file is set)"
    ),
    "invalid_key_sync_edge_without_password.yaml": (
        "tenant.management_password: required for tenant.key_sync_interval on legacy Edge (Basic auth)"
    ),
    "invalid_key_sync_edge_on_google.yaml": (
        "tenant.management_api: set it to your Edge management API (https://api.enterprise.apigee.com for "
        "Edge SaaS) for tenant.key_sync_interval on legacy Edge"
    ),
    "invalid_management_user_without_key_sync.yaml": (
        "tenant.management_user: only for legacy Edge (tenant.internal_api set) with "
        "tenant.key_sync_interval; Apigee X and hybrid list apps with Google credentials (the analytics "
        "service account or ADC)"
    ),
    "invalid_api_key_verify_rate_zero.yaml": "auth.api_key_verify_rate: must be at least 1, got 0",
    "invalid_address_not_string.yaml": "global.api_address: expected a string, got integer",
    "invalid_analytics_secret_not_json.yaml": (
        "Secret/acme-test-analytics-secret data.client_secret.json: not a JSON object"
    ),
    "invalid_bad_address.yaml": 'global.api_address: expected "host:port" or ":port", got "5000"',
    "invalid_bad_duration.yaml": (
        'products.refresh_rate: invalid duration "2 minutes" (expected e.g. "30s", "1m30s", "1.5h")'
    ),
    "invalid_bad_port.yaml": 'global.metrics_address: invalid port "70000" (expected 0-65535)',
    "invalid_catalog_file_is_directory.yaml": "tenant.catalog_file: not a regular file: {dir}/tls",
    "invalid_catalog_poll_interval_below_minimum.yaml": (
        "tenant.catalog_poll_interval: must be at least 50ms, got 10ms"
    ),
    "invalid_client_timeout_zero.yaml": "tenant.client_timeout: must be greater than 0s",
    "invalid_collection_interval_below_minimum.yaml": (
        "analytics.collection_interval: must be at least 1s, got 500ms"
    ),
    "invalid_flush_interval_above_collection_interval.yaml": (
        "analytics.flush_interval: must be at most collection_interval (5s)"
    ),
    "invalid_flush_interval_below_minimum.yaml": "analytics.flush_interval: must be at least 10ms, got 1ms",
    "invalid_duplicate_key.yaml": "invalid YAML at line 4, column 3: duplicate key 'env_name'",
    "invalid_duration_number.yaml": (
        'tenant.client_timeout: expected a duration string such as "30s" or "2m", got integer'
    ),
    "invalid_duration_without_unit.yaml": (
        'tenant.client_timeout: missing unit in duration "30" (use ns, us, ms, s, m or h)'
    ),
    "invalid_empty.yaml": "empty config file",
    "invalid_analytics_endpoint_credentials.yaml": (
        "analytics.endpoint: must not carry credentials (user:password@)"
    ),
    "invalid_analytics_endpoint_in_apigee_mode.yaml": (
        "analytics.endpoint: only for standalone mode (tenant.catalog_file set); in Apigee mode analytics "
        "go to Apigee"
    ),
    "invalid_analytics_endpoint_url.yaml": (
        'analytics.endpoint: expected an http or https URL, got "collector.example.com/analytics"'
    ),
    "invalid_apigee_without_policy_secret.yaml": (
        "tenant.internal_api: empty, so this is Apigee X or hybrid, whose calls are signed with the "
        "provisioned key: add the policy Secret to this file or mount remote-service.key, "
        "remote-service.properties and remote-service.crt in the --policy-secret directory (or set "
        "internal_api, key and secret for legacy Apigee SaaS or OPDK)"
    ),
    "invalid_apigee_without_remote_service_api.yaml": (
        "tenant.remote_service_api: required in Apigee mode (when tenant.catalog_file is not set)"
    ),
    "invalid_apigee_without_org.yaml": "tenant.org_name: required in Apigee mode (when tenant.catalog_file is not set)",
    "invalid_apigee_legacy_without_secret.yaml": "tenant.secret: required when tenant.internal_api is set (Basic auth)",
    "invalid_apigee_jwks_url.yaml": (
        'tenant.remote_token_jwks_url: expected an http or https URL, got "acme-test.apigee.net/certs"'
    ),
    "invalid_file_limit_zero.yaml": "analytics.file_limit: must be at least 1, got 0",
    "invalid_header_empty.yaml": "auth.api_key_header: must not be empty",
    "invalid_ipv6_without_brackets.yaml": (
        'global.api_address: IPv6 hosts need brackets, like "[::1]:5000"; got "::1:5000"'
    ),
    "invalid_k8s_config_empty.yaml": (
        "ConfigMap/apigee-remote-service-envoy data.config.yaml: expected one YAML document, found 0"
    ),
    "invalid_k8s_config_not_string.yaml": (
        "ConfigMap/apigee-remote-service-envoy data.config.yaml: expected a string, got mapping"
    ),
    "invalid_k8s_inner_unknown_key.yaml": (
        "tenant.org: unknown key (expected one of: internal_api, remote_service_api, org_name, env_name, "
        "key, secret, client_timeout, tls, catalog_file, catalog_poll_interval, remote_token_jwks_url, "
        "management_api, key_sync_interval, management_user, management_password)"
    ),
    "invalid_k8s_inner_yaml.yaml": (
        "ConfigMap/apigee-remote-service-envoy data.config.yaml: invalid YAML at line 3, column 1: "
        "expected ',' or ']', but got '<stream end>'"
    ),
    "invalid_k8s_secret_data_not_mapping.yaml": "Secret/acme-test-policy-secret data: expected a mapping, got list",
    "invalid_k8s_two_configmaps.yaml": "expected one ConfigMap with data.config.yaml, found 2",
    "invalid_k8s_without_configmap.yaml": "expected one ConfigMap with data.config.yaml, found 0",
    "invalid_keep_alive_zero.yaml": "global.keep_alive_max_connection_age: must be greater than 0s",
    "invalid_missing_catalog_file.yaml": "tenant.catalog_file: file not found: {dir}/no-such-catalog.yaml",
    "invalid_management_api_url.yaml": (
        'tenant.management_api: expected an http or https URL, got "apigee.googleapis.com"'
    ),
    "invalid_management_api_empty.yaml": "tenant.management_api: must not be empty",
    "invalid_legacy_with_analytics_secret.yaml": (
        "tenant.internal_api: set, so this is legacy Apigee SaaS or OPDK, whose analytics use Basic auth, "
        "but an analytics service-account Secret (client_secret.json) is given too; it is for Apigee X or "
        "hybrid only: remove one (the Go adapter refuses both as mutually exclusive)"
    ),
    "invalid_negative_duration.yaml": 'auth.api_key_cache_duration: must not be negative, got "-5m"',
    "invalid_null_value.yaml": "tenant.env_name: expected a string, got null",
    "invalid_policy_secret_bad_base64.yaml": (
        "Secret/acme-test-policy-secret data.remote-service.key: not valid base64-encoded UTF-8 text"
    ),
    "invalid_policy_secret_jwks.yaml": (
        'Secret/acme-test-policy-secret data.remote-service.crt: not a JWKS (no "keys" list)'
    ),
    "invalid_policy_secret_not_pem.yaml": (
        "Secret/acme-test-policy-secret data.remote-service.key: not a PEM private key"
    ),
    "invalid_policy_secret_partial.yaml": (
        "Secret/acme-test-policy-secret data: needs all of remote-service.crt, remote-service.key, "
        "remote-service.properties; missing remote-service.crt"
    ),
    "invalid_policy_secret_without_kid.yaml": (
        "Secret/acme-test-policy-secret data.remote-service.properties: no kid= entry"
    ),
    "invalid_policy_secret_value_not_string.yaml": (
        "Secret/acme-test-policy-secret data.remote-service.crt: expected a base64 string, got integer"
    ),
    "invalid_refresh_rate_below_minimum.yaml": "products.refresh_rate: must be at least 1s, got 500ms",
    "invalid_same_addresses.yaml": "global.metrics_address: same as global.api_address (:7000)",
    "invalid_http_authz_same_as_api.yaml": "global.http_authz_address: same as global.api_address (:7000)",
    "invalid_http_authz_address.yaml": 'global.http_authz_address: invalid port "x" (expected 0-65535)',
    "invalid_section_not_mapping.yaml": "auth: expected a mapping, got list",
    "invalid_send_channel_size_zero.yaml": "analytics.send_channel_size: must be at least 1, got 0",
    "invalid_standalone_without_env_name.yaml": "tenant.env_name: required when tenant.catalog_file is set",
    "invalid_temp_dir_empty.yaml": "global.temp_dir: must not be empty",
    "invalid_tenant_tls_partial.yaml": "tenant.tls.cert_file: required when tenant.tls.ca_file is set",
    "invalid_tls_file_missing.yaml": "global.tls.cert_file: file not found: {dir}/tls/missing.crt",
    "invalid_tls_half_pair.yaml": "global.tls.key_file: required when global.tls.cert_file is set",
    "invalid_top_level_list.yaml": "expected a mapping, got list",
    "invalid_two_plain_documents.yaml": "2 YAML documents but no Kubernetes ConfigMap",
    "invalid_unknown_key.yaml": "global.api_adress: unknown key (did you mean 'api_address'?)",
    "invalid_unknown_key_no_match.yaml": (
        "auth.frobnicate: unknown key (expected one of: api_key_claim, api_key_cache_duration, "
        "api_key_header, api_header, allow_unauthorized, jwt_provider_key, append_metadata_headers, "
        "api_key_verify_wait, api_key_verify_rate, jwt_providers, quota_headers, quota_sync_wait, quota_metrics_per_id)"
    ),
    "invalid_unknown_section.yaml": "tenants: unknown section (did you mean 'tenant'?)",
    "invalid_url_scheme.yaml": (
        'tenant.remote_service_api: expected an http or https URL, got "ftp://apigee.example.com/remote-service"'
    ),
    "invalid_url_without_host.yaml": 'tenant.internal_api: expected an http or https URL, got "https://"',
    "invalid_wrong_type_bool.yaml": "auth.allow_unauthorized: expected a boolean, got string",
    "invalid_wrong_type_int.yaml": "analytics.file_limit: expected an integer, got boolean",
    "invalid_wrong_type_string.yaml": "tenant.env_name: expected a string, got integer",
    "invalid_yaml.yaml": "invalid YAML at line 3, column 16: mapping values are not allowed here",
}


def test_every_invalid_fixture_has_a_case() -> None:
    assert sorted(p.name for p in FIXTURES.glob("invalid_*.yaml")) == sorted(INVALID)


@pytest.mark.parametrize(("name", "problem"), sorted(INVALID.items()))
def test_invalid_config(name: str, problem: str) -> None:
    path = FIXTURES / name
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: " + problem.replace("{dir}", str(FIXTURES))


def _with_providers(tmp_path: Path, providers: str, tenant: str = "") -> Path:
    path = tmp_path / "config.yaml"
    tenant = tenant or f"  org_name: acme\n  env_name: test\n  catalog_file: {CATALOG}\n"
    path.write_text(f"tenant:\n{tenant}auth:\n  jwt_providers:\n{providers}")
    return path


def test_jwt_providers(tmp_path: Path) -> None:
    from authz.config_providers import ASYMMETRIC_ALGORITHMS, ClaimNames, JwtProvider

    path = _with_providers(
        tmp_path,
        "    - issuer: https://accounts.google.com\n"
        "      audiences: [https://orders.example.run.app]\n"
        "      products: [orders]\n"
        "      claims: {client_id: azp, application: sub, developer_email: email}\n"
        "    - name: corp\n"
        "      issuer: https://login.example.com/realms/corp\n"
        "      jwks_uri: https://login.example.com/realms/corp/certs\n"
        "      audiences: [orders, billing]\n"
        "      algorithms: [ES256]\n"
        "      clock_skew: 5s\n"
        "      refresh_interval: 1m\n"
        "      unknown_kid_cooldown: 5s\n"
        "      header: X-Corp-Token\n"
        "      prefix: ''\n"
        "      forward: true\n",
    )
    google, corp = load_config(path).auth.jwt_providers
    assert google == JwtProvider(
        name="accounts.google.com",
        issuer="https://accounts.google.com",
        audiences=("https://orders.example.run.app",),
        algorithms=ASYMMETRIC_ALGORITHMS,
        products=("orders",),
        claims=ClaimNames(client_id="azp", application="sub", developer_email="email"),
    )
    assert (corp.name, corp.jwks_uri, corp.algorithms, corp.clock_skew) == (
        "corp", "https://login.example.com/realms/corp/certs", ("ES256",), 5.0)  # fmt: skip
    assert (corp.refresh_interval, corp.header, corp.prefix, corp.forward) == (60.0, "x-corp-token", "", True)
    assert (corp.unknown_kid_cooldown, google.unknown_kid_cooldown) == (5.0, 30.0)


@pytest.mark.parametrize(
    ("providers", "problem"),
    [
        ("    - audiences: [a]\n", "auth.jwt_providers[0].issuer: required"),
        ("    - issuer: https://i.example\n", "auth.jwt_providers[0].audiences: required: without it, tokens "
         "the issuer made for other services pass"),
        ("    - {issuer: https://i.example, audiences: [a], algorithms: [HS256]}\n",
         'auth.jwt_providers[0].algorithms: "HS256" is not allowed (only asymmetric ones: RS256, RS384, '
         "RS512, PS256, PS384, PS512, ES256, ES384, ES512)"),
        ("    - {issuer: https://i.example, audiences: [a], algorithms: [none]}\n",
         'auth.jwt_providers[0].algorithms: "none" is not allowed (only asymmetric ones: RS256, RS384, '
         "RS512, PS256, PS384, PS512, ES256, ES384, ES512)"),
        ("    - {issuer: https://i.example, audiences: [a]}\n    - {issuer: https://i.example, audiences: [b]}\n",
         'auth.jwt_providers[1].name: "i.example" is used by another provider'),
        ("    - {name: x, issuer: https://i.example, audiences: [a]}\n"
         "    - {name: y, issuer: https://i.example, audiences: [b]}\n",
         'auth.jwt_providers[1].issuer: "https://i.example" is used by another provider'),
        ("    - {issuer: i.example, audiences: [a]}\n",
         'auth.jwt_providers[0].issuer: expected an http or https URL, got "i.example"'),
        ("    - {issuer: https://i.example, audiences: a}\n", "auth.jwt_providers[0].audiences: expected a list, got string"),
        ("    - {issuer: https://i.example, audiences: ['']}\n",
         "auth.jwt_providers[0].audiences[0]: expected a non-empty string, got string"),
        ("    - {issuer: https://i.example, audiences: [a], claims: {product: x}}\n",
         "auth.jwt_providers[0].claims.product: unknown key (did you mean 'products'?)"),
        ("    - {issuer: https://i.example, audiences: [a], refresh_interval: 1s}\n",
         "auth.jwt_providers[0].refresh_interval: must be at least 10s, got 1s"),
        ("    - https://i.example\n", "auth.jwt_providers[0]: expected a mapping, got string"),
        ("    - {issuer: https://i.example, audiences: [a], unknown_kid_cooldown: 100ms}\n",
         "auth.jwt_providers[0].unknown_kid_cooldown: must be at least 1s, got 100ms"),
    ],
)  # fmt: skip
def test_invalid_jwt_providers(tmp_path: Path, providers: str, problem: str) -> None:
    path = _with_providers(tmp_path, providers)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {problem}"


def test_apigee_mode_adds_the_remote_token_provider(tmp_path: Path) -> None:
    stream, *_ = _provision_output("")
    (tmp_path / "config.yaml").write_text(stream)
    (provider,) = load_config(tmp_path / "config.yaml").auth.jwt_providers
    assert (provider.name, provider.issuer, provider.jwks_uri, provider.audiences, provider.algorithms) == (
        "apigee",
        "https://apigee.example.com/remote-token/token",
        "https://apigee.example.com/remote-token/certs",
        ("remote-service-client",),
        ("RS256",),
    )


def test_a_configured_remote_token_provider_replaces_the_default(tmp_path: Path) -> None:
    secret_dir, pem, jwks = _policy_secret_dir(tmp_path)
    tenant = "  remote_service_api: https://apigee.example.com/remote-service\n  org_name: acme\n  env_name: test\n"
    path = _with_providers(
        tmp_path,
        "    - {name: mine, issuer: https://apigee.example.com/remote-token/token, audiences: [x]}\n"
        "    - {name: apigee, issuer: https://other.example, audiences: [y]}\n",
        tenant,
    )
    providers = load_config(path, policy_secret_dir=str(secret_dir)).auth.jwt_providers
    assert [(p.name, p.audiences) for p in providers] == [("mine", ("x",)), ("apigee", ("y",))]
    path = _with_providers(
        tmp_path, "    - {name: apigee, issuer: https://other.example, audiences: [y]}\n", tenant
    )
    providers = load_config(path, policy_secret_dir=str(secret_dir)).auth.jwt_providers
    assert [p.name for p in providers] == ["apigee-remote-token", "apigee"]


def test_effective_config_with_providers_loads_back(tmp_path: Path) -> None:
    secret_dir, pem, jwks = _policy_secret_dir(tmp_path)
    config = load_config(_apigee_plain_config(tmp_path), policy_secret_dir=str(secret_dir))
    effective = effective_config(config)
    assert effective["auth"]["jwt_providers"][0]["claims"]["products"] == "api_product_list"
    path = tmp_path / "effective.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in effective.items() if k != "policy_secret"}))
    assert load_config(path, policy_secret_dir=str(secret_dir)).auth == config.auth


def test_http_authz_address_is_off_by_default_and_read_when_set(tmp_path: Path) -> None:
    assert load_config(FIXTURES / "valid_minimal.yaml").global_.http_authz_address is None
    (tmp_path / "catalog.yaml").write_text((FIXTURES / "catalog.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(
        "tenant: {env_name: test, catalog_file: catalog.yaml}\nglobal: {http_authz_address: '127.0.0.1:5002'}\n"
    )
    config = load_config(path)
    assert config.global_.http_authz_address == Address("127.0.0.1", 5002)
    assert effective_config(config)["global"]["http_authz_address"] == "127.0.0.1:5002"  # type: ignore[index]
