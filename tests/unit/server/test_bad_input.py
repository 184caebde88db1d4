"""Random and hostile CheckRequests: always a deliberate answer, never an exception, never a stray allow."""

import random

from envoy.service.auth.v3 import external_auth_pb2 as pb

from authz.clock import SystemClock
from authz.decision.model import Policy
from authz.metrics import new_metrics
from authz.standalone.catalog_file import parse_catalog
from tests.support.catalogs import ORDERS_KEY, catalog_yaml
from tests.support.servicers import grpc_servicer

ALPHABET = "abcXYZ019/._-*?&=%!,: \t\x00é\u202e"


def _text(rng, limit=40):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(limit)))


def _random_request(rng):
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.method = rng.choice(["GET", "POST", "", "get", _text(rng, 8)])
    http.path = rng.choice(["/v1/orders/1", "", "/v1/orders/1?x-api-key=" + _text(rng), _text(rng, 200)])
    for _ in range(rng.randrange(6)):
        http.headers[rng.choice(["x-api-key", ":authority", "x-apigee-api", _text(rng, 10)])] = _text(
            rng, 300
        )
    if rng.random() < 0.3:
        req.attributes.context_extensions[rng.choice(["apigee_api", "apigee_environment", "x"])] = _text(rng)
    return req


async def test_random_requests_without_the_key_are_always_denied_explicitly():
    catalog = parse_catalog(catalog_yaml(), "c.yaml")
    servicer = grpc_servicer(lambda: catalog, Policy("org", "test"), new_metrics(), SystemClock())
    rng = random.Random(20261123)
    for _ in range(3000):
        response = pb.CheckResponse.FromString(await servicer.Check(_random_request(rng), None))
        assert response.status.code != 0
        assert response.denied_response.status.code in (400, 401, 403, 503)


async def test_valid_key_with_random_noise_allows_only_the_granted_operation():
    catalog = parse_catalog(catalog_yaml(), "c.yaml")
    servicer = grpc_servicer(lambda: catalog, Policy("org", "test"), new_metrics(), SystemClock())
    rng = random.Random(7)
    allowed = 0
    for _ in range(2000):
        req = _random_request(rng)
        http = req.attributes.request.http
        http.headers["x-api-key"] = ORDERS_KEY
        if rng.random() < 0.7:
            http.headers[":authority"] = "orders-api"
            req.attributes.context_extensions.clear()
        response = pb.CheckResponse.FromString(await servicer.Check(req, None))
        granted = (
            http.method in ("GET", "POST")
            and http.path.partition("?")[0].startswith("/v1/orders/")
            and (req.attributes.context_extensions.get("apigee_api") or http.headers.get(":authority"))
            == "orders-api"
        )
        if response.status.code == 0:
            assert granted, req
            allowed += 1
    assert allowed > 100  # the noise must not hide the allow path either
