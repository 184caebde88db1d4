import dataclasses

import pytest

from authz.decision import dynamic_metadata as md
from authz.decision.authorize import decide, key_digest, unsafe_path
from authz.decision.model import Catalog, Credential, DenyReason, Policy, RequestAttrs
from authz.decision.products import parse_product

NOW = 1_800_000_000.0
GOOD, REVOKED, EXPIRED, NOPRODUCT, FUTURE = (
    "good-key-1",
    "revoked-key",
    "expired-key",
    "lonely-key",
    "future-key",
)

PRODUCTS = [
    {
        "name": "orders",
        "environments": ["test"],
        "operationGroup": {
            "operationConfigs": [
                {"apiSource": "orders-api", "operations": [{"resource": "/v1/orders/**", "methods": ["GET"]}]}
            ]
        },
    },
    {"name": "other", "environments": ["prod"], "apiResources": ["/"],
     "attributes": [{"name": "apigee-remote-service-targets", "value": "orders-api"}]},
]  # fmt: skip


def _credential(key, products=("other", "orders"), active=True, expires_at=None):
    digest = key_digest(key)
    return Credential(digest, digest[:16], "app", "dev@example.com", products, active, expires_at)


CATALOG = Catalog(
    {p.name: p for p in map(parse_product, PRODUCTS)},
    {
        c.key_sha256: c
        for c in (
            _credential(GOOD),
            _credential(REVOKED, active=False),
            _credential(EXPIRED, expires_at=NOW),
            _credential(FUTURE, expires_at=NOW + 1),
            _credential(NOPRODUCT, products=()),
        )
    },
)
POLICY = Policy(org="org", env="test")


def attrs(key=GOOD, path="/v1/orders/1", method="GET", query="", api="orders-api", headers=None, ext=None):
    hdrs = {":authority": api, ":path": path, ":method": method}
    if key is not None:
        hdrs["x-api-key"] = key
    hdrs.update(headers or {})
    return RequestAttrs(method=method, path=path, query=query, headers=hdrs, context_extensions=ext or {})


# name -> (attrs, policy, expected reason or None for allow)
CASES = {
    "allow": (attrs(), POLICY, None),
    "allow from query": (attrs(key=None, query=f"a=1&x-api-key={GOOD}"), POLICY, None),
    "same key in header and query": (attrs(query=f"x-api-key={GOOD}"), POLICY, None),
    "duplicate identical headers": (attrs(key=f"{GOOD},{GOOD}"), POLICY, None),
    "not yet expired": (attrs(key=FUTURE), POLICY, None),
    "api from context extension": (attrs(api="ignored", ext={"apigee_api": "orders-api"}), POLICY, None),
    "custom api header": (attrs(api="x", headers={"x-api": "orders-api"}), Policy("org", "test", api_header="x-api"), None),
    "no key": (attrs(key=None), POLICY, DenyReason.MISSING_CREDENTIALS),
    "empty key": (attrs(key=""), POLICY, DenyReason.MISSING_CREDENTIALS),
    "empty query key": (attrs(key=None, query="x-api-key="), POLICY, DenyReason.MISSING_CREDENTIALS),
    "key named in query text only": (attrs(key=None, query="q=x-api-key"), POLICY, DenyReason.MISSING_CREDENTIALS),
    "unknown key": (attrs(key="nope"), POLICY, DenyReason.UNKNOWN_KEY),
    "revoked": (attrs(key=REVOKED), POLICY, DenyReason.REVOKED_KEY),
    "expired at the instant": (attrs(key=EXPIRED), POLICY, DenyReason.EXPIRED_KEY),
    "two different header keys": (attrs(key=f"{GOOD},other"), POLICY, DenyReason.AMBIGUOUS_CREDENTIALS),
    "header and query differ": (attrs(query="x-api-key=other"), POLICY, DenyReason.AMBIGUOUS_CREDENTIALS),
    "100 KB key": (attrs(key="k" * 100_000), POLICY, DenyReason.MALFORMED_CREDENTIALS),
    "257-char key": (attrs(key="k" * 257), POLICY, DenyReason.MALFORMED_CREDENTIALS),
    "non-ascii key": (attrs(key="clé"), POLICY, DenyReason.MALFORMED_CREDENTIALS),
    "envoy's non-utf8 marker": (attrs(key="abc!"), POLICY, DenyReason.MALFORMED_CREDENTIALS),
    "key with space": (attrs(key="a b"), POLICY, DenyReason.MALFORMED_CREDENTIALS),
    "wrong path": (attrs(path="/v2/orders"), POLICY, DenyReason.NOT_AUTHORIZED),
    "dot-dot out of a granted prefix": (attrs(path="/v1/orders/../admin"), POLICY, DenyReason.UNSAFE_PATH),
    "encoded dot-dot": (attrs(path="/v1/orders/%2E%2e/admin"), POLICY, DenyReason.UNSAFE_PATH),
    "dot names in a segment are fine": (attrs(path="/v1/orders/a..b.json"), POLICY, None),
    "wrong method": (attrs(method="DELETE"), POLICY, DenyReason.NOT_AUTHORIZED),
    "wrong api": (attrs(api="billing-api"), POLICY, DenyReason.NOT_AUTHORIZED),
    "no products": (attrs(key=NOPRODUCT), POLICY, DenyReason.NOT_AUTHORIZED),
    "wrong environment": (attrs(), Policy("org", "staging"), DenyReason.NOT_AUTHORIZED),
    "legacy product in its environment": (attrs(path="/any", method="PUT"), Policy("org", "prod"), None),
    "empty host": (attrs(api=""), POLICY, DenyReason.MISSING_API),
    "multi-tenant without extension": (attrs(), Policy("org", "*"), DenyReason.MISSING_ENVIRONMENT),
    "multi-tenant with extension": (attrs(ext={"apigee_environment": "test"}), Policy("org", "*"), None),
    "extension names other env": (attrs(ext={"apigee_environment": "prod"}), POLICY, DenyReason.ENVIRONMENT_MISMATCH),
    "extension names same env": (attrs(ext={"apigee_environment": "test"}), POLICY, None),
    "unknown extensions ignored": (attrs(ext={"something": "else"}), POLICY, None),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_decide_table(name):
    request, policy, expected = CASES[name]
    decision = decide(request, CATALOG, policy, NOW)
    assert decision.reason is expected
    assert decision.allowed is (expected is None)
    assert decision.fail_open is False


@pytest.mark.parametrize(
    ("path", "unsafe"),
    [
        ("/v1/orders/../admin", True),
        ("/v1/orders/..", True),
        ("/v1/./orders", True),
        ("/.", True),
        ("/v1/%2e%2e/admin", True),
        ("/v1/%2E./admin", True),
        ("/v1/orders%2F..%2Fadmin", True),  # an upstream that decodes %2F sees /v1/orders/../admin
        ("/v1\\..\\admin", True),  # some upstreams read "\\" as "/"
        ("/v1/orders", False),
        ("/v1/orders/file.json", False),
        ("/v1/.well-known/x", False),
        ("/v1/...", False),
        ("/v1/..x/y", False),
        ("/v1/%zz", False),  # a bad escape stays as it is
    ],
)
def test_unsafe_path_finds_dot_segments_raw_or_encoded(path, unsafe):
    assert unsafe_path(path) is unsafe


def test_allow_unauthorized_does_not_cover_an_unsafe_path():
    policy = dataclasses.replace(POLICY, allow_unauthorized=True)
    decision = decide(attrs(path="/v1/orders/../admin"), CATALOG, policy, NOW)
    assert not decision.allowed
    assert (decision.reason, decision.api, decision.environment) == (
        DenyReason.UNSAFE_PATH,
        "orders-api",
        "test",
    )


def test_not_ready_without_catalog():
    assert decide(attrs(), None, POLICY, NOW).reason is DenyReason.NOT_READY


def test_allow_metadata_and_header_changes():
    request = attrs(
        query=f"x-api-key={GOOD}&b=2",
        headers={"x-apigee-developeremail": "spoof@evil", "x-apigee-new": "1", "x-envoy-auth-failure-mode-allowed": "true"},
    )  # fmt: skip
    decision = decide(request, CATALOG, POLICY, NOW)
    digest = key_digest(GOOD)
    assert decision.metadata == {
        md.ORGANIZATION: "org",
        md.ENVIRONMENT: "test",
        md.API: "orders-api",
        md.ACCESS_TOKEN: "",
        md.API_PRODUCTS: "other,orders",
        md.APPLICATION: "app",
        md.CLIENT_ID: digest[:16],
        md.DEVELOPER_EMAIL: "dev@example.com",
        md.SCOPE: "",
        md.ANALYTICS_PRODUCT: "orders",
        md.AUTHORIZED: "true",
    }
    assert GOOD not in decision.metadata.values()
    assert set(decision.headers_to_remove) == {
        "x-api-key", "x-apigee-developeremail", "x-apigee-new", "x-envoy-auth-failure-mode-allowed"}  # fmt: skip
    assert decision.query_params_to_remove == ("x-api-key",)
    assert decision.headers_to_set == ()
    assert decision.operations[0].product == "orders"


def test_append_metadata_headers_overwrites_spoofed_headers_but_never_sends_the_token():
    policy = dataclasses.replace(POLICY, append_metadata_headers=True)
    decision = decide(
        attrs(headers={"x-apigee-developeremail": "spoof", "x-apigee-accesstoken": "t"}), CATALOG, policy, NOW
    )
    names = dict(decision.headers_to_set)
    assert names[md.DEVELOPER_EMAIL] == "dev@example.com"
    assert md.ACCESS_TOKEN not in names
    assert md.DEVELOPER_EMAIL not in decision.headers_to_remove  # overwritten instead
    assert md.ACCESS_TOKEN in decision.headers_to_remove  # a client-sent token never reaches upstream
    assert decision.query_params_to_remove == ()


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (attrs(key=None, query="x-api-key=nope"), DenyReason.UNKNOWN_KEY),
        (attrs(key=None), DenyReason.MISSING_CREDENTIALS),
        (attrs(path="/v2"), DenyReason.NOT_AUTHORIZED),
    ],
)
def test_allow_unauthorized_lets_policy_denies_through_marked(request_, reason):
    policy = dataclasses.replace(POLICY, allow_unauthorized=True)
    decision = decide(request_, CATALOG, policy, NOW)
    assert decision.allowed and decision.fail_open
    assert decision.reason is reason
    assert md.AUTHORIZED not in decision.metadata
    assert decision.metadata[md.UNAUTHORIZED_REASON] == reason.value
    if "x-api-key" in request_.query:
        assert decision.query_params_to_remove == ("x-api-key",)


@pytest.mark.parametrize(
    ("catalog", "policy", "reason"),
    [
        (None, POLICY, DenyReason.NOT_READY),
        (CATALOG, dataclasses.replace(POLICY, allow_unauthorized=True), DenyReason.MISSING_API),
        (CATALOG, Policy("org", "*", allow_unauthorized=True), DenyReason.MISSING_ENVIRONMENT),
    ],
)
def test_allow_unauthorized_never_covers_our_own_failures(catalog, policy, reason):
    request = attrs(api="") if reason is DenyReason.MISSING_API else attrs()
    decision = decide(request, catalog, policy, NOW)
    assert not decision.allowed
    assert decision.reason is reason


def test_a_known_caller_without_a_grant_is_named_in_the_deny_and_in_the_fail_open_metadata():
    denied = decide(attrs(path="/v2"), CATALOG, POLICY, NOW)
    assert denied.reason is DenyReason.NOT_AUTHORIZED
    assert denied.auth is not None and denied.auth.app_name == "app"  # for the deny's analytics record
    passed = decide(attrs(path="/v2"), CATALOG, dataclasses.replace(POLICY, allow_unauthorized=True), NOW)
    assert passed.metadata[md.APPLICATION] == "app"  # the Go adapter keeps the caller's context
    assert md.AUTHORIZED not in passed.metadata
    assert decide(attrs(key=None), CATALOG, POLICY, NOW).auth is None
