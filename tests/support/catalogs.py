"""Catalog texts for tests, with the plaintext keys they were made from."""

from __future__ import annotations

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
tenant:
  org_name: org
  env_name: test
  catalog_file: {catalog_path}
  catalog_poll_interval: {poll}
auth:
  append_metadata_headers: false
{extra_auth}
"""
