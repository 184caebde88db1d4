"""Catalog texts for tests, with the plaintext keys they were made from."""

from __future__ import annotations

import yaml

from authz.decision.authorize import key_digest

ORDERS_KEY = "orders-key-7f3a9c"
REVOKED_KEY = "revoked-key-1b2c"
LEGACY_KEY = "legacy-key-55aa"


def catalog_yaml(orders_methods: str = "[GET, POST]", revoke_orders: bool = False) -> str:
    status = "revoked" if revoke_orders else "approved"
    return f"""
products:
  - name: orders
    environments: [test]
    operationGroup:
      operationConfigType: remoteservice
      operationConfigs:
        - apiSource: orders-api
          operations:
            - {{resource: "/v1/orders/**", methods: {orders_methods}}}
            - {{resource: "/v1/orders", methods: [GET]}}
  - name: legacy
    environments: [test]
    attributes: [{{name: apigee-remote-service-targets, value: "legacy-api"}}]
    apiResources: ["/v1/**"]
developers:
  - email: dev@example.com
    apps:
      - name: orders-app
        products: [orders]
        credentials:
          - key_sha256: "{key_digest(ORDERS_KEY)}"
            status: {status}
          - key_sha256: "{key_digest(REVOKED_KEY)}"
            status: revoked
      - name: legacy-app
        products: [legacy]
        credentials:
          - key_sha256: "{key_digest(LEGACY_KEY)}"
"""


def config_yaml(catalog_path: str, extra_auth: str = "", poll: str = "50ms") -> str:
    return f"""
global:
  api_address: "127.0.0.1:0"
  metrics_address: "127.0.0.1:0"
  graceful_shutdown_timeout: 2s
  temp_dir: {catalog_path}.temp
tenant:
  org_name: org
  env_name: test
  catalog_file: {catalog_path}
  catalog_poll_interval: {poll}
auth:
  append_metadata_headers: false
{extra_auth}
"""


# --- quotas -------------------------------------------------------------------------------------------
# One metered product (a product-level quota) and one unmetered product on the same API. Each metered app
# has its own key and so its own quota bucket: a test that must start again in a fresh window (a minute
# boundary passed during it) uses the next app.

QUOTA_PRODUCT = "metered"
QUOTA_DEVELOPER = "dev@example.com"
QUOTA_KEYS = ("metered-key-0a1b2c", "metered-key-1d2e3f", "metered-key-2a4b6c", "metered-key-3c5d7e")
FREE_KEY = "free-key-9e8d7c"


def quota_app(index: int) -> str:
    """The metered app whose key is ``QUOTA_KEYS[index]``."""
    return f"metered-app-{index}"


def quota_id(index: int, env: str = "test") -> str:
    """The Go adapter's quota identifier of ``quota_app(index)``: ``{product}-{env}-{email}-{app}``."""
    return f"{QUOTA_PRODUCT}-{env}-{QUOTA_DEVELOPER}-{quota_app(index)}"


def quota_products(limit: int = 5, api: str = "orders-api", env: str = "test") -> list[dict[str, object]]:
    """The metered and the free product in Apigee's JSON shape (quota numbers as strings), for a
    FakeApigee; ``limit`` requests per minute on the metered one."""

    def operations() -> list[dict[str, object]]:
        return [{"resource": "/v1/orders/**", "methods": ["GET", "POST"]}]

    return [
        {"name": QUOTA_PRODUCT, "displayName": "Metered", "approvalType": "auto", "environments": [env],
         "quota": str(limit), "quotaInterval": "1", "quotaTimeUnit": "minute",
         "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
             {"apiSource": api, "operations": operations(),
              "quota": {"limit": "null", "interval": "null", "timeUnit": "null"}}]}},
        {"name": "free", "environments": [env], "quota": "null",
         "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
             {"apiSource": api, "operations": operations()}]}},
    ]  # fmt: skip


def quota_catalog_yaml(limit: int = 5, api: str = "orders-api", env: str = "test") -> str:
    """A local catalog with ``quota_products`` and an app per key of ``QUOTA_KEYS`` (plus ``FREE_KEY``)."""
    apps = [
        {"name": quota_app(i), "products": [QUOTA_PRODUCT], "credentials": [{"key_sha256": key_digest(key)}]}
        for i, key in enumerate(QUOTA_KEYS)
    ]
    apps.append(
        {"name": "free-app", "products": ["free"], "credentials": [{"key_sha256": key_digest(FREE_KEY)}]}
    )
    catalog = {
        "products": quota_products(limit, api, env),
        "developers": [{"email": QUOTA_DEVELOPER, "apps": apps}],
    }
    return yaml.safe_dump(catalog, sort_keys=False)
