"""The Check boundary: no exception leaves it, every failure is an explicit deny."""

import json
import logging

from envoy.service.auth.v3 import external_auth_pb2 as pb

from authz.clock import SystemClock
from authz.decision.authorize import key_digest
from authz.decision.model import Catalog, Credential, Policy
from authz.metrics import new_metrics
from authz.server.authorization import AuthorizationServicer

KEY = "secret-key-123"


class ExplodingMapping(dict):
    def get(self, *args):
        raise RuntimeError("dependency failed")


def request(key=KEY):
    req = pb.CheckRequest()
    req.attributes.request.http.path = "/x?x-api-key=" + key
    req.attributes.request.http.headers.update({":authority": "api", "x-api-key": key})
    return req


def servicer(catalog_source, metrics=None):
    return AuthorizationServicer(
        catalog_source, Policy("org", "test"), metrics or new_metrics(), SystemClock()
    )


def reason(response):
    return response.denied_response.status.code, json.loads(response.denied_response.body)["reason"]


async def test_not_ready_is_an_explicit_503():
    response = await servicer(lambda: None).Check(request(), None)
    assert response.status.code == 14
    assert reason(response) == (503, "not_ready")


async def test_catalog_source_raising_is_an_explicit_503_and_counted(caplog):
    def broken():
        raise RuntimeError("boom")

    metrics = new_metrics()
    with caplog.at_level(logging.INFO, logger="authz"):
        response = await servicer(broken, metrics).Check(request(), None)
    assert response.status.code != 0
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
