"""JWT claims -> AuthContext, the way the Go adapter reads them (golib ``auth/context.go`` ``setClaims``).

Claims arrive as plain mappings: from Envoy's jwt_authn metadata (a protobuf Struct turned into a dict, so
numbers are floats) or from a verified ``/verifyApiKey`` token. Imports: the standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from authz.decision.model import AuthContext

PRODUCT_LIST = "api_product_list"
CLIENT_ID = "client_id"
APPLICATION_NAME = "application_name"


def product_list(value: Any) -> tuple[str, ...] | None:
    """``api_product_list`` as names: a list of strings or a string holding a JSON array.

    A plain comma-separated string is accepted too (the Go adapter rejects it; some token issuers
    emit it). None when the value has another shape.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except ValueError:
                return None
        else:
            return tuple(name.strip() for name in text.split(",") if name.strip())
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return tuple(name for name in value if name)
    return None


def _optional(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    return value if isinstance(value, str) else ""


def auth_context(claims: Mapping[str, Any]) -> AuthContext | None:
    """The caller named by the claims, or None when a required claim is missing or malformed.

    Required: ``api_product_list``, ``client_id`` and ``application_name``; optional: ``developer_email``,
    ``access_token``, ``scope`` (space-separated) and ``custom_attributes``.
    """
    products = product_list(claims.get(PRODUCT_LIST))
    client_id = claims.get(CLIENT_ID)
    app = claims.get(APPLICATION_NAME)
    if products is None or not isinstance(client_id, str) or not isinstance(app, str):
        return None
    return AuthContext(
        client_id=client_id,
        app_name=app,
        developer_email=_optional(claims, "developer_email"),
        products=products,
        access_token=_optional(claims, "access_token"),
        scopes=tuple(_optional(claims, "scope").split()),
        custom_attributes=_optional(claims, "custom_attributes"),
    )
