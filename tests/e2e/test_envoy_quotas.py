"""Quotas end to end: a real Envoy in front of ``python -m authz serve``; what the client sees over HTTP.

Standalone (a local catalog) and Apigee mode (a FakeApigee on a thread of this process, as in
test_envoy_apigee_mode.py). Windows are UTC calendar minutes on the real clock: a measurement that a
minute boundary cut in two runs once more with the next app's key (a fresh bucket) instead of sleeping.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.stack import Stack, start_stack
from devstack.upstream import EchoUpstream
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import write_policy_secret
from tests.support.apigee_thread import ApigeeThread
from tests.support.catalogs import (
    FREE_KEY,
    QUOTA_DEVELOPER,
    QUOTA_KEYS,
    QUOTA_PRODUCT,
    quota_app,
    quota_catalog_yaml,
    quota_id,
    quota_products,
)
from tests.support.http_polling import poll
from tests.support.minutes import Run, in_one_minute

pytestmark = pytest.mark.e2e

API = "orders-api"  # every route names it (the apigee_api context extension)


def send(http: httpx.Client, stack: Stack, key: str, path: str = "/v1/orders/1") -> httpx.Response:
    return http.get(stack.url + path, headers={"x-api-key": key})


def sends(http: httpx.Client, stack: Stack, key: str, count: int) -> list[httpx.Response]:
    return [send(http, stack, key) for _ in range(count)]


def assert_429(response: httpx.Response, limit: int, run: Run[object], stack: Stack) -> None:
    """The quota_exceeded deny as the client gets it: status, JSON body, retry-after and rate-limit headers."""
    assert response.status_code == 429, stack.logs()
    assert response.headers["content-type"] == "application/json"
    assert response.json()["reason"] == "quota_exceeded"
    assert response.json()["error"]
    headers = response.headers
    for name in ("retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
        assert len(headers.get_list(name)) == 1, headers  # sent once, not once per merge
    assert headers["ratelimit-limit"] == str(limit)
    assert headers["ratelimit-remaining"] == "0"
    assert re.fullmatch(r"[0-9]+", headers["ratelimit-reset"]), headers
    assert headers["retry-after"] == headers["ratelimit-reset"]
    reset = int(headers["ratelimit-reset"])
    assert 1 <= reset <= 60
    assert reset in run.reset_range(), (reset, run)
    assert "method" not in response.json()  # Envoy answered: the upstream (an echo) never saw it


def assert_upstream_answered(response: httpx.Response, stack: Stack) -> None:
    assert response.status_code == 200, stack.logs()
    seen = response.json()["headers"]  # what the echo upstream received
    assert "x-api-key" not in seen
    assert not [name for name in seen if name.startswith("ratelimit-")]


# --- standalone ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(module_authz_stack):
    """A standalone stack with the metered product (5 per minute); ``auth.quota_headers`` off."""
    return module_authz_stack(quota_catalog_yaml(5, api=API), api_name=API)


@pytest.fixture(scope="module")
def with_headers(module_authz_stack):
    """The same with ``auth.quota_headers: true``."""
    return module_authz_stack(quota_catalog_yaml(5, api=API), {"auth": {"quota_headers": True}}, api_name=API)


def test_the_sixth_request_of_a_minute_gets_429_with_retry_headers(plain, http):
    run = in_one_minute(lambda identity: sends(http, plain, QUOTA_KEYS[identity], 6))
    allowed, refused = run.result[:5], run.result[5]
    for response in allowed:
        assert_upstream_answered(response, plain)
        assert not [name for name in response.headers if name.startswith("ratelimit-")]  # off by default
        assert "retry-after" not in response.headers
    assert_429(refused, 5, run, plain)
    # Another app has a bucket of its own; a product without a quota has none.
    for key in (QUOTA_KEYS[run.identity + 2], FREE_KEY):
        assert [r.status_code for r in sends(http, plain, key, 5)] == [200] * 5
    # Envoy counted the 429 as a deny from the authorization service.
    assert plain.envoy_stats().get("http.ingress_http.ext_authz.denied", 0) >= 1


def test_quota_headers_reach_the_client_on_allowed_responses(with_headers, http):
    run = in_one_minute(lambda identity: sends(http, with_headers, QUOTA_KEYS[identity], 6))
    allowed, refused = run.result[:5], run.result[5]
    remaining = []
    for response in allowed:
        assert_upstream_answered(response, with_headers)
        assert response.headers["ratelimit-limit"] == "5"
        assert int(response.headers["ratelimit-reset"]) in run.reset_range()
        assert len(response.headers.get_list("ratelimit-remaining")) == 1
        remaining.append(response.headers["ratelimit-remaining"])
    assert remaining == ["4", "3", "2", "1", "0"]
    assert_429(refused, 5, run, with_headers)
    free = send(http, with_headers, FREE_KEY)
    assert_upstream_answered(free, with_headers)
    assert "ratelimit-remaining" not in free.headers


def test_quota_metrics_over_http(with_headers, http):
    run = in_one_minute(lambda identity: sends(http, with_headers, QUOTA_KEYS[identity], 6), first=2)
    assert [r.status_code for r in run.result] == [200] * 5 + [429]
    text = http.get(f"{with_headers.metrics_url}/metrics").text
    assert re.search(r'quota_checks_total\{env="test",org="demo",result="allowed"\} [1-9]', text)
    assert re.search(r'quota_checks_total\{env="test",org="demo",result="exceeded"\} [1-9]', text)
    assert re.search(
        r'auth_denied_total\{code="429",env="test",org="demo",reason="quota_exceeded"\} [1-9]', text
    )
    for key in (*QUOTA_KEYS, FREE_KEY):
        assert key not in text


# --- Apigee mode ---------------------------------------------------------------------------------------


@pytest.fixture
def apigee_quota_stack(
    tmp_path: Path, echo_upstream: EchoUpstream, envoy_bin: str, transport: str
) -> Iterator[tuple[ApigeeThread, Stack]]:
    """authz in Apigee mode (provisioned policy secret) behind Envoy, against a FakeApigee on a thread
    that sells the metered product at 5 requests per minute."""
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(org="demo", env="test", policy_jwks=secret.jwks)
    fake.set_products(quota_products(5, api=API))
    for index, key in enumerate(QUOTA_KEYS):
        fake.add_key(key, app=quota_app(index), developer_email=QUOTA_DEVELOPER, products=[QUOTA_PRODUCT])
    with ApigeeThread(fake) as apigee:
        stack = start_stack(
            tmp_path / "stack",
            None,
            echo_upstream.port,
            api_name=API,
            overrides={
                "global": {"graceful_shutdown_timeout": "1s"},
                "tenant": {"remote_service_api": apigee.remote_service_url, "client_timeout": "2s"},
                "products": {"refresh_rate": "1s"},
            },
            envoy_vars={"EXT_AUTHZ_TIMEOUT": "1s"},  # above the service's own waits (key verify 0.8 s)
            policy_secret_dir=secret.directory,
            transport=transport,
        )
        try:
            yield apigee, stack
        finally:
            stack.close()
            print(f"logs of {stack.work_dir}:\n{stack.logs()}")  # shown by pytest when the test failed


def test_apigee_mode_sixth_request_gets_429_and_apigee_counts_the_admitted(apigee_quota_stack, http):
    apigee, stack = apigee_quota_stack

    def six(identity: int) -> tuple[list[httpx.Response], int]:
        minute = time.time() // 60
        responses = sends(http, stack, QUOTA_KEYS[identity], 6)
        # Apigee counts under the Go adapter's identifier (shared with Go adapters' counters). Polled while
        # the syncs settle, or until the window is over (then in_one_minute runs this again).
        identifier = quota_id(identity)
        count = poll(
            lambda: apigee.call(apigee.fake.quota_count, identifier),
            lambda n: n >= 5 or time.time() // 60 != minute,
            "Apigee's count",
        )
        return responses, count

    run = in_one_minute(six)
    responses, count = run.result
    for response in responses[:5]:
        assert_upstream_answered(response, stack)
    assert_429(responses[5], 5, run, stack)
    assert count == 5  # the five admitted; no reservation goes past what is left
