"""Apigee-mode test setup: a provisioned policy secret on disk, a Google service account for Apigee X/hybrid
analytics, and a config pointing at a fake Apigee."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

KID = "2024-01-01T00:00:00Z"  # the CLI uses an RFC 3339 timestamp as kid
SERVICE_ACCOUNT_EMAIL = "apigee-analytics@acme-project.iam.gserviceaccount.com"


@dataclass(frozen=True)
class PolicySecretFiles:
    directory: Path
    kid: str
    jwks: dict[str, object]  # the public half, for FakeApigee(policy_jwks=...)


def write_policy_secret(directory: Path) -> PolicySecretFiles:
    """The three files `apigee-remote-service-cli provision` puts in the policy Secret."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = {
        "keys": [{"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig", "n": public["n"], "e": public["e"]}]
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "remote-service.key").write_text(pem)
    (directory / "remote-service.crt").write_text(json.dumps(jwks))
    (directory / "remote-service.properties").write_text(f"kid={KID}\n")
    return PolicySecretFiles(directory, KID, jwks)


def apigee_config_yaml(
    remote_service_api: str,
    temp_dir: str,
    *,
    env: str = "test",
    refresh_rate: str = "1s",
    extra_tenant: str = "",
    extra_auth: str = "",
) -> str:
    return f"""
global:
  api_address: "127.0.0.1:0"
  metrics_address: "127.0.0.1:0"
  graceful_shutdown_timeout: 2s
  temp_dir: {temp_dir}
tenant:
  remote_service_api: {remote_service_api}
  org_name: org
  env_name: "{env}"
  client_timeout: 2s
{extra_tenant}
products:
  refresh_rate: {refresh_rate}
auth:
  append_metadata_headers: false
{extra_auth}
"""


@dataclass(frozen=True)
class ServiceAccount:
    """A Google service-account key: ``info`` is its ``client_secret.json``; register the public half with
    ``FakeApigee.add_service_account(account.client_email, account.public_key_pem)``."""

    info: dict[str, str]
    public_key_pem: str

    @property
    def client_email(self) -> str:
        return self.info["client_email"]

    def json(self) -> str:
        return json.dumps(self.info)


def new_service_account(token_uri: str, client_email: str = SERVICE_ACCOUNT_EMAIL) -> ServiceAccount:
    """A fresh key in the JSON layout ``gcloud iam service-accounts keys create`` writes; ``token_uri`` is
    the fake's ``{base_url}/token``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    info = {
        "type": "service_account",
        "project_id": "acme-project",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": pem,
        "client_email": client_email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "universe_domain": "googleapis.com",
    }
    return ServiceAccount(info, public)


def write_analytics_secret(directory: Path, account: ServiceAccount) -> Path:
    """``client_secret.json`` in ``directory``, as the analytics Secret is mounted (``--analytics-secret``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "client_secret.json"
    path.write_text(account.json())
    return path
