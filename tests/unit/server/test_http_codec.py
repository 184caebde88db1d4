"""http_codec: the HTTP transport reads the same attributes and answers the same outcomes as codec (gRPC)."""

import json

import httptools
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb

from authz.decision.model import Decision, DenyReason, Policy
from authz.server import codec, http_codec

POLICY = Policy("org", "test")


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response, read by a real parser."""

    class Sink:
        headers: dict[str, str] = {}
        body = b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode()] = value.decode()

        def on_body(self, body: bytes) -> None:
            self.body += body

    sink = Sink()
    sink.headers = {}
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(response)
    return parser.get_status_code(), sink.headers, sink.body


def test_request_reads_like_a_check_request():
    raw = [
        (b"Host", b"orders-api"),
        (b"X-Api-Key", b"k"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"X-Forwarded-For", b"10.0.0.2"),
        (b"x-authz-context-apigee-api", b"orders-api"),
        (b"x-authz-context-apigee-environment", b"prod"),
    ]
    request = http_codec.check_request("POST", "/v1/orders?a=1&x-api-key=k", raw)
    attrs = http_codec.request_attrs(request)
    assert (attrs.method, attrs.path, attrs.query) == ("POST", "/v1/orders", "a=1&x-api-key=k")
    assert attrs.headers == {
        ":authority": "orders-api",
        "x-api-key": "k",
        "x-forwarded-for": "10.0.0.1,10.0.0.2",
    }
    assert attrs.context_extensions == {"apigee_api": "orders-api", "apigee_environment": "prod"}
    assert attrs.jwt_metadata == {}
    assert http_codec.request_uri(request) == "/v1/orders?a=1&x-api-key=k"
    assert (http_codec.request_time_ms(request), http_codec.source_ip(request)) == (0, "")


def test_non_utf8_bytes_become_replacement_characters_never_another_key():
    request = http_codec.check_request("GET", "/", [(b"x-api-key", b"abc\xff")])
    assert request.headers["x-api-key"] == "abc\ufffd"


def test_the_allow_cache_key_matches_the_grpc_one_for_the_same_request():
    grpc = pb.CheckRequest()
    http = grpc.attributes.request.http
    http.method, http.path = "GET", "/v1/orders?x=1"
    http.headers.update({":authority": "orders-api", "x-api-key": "k", "x-apigee-api": "spoof"})
    grpc.attributes.context_extensions["apigee_api"] = "orders-api"
    raw = [(b"host", b"orders-api"), (b"x-api-key", b"k"), (b"x-apigee-api", b"spoof")]
    request = http_codec.check_request(
        "GET", "/v1/orders?x=1", [*raw, (b"x-authz-context-apigee-api", b"orders-api")]
    )
    assert http_codec.decision_key(request, POLICY) == codec.decision_key(grpc, POLICY)


@pytest.mark.parametrize("reason", list(DenyReason))
def test_every_deny_has_the_grpc_status_body_and_headers(reason):
    status, headers, body = parse(http_codec.denied_response(reason))
    grpc = pb.CheckResponse.FromString(codec.denied_response(reason)).denied_response
    assert status == grpc.status.code != 200
    assert body.decode() == grpc.body
    assert json.loads(body)["reason"] == reason.value
    assert {k: v for k, v in headers.items() if k != "content-length"} == {
        h.header.key: h.header.value for h in grpc.headers
    }


def test_allow_carries_metadata_upstream_headers_and_removals():
    decision = Decision(
        reason=None,
        metadata={"x-apigee-api": "orders-api", "x-apigee-accesstoken": ""},
        headers_to_set=(("x-apigee-api", "orders-api"),),
        headers_to_remove=("x-api-key", "x-apigee-clientid"),
    )
    status, headers, body = parse(http_codec.encode(decision))
    assert (status, body) == (200, b"")
    assert headers == {  # an empty metadata value is left out: the access-log receiver reads it as empty
        "content-length": "0",
        "x-apigee-api": "orders-api",
        "x-envoy-auth-headers-to-remove": "x-api-key,x-apigee-clientid",
    }


def test_control_characters_in_catalog_data_cannot_split_the_response():
    decision = Decision(reason=None, metadata={"x-apigee-application": "app\r\nx-injected: 1\x00"})
    status, headers, _ = parse(http_codec.encode(decision))
    assert status == 200
    assert "x-injected" not in headers
    assert headers["x-apigee-application"].strip() == "app  x-injected: 1"


def test_quota_exceeded_is_a_429_with_retry_and_rate_limit_headers():
    decision = Decision(reason=DenyReason.QUOTA_EXCEEDED)
    status, headers, body = parse(http_codec.quota_exceeded(decision, limit=5, reset=130.2, now=100.0))
    assert status == 429
    assert json.loads(body)["reason"] == "quota_exceeded"
    assert (headers["retry-after"], headers["ratelimit-limit"], headers["ratelimit-remaining"]) == (
        "31",
        "5",
        "0",
    )
    assert headers["ratelimit-reset"] == "31"


def test_quota_headers_on_an_allow_and_on_an_allow_unauthorized():
    allow = http_codec.encode(Decision(reason=None))
    status, headers, _ = parse(http_codec.with_quota_headers(allow, 5, 3, 160.0, 100.0))
    assert (status, headers["ratelimit-remaining"], headers["ratelimit-reset"]) == (200, "3", "60")
    fail_open = Decision(reason=DenyReason.QUOTA_EXCEEDED, fail_open=True)
    status, headers, _ = parse(http_codec.quota_exceeded(fail_open, limit=5, reset=130.0, now=100.0))
    assert (status, headers["ratelimit-remaining"]) == (200, "0")


def test_a_head_answer_keeps_status_and_headers_only():
    deny = http_codec.denied_response(DenyReason.MISSING_CREDENTIALS)
    head = http_codec.without_body(deny)
    assert head.endswith(b"\r\n\r\n") and deny.startswith(head) and len(head) < len(deny)
