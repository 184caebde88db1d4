"""Parse a local catalog file (products in Apigee's shape, developers, apps, hashed keys) into a Catalog.

Strict: unknown keys, wrong types, unknown product references and duplicate keys are errors that name the
file and the key path, so a bad edit is caught (and the last good catalog kept) instead of silently
granting or denying. Plaintext keys are never stored: credentials carry ``key_sha256``.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from authz.decision.model import Catalog, Credential, Product
from authz.decision.products import ProductError, parse_product
from authz.errors import CatalogError

# The fields of an Apigee API product; anything else in a product is a typo.
PRODUCT_FIELDS = frozenset(
    {
        "name", "displayName", "description", "approvalType", "attributes", "environments",
        "apiResources", "proxies", "scopes", "quota", "quotaInterval", "quotaTimeUnit",
        "operationGroup", "graphqlOperationGroup", "grpcOperationGroup", "createdAt",
        "lastModifiedAt", "createdBy", "lastModifiedBy", "quotaCounterScope", "space",
    }
)  # fmt: skip
TOP_FIELDS = frozenset({"products", "developers"})
DEVELOPER_FIELDS = frozenset({"email", "status", "apps"})
APP_FIELDS = frozenset({"name", "status", "products", "credentials"})
CREDENTIAL_FIELDS = frozenset({"key_sha256", "status", "expires_at"})
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


class _Reader:
    """Walks the parsed YAML and raises CatalogError naming the file and the key path."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, key: str, problem: str) -> CatalogError:
        return CatalogError(self.file, key, problem)

    def mapping(self, value: Any, key: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for name in value:
            if name not in allowed:
                hint = difflib.get_close_matches(str(name), sorted(allowed), n=1, cutoff=0.4)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise self.fail(f"{key}.{name}" if key else str(name), f"unknown key{extra}")
        return value

    def items(self, value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        return value

    def text(self, value: Any, key: str, *, required: bool = False, choices: tuple[str, ...] = ()) -> str:
        if value is None and not required:
            return choices[0] if choices else ""
        if not isinstance(value, str) or (required and not value):
            raise self.fail(key, "expected a non-empty string" if required else "expected a string")
        if choices and value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def timestamp(self, value: Any, key: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                raise self.fail(key, f"expected an ISO 8601 time, got {value!r}") from None
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if not isinstance(value, dt.datetime):
            raise self.fail(key, "expected an ISO 8601 time")
        moment: dt.datetime = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return moment.timestamp()


def _products(reader: _Reader, raw: Any) -> dict[str, Product]:
    products: dict[str, Product] = {}
    for i, item in enumerate(reader.items(raw, "products")):
        key = f"products[{i}]"
        reader.mapping(item, key, PRODUCT_FIELDS)
        try:
            product = parse_product(item)
        except ProductError as exc:
            raise reader.fail(key, str(exc)) from None
        if product.name in products:
            raise reader.fail(f"{key}.name", f"duplicate product {product.name!r}")
        products[product.name] = product
    return products


def _credentials(reader: _Reader, raw: Any, products: Mapping[str, Product]) -> dict[str, Credential]:
    credentials: dict[str, Credential] = {}
    for d, dev in enumerate(reader.items(raw, "developers")):
        dkey = f"developers[{d}]"
        reader.mapping(dev, dkey, DEVELOPER_FIELDS)
        email = reader.text(dev.get("email"), f"{dkey}.email", required=True)
        dev_active = reader.text(dev.get("status"), f"{dkey}.status", choices=("active", "inactive"))
        for a, app in enumerate(reader.items(dev.get("apps"), f"{dkey}.apps")):
            akey = f"{dkey}.apps[{a}]"
            reader.mapping(app, akey, APP_FIELDS)
            name = reader.text(app.get("name"), f"{akey}.name", required=True)
            app_status = reader.text(app.get("status"), f"{akey}.status", choices=("approved", "revoked"))
            names = []
            for p, product in enumerate(reader.items(app.get("products"), f"{akey}.products")):
                pname = reader.text(product, f"{akey}.products[{p}]", required=True)
                if pname not in products:
                    raise reader.fail(f"{akey}.products[{p}]", f"unknown product {pname!r}")
                names.append(pname)
            for c, cred in enumerate(reader.items(app.get("credentials"), f"{akey}.credentials")):
                ckey = f"{akey}.credentials[{c}]"
                reader.mapping(cred, ckey, CREDENTIAL_FIELDS)
                digest = reader.text(cred.get("key_sha256"), f"{ckey}.key_sha256", required=True).lower()
                if not _HEX64.match(digest):
                    raise reader.fail(f"{ckey}.key_sha256", "expected 64 hex digits (sha256 of the key)")
                if digest in credentials:
                    raise reader.fail(f"{ckey}.key_sha256", "duplicate credential")
                status = reader.text(cred.get("status"), f"{ckey}.status", choices=("approved", "revoked"))
                credentials[digest] = Credential(
                    key_sha256=digest,
                    client_id=digest[:16],
                    app_name=name,
                    developer_email=email,
                    products=tuple(names),
                    active=status == "approved" and app_status == "approved" and dev_active == "active",
                    expires_at=reader.timestamp(cred.get("expires_at"), f"{ckey}.expires_at"),
                )
    return credentials


def parse_catalog(text: str, file: str, loaded_at: float = 0.0) -> Catalog:
    """Parse catalog YAML.

    Raises:
        CatalogError: invalid YAML or content, naming ``file`` and the key path.
    """
    reader = _Reader(file)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise reader.fail(where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        raise reader.fail("", "empty catalog (expected products and developers)")
    doc = reader.mapping(raw, "", TOP_FIELDS)
    products = _products(reader, doc.get("products"))
    return Catalog(products, _credentials(reader, doc.get("developers"), products), loaded_at)


def load_catalog(path: str | Path, loaded_at: float = 0.0) -> Catalog:
    """Read and parse a catalog file (blocking I/O: call it off the event loop)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(str(path), "", f"cannot read: {exc}") from None
    return parse_catalog(text, str(path), loaded_at)
