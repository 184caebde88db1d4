"""The Check boundary: no exception leaves it, every failure is an explicit deny."""

import datetime as dt
import json
import logging

from envoy.service.auth.v3 import external_auth_pb2 as pb

from authz.clock import SystemClock
from authz.decision.authorize import key_digest
from authz.decision.model import Catalog, Credential, Policy
from authz.metrics import new_metrics
from tests.support.servicers import grpc_servicer

KEY = "secret-key-123"


class ExplodingMapping(dict):
    def get(self, *args):
        raise RuntimeError("dependency failed")


def request(key=KEY):
    req = pb.CheckRequest()
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.path = "/x?x-api-key=" + key
    req.attributes.request.http.headers.update({":authority": "api", "x-api-key": key})
    return req


def servicer(catalog_source, metrics=None):
    return grpc_servicer(catalog_source, Policy("org", "test"), metrics or new_metrics(), SystemClock())


def reason(wire):
    response = pb.CheckResponse.FromString(wire)
    assert response.status.code != 0
    return response.denied_response.status.code, json.loads(response.denied_response.body)["reason"]


async def test_not_ready_is_an_explicit_503():
    response = await servicer(lambda: None).Check(request(), None)
    assert pb.CheckResponse.FromString(response).status.code == 14
    assert reason(response) == (503, "not_ready")


async def test_catalog_source_raising_is_an_explicit_503_and_counted(caplog):
    def broken():
        raise RuntimeError("boom")

    metrics = new_metrics()
    with caplog.at_level(logging.INFO, logger="authz"):
        response = await servicer(broken, metrics).Check(request(), None)
    assert reason(response) == (503, "internal_error")
    assert metrics.registry.get_sample_value("auth_check_errors_total", {"org": "org"}) == 1.0
    assert KEY not in caplog.text


async def test_decision_dependency_raising_is_an_explicit_503():
    catalog = Catalog(
        ExplodingMapping(), {key_digest(KEY): Credential(key_digest(KEY), "id", "app", "d", ("p",))}
    )
    response = await servicer(lambda: catalog).Check(request(), None)
    assert reason(response) == (503, "internal_error")


async def test_garbage_request_object_is_an_explicit_503():
    response = await servicer(lambda: Catalog({}, {})).Check(object(), None)
    assert reason(response) == (503, "internal_error")


async def test_deny_log_line_is_reduced_and_never_has_the_key(caplog):
    with caplog.at_level(logging.INFO, logger="authz"):
        await servicer(lambda: Catalog({}, {})).Check(request(), None)
    assert "denied: unknown_key" in caplog.text
    assert "path=/x " in caplog.text
    assert KEY not in caplog.text


# --- the allow cache -----------------------------------------------------------------------------------


def _catalog(expires_at=None, methods="[GET]"):
    from authz.standalone.catalog_file import parse_catalog

    expiry = f", expires_at: {expires_at}" if expires_at else ""
    return parse_catalog(
        f"""
products: [{{name: p, environments: [test], operationGroup: {{operationConfigs: [
  {{apiSource: api, operations: [{{resource: "/x", methods: {methods}}}]}}]}}}}]
developers: [{{email: d@x, apps: [{{name: a, products: [p], credentials: [
  {{key_sha256: "{key_digest(KEY)}"{expiry}}}]}}]}}]
""",
        "c.yaml",
    )


def _allowed(wire):
    response = pb.CheckResponse.FromString(wire)
    return response.status.code == 0 and not response.HasField("denied_response")


async def test_cached_allow_respects_catalog_swaps():
    current = {"catalog": _catalog()}
    svc = servicer(lambda: current["catalog"])
    first = await svc.Check(request(), None)
    assert _allowed(first)
    assert await svc.Check(request(), None) == first
    current["catalog"] = _catalog(methods="[POST]")  # a reload: the cached allow must not survive it
    assert reason(await svc.Check(request(), None)) == (403, "not_authorized")


async def test_cached_allow_respects_key_expiry():
    from tests.support.clock import FakeClock

    expiry = dt.datetime(2027, 1, 15, 8, 0, 10, tzinfo=dt.UTC).timestamp()
    clock = FakeClock(now=expiry - 5)
    catalog = _catalog(expires_at="2027-01-15T08:00:10Z")
    svc = grpc_servicer(lambda: catalog, Policy("org", "test"), new_metrics(), clock)
    assert _allowed(await svc.Check(request(), None))
    clock.advance(5)
    assert reason(await svc.Check(request(), None)) == (401, "expired_key")


async def test_cache_key_includes_headers_the_allow_removes():
    svc = servicer(lambda: _catalog())
    plain = pb.CheckResponse.FromString(await svc.Check(request(), None))
    spoofing = request()
    spoofing.attributes.request.http.headers["x-apigee-clientid"] = "spoof"
    spoofed = pb.CheckResponse.FromString(await svc.Check(spoofing, None))
    assert "x-apigee-clientid" not in plain.ok_response.headers_to_remove
    assert "x-apigee-clientid" in spoofed.ok_response.headers_to_remove


async def test_cache_is_bounded(monkeypatch):
    from authz.server import check

    monkeypatch.setattr(check, "ALLOW_CACHE_SIZE", 3)
    svc = servicer(lambda: _catalog())
    for i in range(10):
        req = request()
        req.attributes.request.http.path = f"/x?n={i}&x-api-key={KEY}"
        assert _allowed(await svc.Check(req, None))
        assert len(svc.checker._allows) <= 3


async def test_debug_log_has_redacted_headers_only(caplog):
    with caplog.at_level(logging.DEBUG, logger="authz"):
        await servicer(lambda: Catalog({}, {})).Check(request(), None)
    assert "denied request headers" in caplog.text
    assert KEY not in caplog.text
