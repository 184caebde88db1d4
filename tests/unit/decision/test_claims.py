import dataclasses

import pytest

from authz.decision import dynamic_metadata as md
from authz.decision.authorize import decide, jwt_claims, requested_key
from authz.decision.claims import auth_context, product_list
from authz.decision.model import AuthContext, Catalog, Credential, DenyReason, Policy, RequestAttrs
from authz.decision.products import parse_product

NOW = 1_800_000_000.0
PRODUCTS = [
    {"name": "orders", "environments": ["test"],
     "operationGroup": {"operationConfigs": [{"apiSource": "orders-api", "operations": [{"resource": "/v1/**"}]}]}},
    {"name": "scoped", "environments": ["test"], "scopes": ["read", "write"],
     "operationGroup": {"operationConfigs": [{"apiSource": "orders-api", "operations": [{"resource": "/v1/**"}]}]}},
]  # fmt: skip
CATALOG = Catalog({p.name: p for p in map(parse_product, PRODUCTS)}, {})
POLICY = Policy(org="org", env="test", jwt_provider_key="apigee")
CLAIMS = {
    "api_product_list": ["orders"],
    "client_id": "client-1",
    "application_name": "app-1",
    "developer_email": "dev@example.com",
    "access_token": "opaque",
    "scope": "read  other",
    "exp": 1.8e9,  # Struct numbers arrive as floats
}
KEY_CREDENTIAL = Credential("d" * 64, "key-client", "key-app", "k@example.com", ("scoped",))


def attrs(key=None, claims=None, provider="apigee", path="/v1/x"):
    headers = {":authority": "orders-api"}
    if key is not None:
        headers["x-api-key"] = key
    metadata = {provider: claims} if claims is not None else {}
    return RequestAttrs("GET", path, "", headers, jwt_metadata=metadata)


def lookup_of(answers):
    return lambda key: answers.get(key, DenyReason.UNKNOWN_KEY)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b"], ("a", "b")),
        (["a", ""], ("a",)),
        ('["a", "b"]', ("a", "b")),
        ("a, b ,", ("a", "b")),
        ("", ()),
        ([], ()),
        ("[not json", None),
        ('{"a": 1}', None),
        (["a", 1], None),
        (None, None),
        (3.0, None),
    ],
)
def test_product_list_shapes(value, expected):
    assert product_list(value) == expected


@pytest.mark.parametrize("missing", ["api_product_list", "client_id", "application_name"])
def test_required_claims(missing):
    claims = {k: v for k, v in CLAIMS.items() if k != missing}
    assert auth_context(claims) is None


def test_claims_context_fields():
    assert auth_context(
        {**CLAIMS, "custom_attributes": '{"tier":"gold"}', "developer_email": 7}
    ) == AuthContext(
        client_id="client-1",
        app_name="app-1",
        developer_email="",
        products=("orders",),
        access_token="opaque",
        scopes=("read", "other"),
        custom_attributes='{"tier":"gold"}',
    )


# name -> (attrs, policy, lookup answers, expected reason or None)
CASES = {
    "jwt claims alone": (attrs(claims=CLAIMS), POLICY, {}, None),
    "jwt without products claim": (attrs(claims={"client_id": "c", "application_name": "a"}), POLICY, {},
                                   DenyReason.INVALID_CLAIMS),
    "jwt of another provider is ignored": (attrs(claims=CLAIMS, provider="other"), POLICY, {},
                                           DenyReason.MISSING_CREDENTIALS),
    "any provider with product list": (attrs(claims=CLAIMS, provider="other"), Policy("org", "test"), {}, None),
    "any provider without product list": (attrs(claims={"sub": "x"}), Policy("org", "test"), {},
                                          DenyReason.MISSING_CREDENTIALS),
    "empty claims struct": (attrs(claims={}), POLICY, {}, DenyReason.MISSING_CREDENTIALS),
    "bad key but valid jwt": (attrs(key="bad", claims=CLAIMS), POLICY, {}, None),
    "unavailable key but valid jwt": (attrs(key="k", claims=CLAIMS), POLICY, {"k": DenyReason.AUTH_UNAVAILABLE},
                                      None),
    "unavailable key alone": (attrs(key="k"), POLICY, {"k": DenyReason.AUTH_UNAVAILABLE},
                              DenyReason.AUTH_UNAVAILABLE),
    "key wins over jwt": (attrs(key="k", claims={**CLAIMS, "api_product_list": []}), POLICY,
                          {"k": KEY_CREDENTIAL}, None),
    "key from claim": (attrs(claims={"apikey": "k"}), dataclasses.replace(POLICY, api_key_claim="apikey"),
                       {"k": KEY_CREDENTIAL}, None),
    "malformed key in claim": (attrs(claims={"apikey": "a b"}), dataclasses.replace(POLICY, api_key_claim="apikey"),
                               {}, DenyReason.INVALID_CLAIMS),
    "key claim found without provider key": (attrs(claims={"apikey": "k"}, provider="p"),
                                             Policy("org", "test", api_key_claim="apikey"), {"k": KEY_CREDENTIAL},
                                             None),
    "token scope grants scoped product": (attrs(claims={**CLAIMS, "api_product_list": ["scoped"]}), POLICY, {},
                                          None),
    "token without product scope": (attrs(claims={**CLAIMS, "api_product_list": ["scoped"], "scope": "other"}),
                                    POLICY, {}, DenyReason.NOT_AUTHORIZED),
    "api key ignores product scopes": (attrs(key="k"), POLICY, {"k": KEY_CREDENTIAL}, None),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_authentication_precedence(name):
    request, policy, answers, expected = CASES[name]
    decision = decide(request, CATALOG, policy, NOW, lookup_of(answers))
    assert decision.reason is expected


def test_requested_key_prefers_the_claim():
    policy = dataclasses.replace(POLICY, api_key_claim="apikey")
    assert requested_key(attrs(key="header", claims={"apikey": "claim"}), policy) == "claim"
    assert requested_key(attrs(key="header", claims={"apikey": 5}), policy) == "header"
    assert requested_key(attrs(key="header"), policy) == "header"


def test_provider_choice_is_stable():
    request = RequestAttrs(
        "GET", "/", "", {}, jwt_metadata={"b": {"api_product_list": ["b"]}, "a": {"api_product_list": ["a"]}}
    )
    assert jwt_claims(request, Policy("org", "test")) == {"api_product_list": ["a"]}


def test_jwt_allow_carries_token_context():
    decision = decide(attrs(claims={**CLAIMS, "custom_attributes": "x=1"}), CATALOG, POLICY, NOW)
    assert decision.allowed and decision.valid_until is None
    assert decision.metadata[md.ACCESS_TOKEN] == "opaque"
    assert decision.metadata[md.SCOPE] == "read other"
    assert decision.metadata[md.CLIENT_ID] == "client-1"
    assert decision.metadata[md.CUSTOM_ATTRIBUTES] == "x=1"


def test_invalid_claims_is_a_policy_deny_for_allow_unauthorized():
    policy = dataclasses.replace(POLICY, allow_unauthorized=True)
    decision = decide(attrs(claims={"api_product_list": 1}), CATALOG, policy, NOW)
    assert decision.fail_open and decision.reason is DenyReason.INVALID_CLAIMS


def test_auth_unavailable_is_never_let_through():
    policy = dataclasses.replace(POLICY, allow_unauthorized=True)
    decision = decide(attrs(key="k"), CATALOG, policy, NOW, lookup_of({"k": DenyReason.AUTH_UNAVAILABLE}))
    assert not decision.allowed and decision.reason is DenyReason.AUTH_UNAVAILABLE


BEARER = AuthContext(
    client_id="tok", app_name="token-app", developer_email="", products=("scoped",), scopes=("write",)
)

# name -> (attrs, lookup answers, bearer, expected reason, expected app when allowed)
BEARER_CASES = {
    "valid token alone": (attrs(), {}, BEARER, None, "token-app"),
    "token without the product's scope": (attrs(), {}, dataclasses.replace(BEARER, scopes=("x",)),
                                          DenyReason.NOT_AUTHORIZED, None),
    "invalid token beats a valid key": (attrs(key="k"), {"k": KEY_CREDENTIAL}, DenyReason.INVALID_TOKEN,
                                        DenyReason.INVALID_TOKEN, None),
    "keys unobtainable": (attrs(), {}, DenyReason.TOKEN_UNAVAILABLE, DenyReason.TOKEN_UNAVAILABLE, None),
    "valid token with a bad key is denied": (attrs(key="bad"), {}, BEARER, DenyReason.UNKNOWN_KEY, None),
    "valid token with a malformed key is denied": (attrs(key="a b"), {}, BEARER,
                                                   DenyReason.MALFORMED_CREDENTIALS, None),
    "valid token with an unavailable key is denied": (attrs(key="k"), {"k": DenyReason.AUTH_UNAVAILABLE}, BEARER,
                                                      DenyReason.AUTH_UNAVAILABLE, None),
    "valid token and valid key: the key names the caller": (attrs(key="k"), {"k": KEY_CREDENTIAL}, BEARER, None,
                                                            "key-app"),
    "valid token wins over jwt_authn claims": (attrs(claims=CLAIMS), {}, BEARER, None, "token-app"),
}  # fmt: skip


@pytest.mark.parametrize("name", BEARER_CASES)
def test_bearer_token_precedence(name):
    request, answers, bearer, expected, app = BEARER_CASES[name]
    decision = decide(request, CATALOG, POLICY, NOW, lookup_of(answers), bearer)
    assert decision.reason is expected
    if app is not None:
        assert decision.auth.app_name == app


def test_bad_bearer_token_may_be_let_through_marked_but_unavailable_keys_never():
    policy = dataclasses.replace(POLICY, allow_unauthorized=True)
    assert decide(attrs(), CATALOG, policy, NOW, bearer=DenyReason.INVALID_TOKEN).fail_open
    assert not decide(attrs(), CATALOG, policy, NOW, bearer=DenyReason.TOKEN_UNAVAILABLE).allowed


def test_a_bearer_token_is_removed_upstream_unless_forwarded():
    policy = dataclasses.replace(POLICY, token_headers=(("authorization", "bearer "),))
    request = RequestAttrs("GET", "/v1/x", "", {":authority": "orders-api", "authorization": "Bearer t"})
    assert "authorization" in decide(request, CATALOG, policy, NOW, bearer=BEARER).headers_to_remove
    assert "authorization" not in decide(request, CATALOG, POLICY, NOW, bearer=BEARER).headers_to_remove
    basic = RequestAttrs(
        "GET", "/v1/x", "", {":authority": "orders-api", "authorization": "Basic u:p", "x-api-key": "k"}
    )
    kept = decide(basic, CATALOG, policy, NOW, lookup_of({"k": KEY_CREDENTIAL}))
    assert kept.allowed and "authorization" not in kept.headers_to_remove  # not a bearer token: the app's
