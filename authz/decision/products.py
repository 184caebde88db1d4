"""API products: parsing Apigee's product JSON, resource patterns, and matching a request to operations.

Matching follows the Go adapter (apigee-remote-service-golib ``product/product.go``), with one deliberate
difference: regex metacharacters in a resource are escaped, so ``/v1.0/x`` does not match ``/v1a0/x``.
Quota bucket names (``OperationConfig.quota_id``, ``AuthorizedOperation.quota_id``) are the Go adapter's
byte for byte, so the counters on Apigee's side are shared with (or carried over from) Go adapters.
Imports: the standard library and authz.errors only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from authz.decision.model import (
    ALL_METHODS,
    AuthorizedOperation,
    Catalog,
    Operation,
    OperationConfig,
    Product,
    Quota,
    ResourcePattern,
)

TARGETS_ATTRIBUTE = "apigee-remote-service-targets"
MATCH_ALL = ResourcePattern("/", None)
QUOTA_TIME_UNITS = ("second", "minute", "hour", "day", "month")  # what the Go adapter's quota windows know

# How Go's encoding/json writes a string (json.Marshal escapes HTML characters by default).
_GO_JSON_ESCAPES = {i: f"\\u{i:04x}" for i in range(0x20)} | {
    ord('"'): '\\"',
    ord("\\"): "\\\\",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    ord("<"): "\\u003c",
    ord(">"): "\\u003e",
    ord("&"): "\\u0026",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
# Python's json keeps an unpaired "\ud800" escape as a lone surrogate; Go decodes it to U+FFFD.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ProductError(ValueError):
    """A product that cannot be used; the message names the field inside the product."""


def compile_resource(resource: str) -> ResourcePattern:
    """Compile an Apigee resource path into a pattern.

    ``/`` matches every path; ``*`` matches one path segment (no ``/``); ``**`` is allowed only as a
    suffix and matches anything (so ``/foo/**`` matches ``/foo/`` and ``/foo/a/b`` but not ``/foo``).

    Raises:
        ProductError: ``**`` anywhere but at the end, or an empty resource.
    """
    if resource == "/":
        return MATCH_ALL
    if not resource:
        raise ProductError("empty resource")
    double = resource.find("**")
    if double >= 0 and double != len(resource) - 2:
        raise ProductError(f"'**' is allowed only at the end of a resource: {resource!r}")
    body = resource[:-2] if double >= 0 else resource
    regex = "[^/]*".join(re.escape(part) for part in body.split("*"))
    if double >= 0:
        regex += ".*"
    return ResourcePattern(resource, re.compile(regex + r"\Z"))


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProductError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProductError(f"{where}: expected a list, got {type(value).__name__}")
    return [_text(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _int_field(value: Any, where: str) -> int:
    """Apigee sends quota numbers as strings ("5", "null" or ""); a local catalog may use ints."""
    if isinstance(value, bool):
        raise ProductError(f"{where}: expected an integer, got bool")
    if isinstance(value, int):
        return value
    text = _text(value, where).strip()
    if text in ("", "null"):
        return 0
    try:
        return int(text)
    except ValueError:
        raise ProductError(f"{where}: expected an integer, got {text!r}") from None


def parse_quota(limit: Any, interval: Any, time_unit: Any, where: str) -> Quota | None:
    """A quota, or None when no limit is set (``"null"`` and empty mean unset, as in the Go adapter)."""
    count = _int_field(limit, f"{where}.limit")
    if count <= 0:
        return None
    unit = _text(time_unit, f"{where}.timeUnit").strip().lower()
    unit = "minute" if unit in ("", "null") else unit
    if unit not in QUOTA_TIME_UNITS:
        raise ProductError(
            f"{where}.timeUnit: expected one of {', '.join(QUOTA_TIME_UNITS)}, got {time_unit!r}"
        )
    return Quota(count, max(_int_field(interval, f"{where}.interval"), 1), unit)


def _operations(raw: Any, where: str) -> tuple[Operation, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ProductError(f"{where}: expected a list")
    ops = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ProductError(f"{where}[{i}]: expected a mapping")
        resource = compile_resource(_text(item.get("resource"), f"{where}[{i}].resource"))
        methods = frozenset(m.upper() for m in _strings(item.get("methods"), f"{where}[{i}].methods"))
        ops.append(Operation(resource, methods or ALL_METHODS))
    return tuple(ops)


def _go_string(text: str) -> str:
    """``text`` as Go's ``json.Marshal`` writes it."""
    return '"' + text.translate(_GO_JSON_ESCAPES) + '"'


def _go_operations_json(raw: Any) -> str:
    """``json.Marshal(oc.Operations)`` after golib's ``OperationConfig.UnmarshalJSON`` sorted them.

    Each operation's methods are sorted as received (not upper-cased) and the operations by resource; a
    missing or null list marshals as ``null``, an empty one as ``[]``. ``raw`` has passed ``_operations``.
    """
    if raw is None:
        return "null"
    operations: list[tuple[str, list[str] | None]] = []
    for item in raw:
        methods = item.get("methods")
        if methods is not None:  # Go's string order is UTF-8 byte order, which is code point order
            methods = sorted(_LONE_SURROGATE.sub("\ufffd", _text(m, "")) for m in methods)
        operations.append((_LONE_SURROGATE.sub("\ufffd", _text(item.get("resource"), "")), methods))
    operations.sort(key=lambda op: op[0])
    marshalled = []
    for resource, methods in operations:
        listed = "null" if methods is None else "[" + ",".join(map(_go_string, methods)) + "]"
        marshalled.append(f'{{"methods":{listed},"resource":{_go_string(resource)}}}')
    return "[" + ",".join(marshalled) + "]"


def go_operation_config_id(api_source: str, raw_operations: Any) -> str:
    """The Go adapter's ``oc.ID``: ``"{apiSource}-{md5 hex of the marshalled, sorted operations}"``."""
    data = _go_operations_json(raw_operations).encode()
    return f"{api_source}-{hashlib.md5(data, usedforsecurity=False).hexdigest()}"


def _operation_configs(group: Any) -> tuple[OperationConfig, ...]:
    if not isinstance(group, Mapping):
        raise ProductError("operationGroup: expected a mapping")
    raw = group.get("operationConfigs")
    raw = [] if raw is None else raw
    if not isinstance(raw, list):
        raise ProductError("operationGroup.operationConfigs: expected a list")
    configs = []
    for i, item in enumerate(raw):
        where = f"operationGroup.operationConfigs[{i}]"
        if not isinstance(item, Mapping):
            raise ProductError(f"{where}: expected a mapping")
        quota_raw = item.get("quota")
        quota_raw = {} if quota_raw is None else quota_raw
        if not isinstance(quota_raw, Mapping):
            raise ProductError(f"{where}.quota: expected a mapping")
        quota = parse_quota(
            quota_raw.get("limit"), quota_raw.get("interval"), quota_raw.get("timeUnit"), f"{where}.quota"
        )
        api_source = _text(item.get("apiSource"), f"{where}.apiSource")
        operations = _operations(item.get("operations"), f"{where}.operations")
        quota_id = go_operation_config_id(api_source, item.get("operations"))
        configs.append(OperationConfig(api_source, operations, quota, quota_id))
    return tuple(configs)


def _targets(attributes: Any) -> frozenset[str]:
    if attributes is None:
        return frozenset()
    if not isinstance(attributes, list):
        raise ProductError("attributes: expected a list")
    targets: set[str] = set()
    for i, attr in enumerate(attributes):
        if not isinstance(attr, Mapping):
            raise ProductError(f"attributes[{i}]: expected a mapping with name and value")
        if attr.get("name") == TARGETS_ATTRIBUTE:
            value = _text(attr.get("value"), f"attributes[{i}].value")
            targets.update(t.strip() for t in value.split(",") if t.strip())
    return frozenset(targets)


def parse_product(raw: Mapping[str, Any]) -> Product:
    """Parse one product of Apigee's ``/products`` response (or of a local catalog).

    Raises:
        ProductError: a field of the wrong type or an invalid resource pattern.
    """
    name = _text(raw.get("name"), "name")
    if not name:
        raise ProductError("name: required")
    group = raw.get("operationGroup")
    return Product(
        name=name,
        display_name=_text(raw.get("displayName"), "displayName"),
        environments=frozenset(_strings(raw.get("environments"), "environments")),
        scopes=frozenset(s for s in _strings(raw.get("scopes"), "scopes") if s),
        targets=_targets(raw.get("attributes")),
        api_resources=tuple(compile_resource(r) for r in _strings(raw.get("apiResources"), "apiResources")),
        operation_configs=None if group is None else _operation_configs(group),
        quota=parse_quota(raw.get("quota"), raw.get("quotaInterval"), raw.get("quotaTimeUnit"), "quota"),
    )


def _authorized(product: str, api: str, quota: Quota | None, bucket: str) -> AuthorizedOperation:
    return AuthorizedOperation(product, api, quota, bucket if quota is not None else "")


def _product_operations(
    product: Product, environment: str, api: str, path: str, method: str, *, caller: str = ""
) -> Iterable[AuthorizedOperation]:
    if environment not in product.environments:
        return
    bucket = f"{product.name}-{environment}-{caller}"
    if product.operation_configs is None:
        # Legacy binding: API among the targets, path in apiResources; the method is not checked.
        if api in product.targets and any(r.matches(path) for r in product.api_resources):
            yield _authorized(product.name, api, product.quota, bucket)
        return
    for config in product.operation_configs:
        if config.api_source != api:
            continue
        if not any(method in op.methods and op.resource.matches(path) for op in config.operations):
            continue
        if config.quota is not None:  # its own bucket; the others share the product's
            yield _authorized(product.name, api, config.quota, f"{bucket}-{config.quota_id}")
        else:
            yield _authorized(product.name, api, product.quota, bucket)


def authorized_operations(
    catalog: Catalog,
    product_names: Sequence[str],
    environment: str,
    api: str,
    path: str,
    method: str,
    scopes: frozenset[str] | None = None,
    *,
    caller: str = "",
) -> tuple[AuthorizedOperation, ...]:
    """Every operation of the credential's products that grants this request, in product order.

    Names not in the catalog are skipped. ``scopes`` (a token's) are checked only when given: a product
    with scopes then needs at least one of them. API keys pass None, as in the Go adapter. ``caller`` is
    ``"{developer_email}-{application_name}"``, the caller's part of each operation's ``quota_id``.
    """
    found: list[AuthorizedOperation] = []
    for name in product_names:
        product = catalog.products.get(name)
        if product is not None and (scopes is None or not product.scopes or product.scopes & scopes):
            found.extend(_product_operations(product, environment, api, path, method, caller=caller))
    return tuple(found)
