import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb

from authz.decision.model import Decision, DenyReason
from authz.server import codec


def check_request(path="/v1/orders?x-api-key=k&a=1", headers=None, ext=None):
    request = pb.CheckRequest()
    http = request.attributes.request.http
    http.method = "GET"
    http.path = path
    http.headers.update({":authority": "orders.example.com", "x-api-key": "k", **(headers or {})})
    request.attributes.context_extensions.update(ext or {})
    return request


def test_request_attrs():
    attrs = codec.request_attrs(check_request(ext={"apigee_api": "orders"}))
    assert attrs.method == "GET"
    assert attrs.path == "/v1/orders"
    assert attrs.query == "x-api-key=k&a=1"
    assert attrs.headers[":authority"] == "orders.example.com"
    assert attrs.context_extensions == {"apigee_api": "orders"}


def test_request_attrs_from_raw_header_map_joins_duplicates():
    request = pb.CheckRequest()
    http = request.attributes.request.http
    http.path = "/"
    for key, raw in (("X-Api-Key", b"a"), ("x-api-key", b"b"), ("bin", b"\xff")):
        http.header_map.headers.add(key=key, raw_value=raw)
    attrs = codec.request_attrs(request)
    assert attrs.headers == {"x-api-key": "a,b", "bin": "\ufffd"}


def test_empty_request_is_readable():
    attrs = codec.request_attrs(pb.CheckRequest())
    assert (attrs.method, attrs.path, attrs.query, dict(attrs.headers)) == ("", "", "", {})


@pytest.mark.parametrize("reason", list(DenyReason))
def test_every_deny_has_a_nonzero_status_and_json_body(reason):
    response = codec.check_response(Decision(reason=reason))
    grpc_code, status, message = codec.DENY_STATUS[reason]
    assert response.status.code == grpc_code != 0
    assert response.denied_response.status.code == status
    assert status in (400, 401, 403, 429, 503)
    assert json.loads(response.denied_response.body) == {"error": message, "reason": reason.value}
    assert response.denied_response.headers[0].header.key == "content-type"
    assert not response.HasField("ok_response")
    # round-trips through the wire format unchanged
    assert pb.CheckResponse.FromString(response.SerializeToString()) == response


def test_allow_response():
    decision = Decision(
        reason=None,
        metadata={"x-apigee-api": "orders", "x-apigee-authorized": "true"},
        headers_to_set=(("x-apigee-api", "orders"),),
        headers_to_remove=("x-api-key", "x-apigee-spoof"),
        query_params_to_remove=("x-api-key",),
    )
    response = codec.check_response(decision)
    assert response.status.code == 0
    ok = response.ok_response
    assert [(h.header.key, h.header.value) for h in ok.headers] == [("x-apigee-api", "orders")]
    assert ok.headers[0].append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert list(ok.headers_to_remove) == ["x-api-key", "x-apigee-spoof"]
    assert list(ok.query_parameters_to_remove) == ["x-api-key"]
    assert codec.metadata_struct(response) == {"x-apigee-api": "orders", "x-apigee-authorized": "true"}


def test_fail_open_is_an_allow():
    decision = Decision(
        reason=DenyReason.UNKNOWN_KEY,
        fail_open=True,
        metadata={"x-apigee-unauthorized-reason": "unknown_key"},
    )
    response = codec.check_response(decision)
    assert response.status.code == 0
    assert not response.HasField("denied_response")


def test_decision_key_bounds_its_size():
    from authz.decision.model import Policy

    policy = Policy("org", "test")
    assert codec.decision_key(check_request(), policy) is not None
    assert codec.decision_key(check_request(path="/" + "a" * 2000), policy) is None
    spoofed = {f"x-apigee-h{i}": "v" for i in range(9)}
    assert codec.decision_key(check_request(headers=spoofed), policy) is None
    assert codec.decision_key(pb.CheckRequest(), policy) is None  # no header map to key on


def with_jwt_claims(request, provider, claims):
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update({provider: claims, "not-a-provider": "x"})
    request.attributes.metadata_context.filter_metadata[codec.JWT_AUTHN].CopyFrom(struct)
    return request


def test_jwt_claims_from_jwt_authn_metadata():
    claims = {"api_product_list": ["a", "b"], "client_id": "c", "exp": 1800000000, "nested": {"k": True}}
    attrs = codec.request_attrs(with_jwt_claims(check_request(), "apigee", claims))
    assert attrs.jwt_metadata == {"apigee": {**claims, "exp": 1800000000.0}}
    assert codec.request_attrs(check_request()).jwt_metadata == {}


def test_requests_with_jwt_claims_are_not_keyed():
    from authz.decision.model import Policy

    request = with_jwt_claims(check_request(), "apigee", {"client_id": "c"})
    assert codec.decision_key(request, Policy("org", "test")) is None


def test_invalid_token_deny_carries_a_bearer_challenge():
    response = codec.check_response(Decision(reason=DenyReason.INVALID_TOKEN))
    headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert response.denied_response.status.code == 401
    assert headers["www-authenticate"] == 'Bearer error="invalid_token"'
    other = codec.check_response(Decision(reason=DenyReason.UNKNOWN_KEY))
    assert "www-authenticate" not in {h.header.key for h in other.denied_response.headers}


def _headers(options):
    return [(h.header.key, h.header.value) for h in options]


def test_quota_exceeded_is_the_prebuilt_429_plus_rate_limit_headers():
    wire = codec.quota_exceeded(Decision(reason=DenyReason.QUOTA_EXCEEDED), 5, reset=1060.0, now=1012.4)
    response = pb.CheckResponse.FromString(wire)
    assert response.status.code == 8  # RESOURCE_EXHAUSTED
    assert response.denied_response.status.code == 429
    assert json.loads(response.denied_response.body)["reason"] == "quota_exceeded"
    assert _headers(response.denied_response.headers) == [
        ("content-type", "application/json"),
        ("retry-after", "48"),  # whole seconds, rounded up
        ("ratelimit-limit", "5"),
        ("ratelimit-remaining", "0"),
        ("ratelimit-reset", "48"),
    ]


def test_quota_exceeded_under_allow_unauthorized_is_an_allow_with_the_headers_for_the_client():
    decision = Decision(reason=DenyReason.QUOTA_EXCEEDED, metadata={"x-apigee-api": "a"}, fail_open=True)
    response = pb.CheckResponse.FromString(codec.quota_exceeded(decision, 5, reset=1000.2, now=1000.0))
    assert response.status.code == 0
    assert codec.metadata_struct(response) == {"x-apigee-api": "a"}
    assert _headers(response.ok_response.response_headers_to_add) == [
        ("ratelimit-limit", "5"),
        ("ratelimit-remaining", "0"),
        ("ratelimit-reset", "1"),  # at least one second
    ]


def test_with_quota_headers_adds_client_headers_to_an_allow():
    allow = Decision(reason=None, headers_to_remove=("x-api-key",))
    wire = codec.with_quota_headers(codec.encode(allow), 100, 42, reset=1060.0, now=1000.0)
    response = pb.CheckResponse.FromString(wire)
    assert list(response.ok_response.headers_to_remove) == ["x-api-key"]
    assert _headers(response.ok_response.response_headers_to_add) == [
        ("ratelimit-limit", "100"),
        ("ratelimit-remaining", "42"),
        ("ratelimit-reset", "60"),
    ]
