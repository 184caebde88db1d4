"""Apigee mode for the local stack and the bench: a FakeApigee subprocess and a provisioned policy secret.

Used by ``python -m devstack --apigee`` (``make run-apigee``) and ``loadtest/bench.py`` case (d). The fake
is the test suite's ``FakeApigee`` run as ``python -m tests.fakes.apigee`` from the repository root; the
policy secret is written by ``tests.support.apigee_config`` in the layout ``apigee-remote-service-cli
provision`` gives it (``remote-service.key``, ``.properties``, ``.crt``), and the fake requires our
internal JWT signed with it, as Apigee X/hybrid does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devstack.envoy import REPO_ROOT
from devstack.procs import Proc, free_port, wait_port_open
from devstack.stack import DEFAULT_ENV, DEFAULT_ORG
from tests.support.apigee_config import PolicySecretFiles, ServiceAccount, write_policy_secret

# Envoy's ext_authz deadline in Apigee mode: above the service's own 0.8 s wait for a key it has not
# verified yet, as in the Go adapter's sample Envoy config, so that a slow Apigee gets the service's
# 503 auth_unavailable rather than Envoy's timeout.
EXT_AUTHZ_TIMEOUT = "1s"
FAKE_READY_TIMEOUT = 15.0
BASE_PATH = "/remote-service"

__all__ = [
    "EXT_AUTHZ_TIMEOUT",
    "FakeApigeeProc",
    "FakeKey",
    "PolicySecretFiles",
    "apigee_overrides",
    "start_fake_apigee",
    "write_policy_secret",
]


@dataclass(frozen=True)
class FakeKey:
    """An API key the fake accepts, with the app and products its verifyApiKey token names."""

    key: str
    app: str
    developer_email: str
    products: tuple[str, ...]

    def spec(self) -> str:
        """The fake's ``--key`` argument."""
        return f"{self.key}:{self.app}:{self.developer_email}:{','.join(self.products)}"


@dataclass(frozen=True)
class FakeApigeeProc:
    proc: Proc
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def remote_service_url(self) -> str:
        """The value for ``tenant.remote_service_api``."""
        return self.base_url + BASE_PATH


def start_fake_apigee(
    work_dir: Path,
    products: Sequence[Mapping[str, Any]],
    keys: Sequence[FakeKey],
    policy_jwks: Mapping[str, Any],
    *,
    port: int | None = None,
    name: str = "fake-apigee",
    org: str = DEFAULT_ORG,
    env: str = DEFAULT_ENV,
    log_dir: Path | None = None,
    service_account: ServiceAccount | None = None,
) -> FakeApigeeProc:
    """Write the products and the policy JWKS under ``work_dir``, start the fake on 127.0.0.1 and wait
    until it listens. Its log is ``<log_dir or work_dir/logs>/<name>.log``.

    Raises:
        StartupError: the fake exited or did not listen in time; it is stopped.
    """
    port = port or free_port()
    products_path = work_dir / f"{name}-products.json"
    products_path.write_text(json.dumps({"apiProduct": list(products)}, indent=1))
    jwks_path = work_dir / f"{name}-policy-jwks.json"
    jwks_path.write_text(json.dumps(policy_jwks))
    argv = [
        sys.executable, "-m", "tests.fakes.apigee", "--port", str(port), "--org", org, "--env", env,
        "--products", str(products_path), "--policy-jwks", str(jwks_path),
    ]  # fmt: skip
    for key in keys:
        argv += ["--key", key.spec()]
    if service_account is not None:  # Google tokens for the management API (key index) and analytics
        public_key = work_dir / f"{name}-service-account.pem"
        public_key.write_text(service_account.public_key_pem)
        argv += ["--service-account", f"{service_account.client_email}={public_key}"]
    proc = Proc(name, argv, log_dir or work_dir / "logs", env={"PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT)
    try:
        wait_port_open(port, FAKE_READY_TIMEOUT, proc)
    except BaseException:
        proc.stop()
        raise
    return FakeApigeeProc(proc, port)


def apigee_overrides(remote_service_url: str, key_sync_interval: str | None = None) -> dict[str, Any]:
    """authz config overrides for Apigee mode against the fake at ``remote_service_url``.

    ``tenant.management_api`` is the fake too, so analytics and the key index's listings never go to the
    real apigee.googleapis.com; they need Google credentials (an analytics Secret whose service account the
    fake knows, as ``make run-apigee`` sets up), else analytics stay staged and the key index never loads.
    """
    parts = urlsplit(remote_service_url)
    tenant = {"remote_service_api": remote_service_url, "management_api": f"{parts.scheme}://{parts.netloc}"}
    if key_sync_interval is not None:  # the key index, listed from the fake's management API
        tenant["key_sync_interval"] = key_sync_interval
    return {"tenant": tenant}
