import pytest

from authz.decision.model import ALL_METHODS, Catalog, Quota
from authz.decision.products import ProductError, authorized_operations, compile_resource, parse_product

# (resource, path, matches) — the Go adapter's rules plus escaped metacharacters.
PATTERNS = [
    ("/", "/", True),
    ("/", "/anything/at/all", True),
    ("/v1/orders", "/v1/orders", True),
    ("/v1/orders", "/v1/orders/1", False),
    ("/v1/*", "/v1/orders", True),
    ("/v1/*", "/v1/orders/1", False),
    ("/v1/*/items", "/v1/42/items", True),
    ("/v1/*/items", "/v1/42/x/items", False),
    ("/v1/**", "/v1/a/b/c", True),
    ("/v1/**", "/v1/", True),
    ("/v1/**", "/v1", False),  # /foo/** does not match /foo
    ("/v1**", "/v1anything/x", True),
    ("/v1.0/x", "/v1.0/x", True),
    ("/v1.0/x", "/v1a0/x", False),  # "." is literal (the Go adapter would match)
    ("/a+b", "/aab", False),
    ("/a+b", "/a+b", True),
    ("/x", "/x\n", False),
]


@pytest.mark.parametrize(("resource", "path", "matches"), PATTERNS)
def test_resource_patterns(resource, path, matches):
    assert compile_resource(resource).matches(path) is matches


@pytest.mark.parametrize("resource", ["/a/**/b", "**/x", ""])
def test_invalid_resource_patterns(resource):
    with pytest.raises(ProductError):
        compile_resource(resource)


GO_FIXTURE = {
    "name": "httpbin-product",
    "displayName": "httpbin product",
    "approvalType": "auto",
    "attributes": [
        {"name": "access", "value": "private"},
        {"name": "apigee-remote-service-targets", "value": "httpbin.org, httpbin.default.svc.cluster.local"},
    ],
    "apiResources": ["/httpbin/headers", "/headers"],
    "environments": ["test"],
    "scopes": [""],
    "quota": "5",
    "quotaInterval": "1",
    "quotaTimeUnit": "minute",
}

OPS_FIXTURE = {
    "name": "enforce-on-verbs",
    "environments": ["test"],
    "quota": "1",
    "quotaInterval": "1",
    "quotaTimeUnit": "minute",
    "operationGroup": {
        "operationConfigType": "remoteservice",
        "operationConfigs": [
            {
                "apiSource": "quota-demo",
                "operations": [
                    {"resource": "/all", "methods": ["GET", "POST", "PATCH", "PUT", "DELETE"]},
                    {"resource": "/get", "methods": ["get"]},
                    {"resource": "/any"},
                ],
                "quota": {"limit": "3", "interval": "2", "timeUnit": "Hour"},
            },
            {"apiSource": "quota-demo", "operations": [], "quota": {"limit": "null", "interval": "null"}},
            {"apiSource": "other", "operations": [{"resource": "/", "methods": []}]},
        ],
    },
}


def test_parse_go_fixture_product():
    product = parse_product(GO_FIXTURE)
    assert product.name == "httpbin-product"
    assert product.display_name == "httpbin product"
    assert product.targets == {"httpbin.org", "httpbin.default.svc.cluster.local"}
    assert [r.resource for r in product.api_resources] == ["/httpbin/headers", "/headers"]
    assert product.scopes == frozenset()  # [""] normalised to nothing
    assert product.quota == Quota(5, 1, "minute")
    assert product.operation_configs is None


def test_parse_operation_group():
    product = parse_product(OPS_FIXTURE)
    first, second, third = product.operation_configs
    assert first.quota == Quota(3, 2, "hour")
    assert first.operations[1].methods == {"GET"}
    assert first.operations[2].methods == ALL_METHODS  # no methods means all
    assert second.quota is None  # "null" means unset
    assert third.operations[0].resource.matches("/x")


def test_quota_defaults_and_ints():
    product = parse_product({"name": "p", "quota": 10, "quotaInterval": None, "quotaTimeUnit": "null"})
    assert product.quota == Quota(10, 1, "minute")
    assert parse_product({"name": "p", "quota": "0"}).quota is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "name: required"),
        ({"name": 3}, "name: expected a string, got int"),
        ({"name": "p", "environments": "test"}, "environments: expected a list, got str"),
        ({"name": "p", "quota": "many"}, "quota.limit: expected an integer, got 'many'"),
        ({"name": "p", "quota": True}, "quota.limit: expected an integer, got bool"),
        ({"name": "p", "attributes": {"a": 1}}, "attributes: expected a list"),
        ({"name": "p", "attributes": ["x"]}, "attributes[0]: expected a mapping with name and value"),
        ({"name": "p", "operationGroup": []}, "operationGroup: expected a mapping"),
        (
            {"name": "p", "operationGroup": {"operationConfigs": {}}},
            "operationGroup.operationConfigs: expected a list",
        ),
        (
            {"name": "p", "operationGroup": {"operationConfigs": [1]}},
            "operationGroup.operationConfigs[0]: expected a mapping",
        ),
        (
            {"name": "p", "operationGroup": {"operationConfigs": [{"quota": []}]}},
            "operationGroup.operationConfigs[0].quota: expected a mapping",
        ),
        (
            {"name": "p", "operationGroup": {"operationConfigs": [{"operations": {}}]}},
            "operationGroup.operationConfigs[0].operations: expected a list",
        ),
        (
            {"name": "p", "operationGroup": {"operationConfigs": [{"operations": [1]}]}},
            "operationGroup.operationConfigs[0].operations[0]: expected a mapping",
        ),
        (
            {"name": "p", "apiResources": ["/a/**/b"]},
            "'**' is allowed only at the end of a resource: '/a/**/b'",
        ),
    ],
)
def test_parse_errors(raw, message):
    with pytest.raises(ProductError) as info:
        parse_product(raw)
    assert str(info.value) == message


def _catalog(*raws):
    products = {p.name: p for p in map(parse_product, raws)}
    return Catalog(products, {})


# (products of the credential, env, api, path, method) -> authorized products
MATCHES = [
    (["enforce-on-verbs"], "test", "quota-demo", "/all", "GET", ["enforce-on-verbs"]),
    (["enforce-on-verbs"], "test", "quota-demo", "/get", "POST", []),  # wrong verb
    (["enforce-on-verbs"], "prod", "quota-demo", "/all", "GET", []),  # wrong environment
    (["enforce-on-verbs"], "test", "other-api", "/nope", "GET", []),  # other api source, no match
    (["enforce-on-verbs"], "test", "other", "/anything", "TRACE", ["enforce-on-verbs"]),
    (["httpbin-product"], "test", "httpbin.org", "/headers", "DELETE", ["httpbin-product"]),  # verb ignored
    (["httpbin-product"], "test", "httpbin.org", "/ip", "GET", []),
    (["httpbin-product"], "test", "example.com", "/headers", "GET", []),  # not a target
    (["missing", "httpbin-product"], "test", "httpbin.org", "/headers", "GET", ["httpbin-product"]),
    ([], "test", "httpbin.org", "/headers", "GET", []),
]


@pytest.mark.parametrize(("names", "env", "api", "path", "method", "expected"), MATCHES)
def test_authorized_operations(names, env, api, path, method, expected):
    catalog = _catalog(GO_FIXTURE, OPS_FIXTURE)
    found = authorized_operations(catalog, names, env, api, path, method)
    assert [op.product for op in found] == expected


def test_operation_quota_overrides_product_quota():
    catalog = _catalog(GO_FIXTURE, OPS_FIXTURE)
    (op,) = authorized_operations(catalog, ["enforce-on-verbs"], "test", "quota-demo", "/all", "GET")
    assert op.quota == Quota(3, 2, "hour")
    (legacy,) = authorized_operations(catalog, ["httpbin-product"], "test", "httpbin.org", "/headers", "GET")
    assert legacy.quota == Quota(5, 1, "minute")


def test_empty_api_resources_match_nothing():
    catalog = _catalog({"name": "p", "environments": ["e"], "attributes": [
        {"name": "apigee-remote-service-targets", "value": "api"}]})  # fmt: skip
    assert authorized_operations(catalog, ["p"], "e", "api", "/", "GET") == ()


def test_operation_config_without_operations_grants_nothing():
    product = parse_product(
        {"name": "p", "environments": ["e"], "operationGroup": {"operationConfigs": [{"apiSource": "api"}]}}
    )
    assert product.operation_configs[0].operations == ()
    assert authorized_operations(Catalog({"p": product}, {}), ["p"], "e", "api", "/", "GET") == ()
