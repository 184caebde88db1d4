"""The ``x-apigee-*`` context: dynamic metadata for the access logger and optional upstream headers.

Key names are the Go adapter's (``server/metadata_context.go``); Envoy files the metadata under the
``envoy.filters.http.ext_authz`` namespace, where the access-log receiver reads it. Imports: stdlib only.
"""

from __future__ import annotations

from authz.decision.model import AuthContext

PREFIX = "x-apigee-"
ACCESS_TOKEN = "x-apigee-accesstoken"  # noqa: S105 (a header name)
API = "x-apigee-api"
API_PRODUCTS = "x-apigee-apiproducts"
APPLICATION = "x-apigee-application"
CLIENT_ID = "x-apigee-clientid"
DEVELOPER_EMAIL = "x-apigee-developeremail"
ENVIRONMENT = "x-apigee-environment"
ORGANIZATION = "x-apigee-organization"
SCOPE = "x-apigee-scope"
ANALYTICS_PRODUCT = "x-apigee-analytics-product"
AUTHORIZED = "x-apigee-authorized"
CUSTOM_ATTRIBUTES = "x-apigee-customattributes"  # only when non-empty
# Not in the Go adapter: set instead of AUTHORIZED when auth.allow_unauthorized let a denied request pass.
UNAUTHORIZED_REASON = "x-apigee-unauthorized-reason"

# Never copied into upstream headers, even with append_metadata_headers (Go adapter issue #376).
NEVER_UPSTREAM = frozenset({ACCESS_TOKEN})


def build(
    org: str, environment: str, api: str, auth: AuthContext | None, analytics_product: str
) -> dict[str, str]:
    """The metadata fields for one request; every value is a string, as the Go adapter sends them."""
    fields = {ORGANIZATION: org, ENVIRONMENT: environment, API: api}
    if auth is not None:
        fields.update(
            {
                ACCESS_TOKEN: auth.access_token,
                API_PRODUCTS: ",".join(auth.products),
                APPLICATION: auth.app_name,
                CLIENT_ID: auth.client_id,
                DEVELOPER_EMAIL: auth.developer_email,
                SCOPE: " ".join(auth.scopes),
                ANALYTICS_PRODUCT: analytics_product,
            }
        )
        if auth.custom_attributes:
            fields[CUSTOM_ATTRIBUTES] = auth.custom_attributes
    return fields
