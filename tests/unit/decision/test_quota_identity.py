"""Quota bucket names, byte for byte as the Go adapter (golib product/product.go) builds them.

The expected JSON is written out literally here, never produced by the code under test.
"""

import hashlib

import pytest

from authz.decision.authorize import decide, key_digest
from authz.decision.model import Catalog, Credential, Policy, Quota, RequestAttrs
from authz.decision.products import ProductError, authorized_operations, parse_product


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def config_id(operations, api_source="api"):
    """The quota_id parse_product computes for one operation config holding ``operations``."""
    config = (
        {"apiSource": api_source}
        if operations == "missing"
        else {"apiSource": api_source, "operations": operations}
    )
    product = parse_product({"name": "p", "operationGroup": {"operationConfigs": [config]}})
    return product.operation_configs[0].quota_id


ENFORCE_ON_VERBS = [
    {"resource": "/all", "methods": ["GET", "POST", "PATCH", "PUT", "DELETE"]},
    {"resource": "/get", "methods": ["GET"]},
]


def test_reference_fixture_enforce_on_verbs():
    expected = b'[{"methods":["DELETE","GET","PATCH","POST","PUT"],"resource":"/all"},{"methods":["GET"],"resource":"/get"}]'
    assert config_id(ENFORCE_ON_VERBS, "quota-demo") == "quota-demo-" + md5(expected)


# Values asserted by golib's own product_test.go (computed by Go itself).
GO_TEST_VECTORS = [
    (
        "quota-demo",
        [
            {"resource": "/all", "methods": ["GET", "POST", "PATCH", "PUT", "DELETE"]},
            {"resource": "/put", "methods": ["PUT"]},
            {"resource": "/post", "methods": ["POST"]},
            {"resource": "/get", "methods": ["GET"]},
        ],
        "quota-demo-98c34c322202a4f9e01aea733326a129",
    ),
    ("host", [{"resource": "/operation1", "methods": ["GET"]}], "host-7c5532d6fca7a87312365219212de443"),
    ("host", [{"resource": "/operation2", "methods": ["GET"]}], "host-547dbfc99f0432d3dbc607784917b1bc"),
]


@pytest.mark.parametrize(("api_source", "operations", "expected"), GO_TEST_VECTORS)
def test_go_test_vectors(api_source, operations, expected):
    assert config_id(operations, api_source) == expected


# (case, raw operations, what Go's json.Marshal writes after sorting, as UTF-8 bytes)
MARSHALLED = [
    ("operations missing", "missing", b"null"),
    ("operations null", None, b"null"),
    ("operations empty", [], b"[]"),
    (
        "unsorted resources",
        [{"resource": "/b", "methods": ["GET"]}, {"resource": "/a", "methods": ["POST"]}],
        b'[{"methods":["POST"],"resource":"/a"},{"methods":["GET"],"resource":"/b"}]',
    ),
    ("methods missing", [{"resource": "/a"}], b'[{"methods":null,"resource":"/a"}]'),
    ("methods null", [{"resource": "/a", "methods": None}], b'[{"methods":null,"resource":"/a"}]'),
    ("methods empty", [{"resource": "/a", "methods": []}], b'[{"methods":[],"resource":"/a"}]'),
    (
        "lowercase kept, bytewise order",
        [{"resource": "/a", "methods": ["get", "POST", "Get"]}],
        b'[{"methods":["Get","POST","get"],"resource":"/a"}]',
    ),
    (
        "null method is an empty string",
        [{"resource": "/a", "methods": ["GET", None]}],
        b'[{"methods":["","GET"],"resource":"/a"}]',
    ),
    (
        "html characters",
        [{"resource": "/a<b>&c", "methods": ["GET"]}],
        b'[{"methods":["GET"],"resource":"/a\\u003cb\\u003e\\u0026c"}]',
    ),
    (
        "non-ascii raw utf-8",
        [{"resource": "/caf\u00e9/\U0001f600", "methods": []}],
        b'[{"methods":[],"resource":"/caf\xc3\xa9/\xf0\x9f\x98\x80"}]',
    ),
    (
        "line and paragraph separators",
        [{"resource": "/a\u2028b\u2029", "methods": []}],
        b'[{"methods":[],"resource":"/a\\u2028b\\u2029"}]',
    ),
    (
        "quote and backslash",
        [{"resource": '/a"b\\c', "methods": []}],
        b'[{"methods":[],"resource":"/a\\"b\\\\c"}]',
    ),
    (
        "control characters",
        [{"resource": "/\n\r\t\b\f\x01\x1f\x7f", "methods": []}],
        b'[{"methods":[],"resource":"/\\n\\r\\t\\u0008\\u000c\\u0001\\u001f\x7f"}]',
    ),
    (
        "lone surrogate decodes to U+FFFD as in Go",
        [{"resource": "/a\ud800", "methods": ["\udc00"]}],
        b'[{"methods":["\xef\xbf\xbd"],"resource":"/a\xef\xbf\xbd"}]',
    ),
    (
        "code point order, not UTF-16 order",
        [
            {"resource": "/\U0001f600", "methods": []},
            {"resource": "/\uff5e", "methods": []},
            {"resource": "/z", "methods": []},
        ],
        b'[{"methods":[],"resource":"/z"},{"methods":[],"resource":"/\xef\xbd\x9e"},'
        b'{"methods":[],"resource":"/\xf0\x9f\x98\x80"}]',
    ),
]


@pytest.mark.parametrize(
    ("operations", "marshalled"), [c[1:] for c in MARSHALLED], ids=[c[0] for c in MARSHALLED]
)
def test_operation_config_id_hashes_go_json(operations, marshalled):
    assert config_id(operations) == "api-" + md5(marshalled)


def test_id_ignores_the_order_received():
    shuffled = [
        {"resource": "/get", "methods": ["GET"]},
        {"resource": "/all", "methods": ["PUT", "DELETE", "GET", "POST", "PATCH"]},
    ]
    assert config_id(shuffled, "quota-demo") == config_id(ENFORCE_ON_VERBS, "quota-demo")


OPS_PRODUCT = {
    "name": "ops",
    "environments": ["test"],
    "quota": "10",
    "quotaInterval": "1",
    "quotaTimeUnit": "minute",
    "operationGroup": {
        "operationConfigs": [
            {
                "apiSource": "quota-demo",
                "operations": ENFORCE_ON_VERBS,
                "quota": {"limit": "3", "interval": "2", "timeUnit": "hour"},
            },
            {"apiSource": "shared", "operations": [{"resource": "/"}], "quota": {"limit": "0"}},
            {
                "apiSource": "shared",
                "operations": [{"resource": "/x"}],
                "quota": {"limit": "null", "interval": "null", "timeUnit": "null"},
            },
            {
                "apiSource": "shared",
                "operations": [{"resource": "/x"}, {"resource": "/x/**"}],
                "quota": {"limit": "7", "timeUnit": "Day"},
            },
        ]
    },
}
FREE_OPS_PRODUCT = {
    "name": "free",
    "environments": ["test"],
    "operationGroup": {"operationConfigs": [{"apiSource": "shared", "operations": [{"resource": "/"}]}]},
}
LEGACY = {
    "name": "legacy",
    "environments": ["test"],
    "apiResources": ["/"],
    "attributes": [{"name": "apigee-remote-service-targets", "value": "legacy-api"}],
    "quota": "5",
    "quotaTimeUnit": "second",
}
FREE_LEGACY = {**LEGACY, "name": "free-legacy", "quota": "null"}
CATALOG = Catalog(
    {p.name: p for p in map(parse_product, [OPS_PRODUCT, FREE_OPS_PRODUCT, LEGACY, FREE_LEGACY])}, {}
)
DEMO_ID = "quota-demo-" + md5(
    b'[{"methods":["DELETE","GET","PATCH","POST","PUT"],"resource":"/all"},{"methods":["GET"],"resource":"/get"}]'
)
SHARED_ID = "shared-" + md5(b'[{"methods":null,"resource":"/x"},{"methods":null,"resource":"/x/**"}]')
CALLER = "dev@example.com-my-app"

# case -> (products, api, path, method, expected [(product, quota, quota_id)])
BUCKETS = {
    "own quota": (
        ["ops"],
        "quota-demo",
        "/all",
        "GET",
        [("ops", Quota(3, 2, "hour"), f"ops-test-{CALLER}-{DEMO_ID}")],
    ),
    "limit 0 and null share the product bucket, a limit gets its own": (
        ["ops"],
        "shared",
        "/x",
        "GET",
        [
            ("ops", Quota(10, 1, "minute"), f"ops-test-{CALLER}"),
            ("ops", Quota(10, 1, "minute"), f"ops-test-{CALLER}"),
            ("ops", Quota(7, 1, "day"), f"ops-test-{CALLER}-{SHARED_ID}"),
        ],
    ),
    "no quota anywhere": (["free"], "shared", "/x", "GET", [("free", None, "")]),
    "legacy product quota": (
        ["legacy"],
        "legacy-api",
        "/a",
        "POST",
        [("legacy", Quota(5, 1, "second"), f"legacy-test-{CALLER}")],
    ),
    "legacy without quota": (["free-legacy"], "legacy-api", "/a", "GET", [("free-legacy", None, "")]),
    "several products keep their order": (
        ["legacy", "free-legacy"],
        "legacy-api",
        "/",
        "GET",
        [("legacy", Quota(5, 1, "second"), f"legacy-test-{CALLER}"), ("free-legacy", None, "")],
    ),
}


@pytest.mark.parametrize(("names", "api", "path", "method", "expected"), BUCKETS.values(), ids=BUCKETS.keys())
def test_authorized_operation_buckets(names, api, path, method, expected):
    found = authorized_operations(CATALOG, names, "test", api, path, method, caller=CALLER)
    assert [(op.product, op.quota, op.quota_id) for op in found] == expected


def test_caller_defaults_to_empty():
    (op,) = authorized_operations(CATALOG, ["legacy"], "test", "legacy-api", "/", "GET")
    assert op.quota_id == "legacy-test-"


def test_decide_names_the_callers_bucket():
    digest = key_digest("k-1")
    credential = Credential(digest, digest[:16], "my-app", "dev@example.com", ("ops",))
    catalog = Catalog(CATALOG.products, {digest: credential})
    headers = {":authority": "quota-demo", "x-api-key": "k-1"}
    decision = decide(RequestAttrs("GET", "/get", "", headers), catalog, Policy("org", "test"), 0.0)
    assert decision.allowed
    assert [op.quota_id for op in decision.operations] == [f"ops-test-dev@example.com-my-app-{DEMO_ID}"]


# (timeUnit as received, parsed unit)
TIME_UNITS = [
    ("second", "second"),
    ("Minute", "minute"),
    (" HOUR ", "hour"),
    ("day", "day"),
    ("month", "month"),
    ("", "minute"),
    ("null", "minute"),
    (None, "minute"),
]


@pytest.mark.parametrize(("unit", "parsed"), TIME_UNITS)
def test_time_units(unit, parsed):
    product = parse_product({"name": "p", "quota": "1", "quotaTimeUnit": unit})
    assert product.quota == Quota(1, 1, parsed)
    group = {"operationConfigs": [{"operations": [], "quota": {"limit": "1", "timeUnit": unit}}]}
    config = parse_product({"name": "p", "operationGroup": group}).operation_configs[0]
    assert config.quota == Quota(1, 1, parsed)


EXPECTED_UNITS = "expected one of second, minute, hour, day, month"


@pytest.mark.parametrize("unit", ["week", "minutes", "1", "year"])
def test_unknown_time_units_are_product_errors(unit):
    with pytest.raises(ProductError) as info:
        parse_product({"name": "p", "quota": "1", "quotaTimeUnit": unit})
    assert str(info.value) == f"quota.timeUnit: {EXPECTED_UNITS}, got {unit!r}"
    group = {"operationConfigs": [{"operations": [], "quota": {"limit": "1", "timeUnit": unit}}]}
    with pytest.raises(ProductError) as info:
        parse_product({"name": "p", "operationGroup": group})
    assert (
        str(info.value)
        == f"operationGroup.operationConfigs[0].quota.timeUnit: {EXPECTED_UNITS}, got {unit!r}"
    )


def test_time_unit_of_an_unset_quota_is_not_checked():
    assert parse_product({"name": "p", "quota": "null", "quotaTimeUnit": "week"}).quota is None
