"""The Locust runner's local target: authz + Envoy sidecar + echo upstream, with keys, tokens and products
made for the scenarios of ``loadtest/locustfile.py``.

:func:`start_local` writes, under a work dir:

* a catalog (Apigee's product shape) on the API ``loadtest-api`` (every route of the sidecar sends it as
  the ``apigee_api`` context extension): product ``loadtest`` covers ``/v1/items`` (GET), product
  ``loadtest-quota`` covers ``/v1/limited`` (GET) with a quota of ``quota_limit`` a minute; app
  ``loadtest-app`` holds a fresh valid key and product ``loadtest`` only (so ``/v2/forbidden`` and
  ``/v1/limited`` are 403 for it), app ``loadtest-quota-app`` holds a fresh quota key and
  ``loadtest-quota`` only;
* an RS256 issuer (``loadtest/jwt_issuer.py``): its JWKS served on loopback, one token for ``jwt_cached``
  and a pool of distinct ones for ``jwt_unique`` in ``tokens.txt``; authz's ``auth.jwt_providers`` grants
  valid tokens the product ``loadtest``;

then starts the stack with ``devstack`` helpers: authz standalone from that catalog, or with ``apigee``
in Apigee mode against a FakeApigee subprocess serving the same products and keys (policy secret and
analytics service account as ``make run-apigee`` makes them). Every process goes on the caller's
``ExitStack``, which stops it by PID.

Imports the standard library, PyYAML, :mod:`devstack`, :mod:`loadtest` and ``tests.support`` (the fake's
credentials, as ``devstack.apigee`` does); never the ``authz`` package.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devstack.apigee import (
    EXT_AUTHZ_TIMEOUT,
    FakeKey,
    apigee_overrides,
    start_fake_apigee,
    write_policy_secret,
)
from devstack.procs import free_port
from devstack.stack import DEFAULT_ENV, deep_merge, start_stack
from devstack.upstream import EchoUpstream
from loadtest.jwt_issuer import Issuer, provider_overrides, serve_jwks, write_lines
from loadtest.locust_outcomes import DEFAULT_PATH, DEFAULT_QUOTA_PATH, option_env
from tests.support.apigee_config import new_service_account, write_analytics_secret

API_NAME = "loadtest-api"
PRODUCT = "loadtest"
QUOTA_PRODUCT = "loadtest-quota"
DEFAULT_QUOTA_LIMIT = 20  # per minute: spent within the first second of a run, so 429s follow
QUOTA_WINDOW = 60.0  # seconds: the quota's interval 1, timeUnit minute
APIGEE_QUOTA_SLACK = 1  # Apigee mode admits at most limit + replicas a window (README, Quotas); one replica


@dataclass
class Target:
    """Where Locust sends its load and what the locustfile needs to know (its LOCUST_AUTHZ_* variables)."""

    url: str
    env: dict[str, str] = field(repr=False)
    quota_limit: int | None
    quota_window: float
    quota_slack: int
    description: str
    metrics_url: str | None = None
    log_dir: Path | None = None


def products(quota_limit: int) -> list[dict[str, Any]]:
    """The two products, in Apigee's JSON shape (quota fields are strings, as Apigee sends them)."""

    def product(name: str, path: str, quota: dict[str, str] | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "apiSource": API_NAME,
            "operations": [{"resource": path, "methods": ["GET"]}],
        }
        if quota is not None:
            config["quota"] = quota
        return {
            "name": name,
            "environments": [DEFAULT_ENV],
            "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [config]},
        }

    quota = {"limit": str(quota_limit), "interval": "1", "timeUnit": "minute"}
    return [product(PRODUCT, DEFAULT_PATH), product(QUOTA_PRODUCT, DEFAULT_QUOTA_PATH, quota)]


def catalog(valid_key: str, quota_key: str, quota_limit: int) -> dict[str, Any]:
    """The standalone catalog: the products and one app per key (only the keys' SHA-256 are stored)."""

    def app(name: str, product: str, key: str) -> dict[str, Any]:
        credential = {"key_sha256": hashlib.sha256(key.encode()).hexdigest(), "status": "approved"}
        return {"name": name, "products": [product], "credentials": [credential]}

    apps = [app("loadtest-app", PRODUCT, valid_key), app("loadtest-quota-app", QUOTA_PRODUCT, quota_key)]
    return {"products": products(quota_limit), "developers": [{"email": "locust@example.com", "apps": apps}]}


def fake_keys(valid_key: str, quota_key: str) -> list[FakeKey]:
    """The same two apps for the FakeApigee (Apigee mode)."""
    return [
        FakeKey(valid_key, "loadtest-app", "locust@example.com", (PRODUCT,)),
        FakeKey(quota_key, "loadtest-quota-app", "locust@example.com", (QUOTA_PRODUCT,)),
    ]


def start_local(
    work_dir: Path,
    stack: contextlib.ExitStack,
    *,
    apigee: bool = False,
    quota_limit: int = DEFAULT_QUOTA_LIMIT,
    jwt_pool: int = 2000,
) -> Target:
    """Start the local target (see the module docstring); every process is registered on ``stack``.

    Raises:
        StartupError: a process did not start; what was started is stopped by ``stack``.
    """
    log_dir = work_dir / "logs"
    valid_key, quota_key = f"lt-{secrets.token_urlsafe(18)}", f"lt-quota-{secrets.token_urlsafe(18)}"
    issuer = Issuer.new()
    cached_token, *unique_tokens = issuer.mint_many(jwt_pool + 1)
    tokens_file = write_lines(work_dir / "tokens.txt", unique_tokens)
    jwks, jwks_uri = serve_jwks(issuer, work_dir, log_dir, name="jwks")
    stack.callback(jwks.stop)
    jwt = provider_overrides(jwks_uri)
    jwt["auth"]["jwt_providers"][0]["products"] = [PRODUCT]
    upstream = stack.enter_context(EchoUpstream())
    options: dict[str, Any] = {"api_name": API_NAME}
    if apigee:
        options.update(_start_fake(work_dir, stack, valid_key, quota_key, quota_limit))
        catalog_path = None
        options["overrides"] = deep_merge(options["overrides"], jwt)
    else:
        catalog_path = work_dir / "catalog.yaml"
        catalog_path.write_text(yaml.safe_dump(catalog(valid_key, quota_key, quota_limit), sort_keys=False))
        options["overrides"] = jwt
    running = start_stack(work_dir, catalog_path, upstream.port, **options)
    stack.callback(running.close)
    env = {
        option_env("authz-api-key"): valid_key,
        option_env("authz-quota-key"): quota_key,
        option_env("authz-jwt"): cached_token,
        option_env("authz-tokens-file"): str(tokens_file),
    }
    mode = "Apigee mode against a fake Apigee" if apigee else "standalone"
    return Target(
        url=running.url,
        env=env,
        quota_limit=quota_limit,
        quota_window=QUOTA_WINDOW,
        quota_slack=APIGEE_QUOTA_SLACK if apigee else 0,
        description=f"local stack ({mode}): Envoy {running.url}, authz {running.metrics_url}",
        metrics_url=running.metrics_url,
        log_dir=log_dir,
    )


def _start_fake(
    work_dir: Path, stack: contextlib.ExitStack, valid_key: str, quota_key: str, quota_limit: int
) -> dict[str, Any]:
    """The FakeApigee with the products and keys; returns start_stack's Apigee-mode keyword arguments."""
    secret = write_policy_secret(work_dir / "policy-secret")
    port = free_port()
    # A Google service account the fake knows, for analytics uploads (the Envoy sidecar streams its access
    # log to authz): authz reads it from AUTHZ_ANALYTICS_SECRET, as make run-apigee gives it.
    account = new_service_account(f"http://127.0.0.1:{port}/token")
    os.environ["AUTHZ_ANALYTICS_SECRET"] = str(
        write_analytics_secret(work_dir / "analytics-secret", account).parent
    )
    fake = start_fake_apigee(
        work_dir,
        products(quota_limit),
        fake_keys(valid_key, quota_key),
        secret.jwks,
        port=port,
        service_account=account,
    )
    stack.callback(fake.proc.stop)
    return {
        "overrides": apigee_overrides(fake.remote_service_url),
        "envoy_vars": {"EXT_AUTHZ_TIMEOUT": EXT_AUTHZ_TIMEOUT},
        "policy_secret_dir": secret.directory,
    }
