"""FakeApigee keeps the contract of reference §3 / §11, over MockTransport and over loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.fakes.apigee import FakeApigee, quota_window
from tests.fakes.apigee_cli import main
from tests.fakes.http_server import LoopbackServer
from tests.support.apigee_config import new_service_account

BASE = "http://apigee.test"
RS = "/remote-service"
PRODUCTS = [
    {
        "name": "httpbin-product",
        "displayName": "httpbin product",
        "approvalType": "auto",
        "attributes": [{"name": "apigee-remote-service-targets", "value": "httpbin.org"}],
        "apiResources": ["/headers"],
        "environments": ["test"],
        "quota": "5",
        "quotaInterval": "1",
        "quotaTimeUnit": "minute",
    }
]
T0 = datetime(2024, 5, 17, 10, 20, 30, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def client(fake: FakeApigee) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.transport(), base_url=BASE)


def decode(fake: FakeApigee, token: str) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(fake.jwks)[kid]
    return jwt.decode(token, key, algorithms=["RS256"], audience="remote-service-client")


def policy_key() -> tuple[rsa.RSAPrivateKey, dict]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return private, {"keys": [{**jwk, "kid": "policy-1", "alg": "RS256", "use": "sig"}]}


def internal_jwt(private, *, now: float, iss="apigee-remote-service-envoy", aud="remote-service-client"):
    claims = {"iss": iss, "aud": aud, "iat": int(now), "exp": int(now) + 600}
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": "policy-1"})


# -- products ---------------------------------------------------------------------------------------


async def test_products_etag_and_304():
    fake = FakeApigee()
    fake.set_products(PRODUCTS)
    async with client(fake) as http:
        first = await http.get(f"{RS}/products")
        assert first.status_code == 200
        assert first.json() == {"apiProduct": PRODUCTS}
        assert first.headers["etag"] == '"' + hashlib.sha512(first.content).hexdigest() + '"'
        assert first.json()["apiProduct"][0]["quota"] == "5"

        same = await http.get(f"{RS}/products", headers={"If-None-Match": first.headers["etag"]})
        assert (same.status_code, same.content, same.headers["etag"]) == (304, b"", first.headers["etag"])

        fake.set_products([*PRODUCTS, {"name": "other", "quota": "null"}])
        changed = await http.get(f"{RS}/products", headers={"If-None-Match": first.headers["etag"]})
        assert changed.status_code == 200
        assert changed.headers["etag"] != first.headers["etag"]
        assert [p["name"] for p in changed.json()["apiProduct"]] == ["httpbin-product", "other"]
    assert fake.calls["products"] == 3


async def test_products_start_empty_and_are_copied():
    fake = FakeApigee()
    products = [dict(PRODUCTS[0])]
    fake.set_products(products)
    products[0]["name"] = "mutated"
    async with client(fake) as http:
        assert (await http.get(f"{RS}/products")).json()["apiProduct"][0]["name"] == "httpbin-product"
    assert FakeApigee().products == []


async def test_unknown_path_and_wrong_method():
    fake = FakeApigee()
    async with client(fake) as http:
        assert (await http.get(f"{RS}/nope")).status_code == 404
        assert (await http.get("/products")).status_code == 404
        wrong = await http.post(f"{RS}/products")
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET")


# -- verifyApiKey -----------------------------------------------------------------------------------


async def test_verify_api_key_issues_a_signed_token_with_proxy_claims():
    clock = Clock(time.time())
    fake = FakeApigee(clock=clock, token_ttl=300)
    fake.add_key("key-1", app="httpbin-app", developer_email="dev@x.com", products=["httpbin-product"])
    async with client(fake) as http:
        response = await http.post(f"{RS}/verifyApiKey", json={"apiKey": "key-1"})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    token = response.json()["token"]
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "JWT", "kid": fake.signing_kid}
    claims = decode(fake, token)
    assert set(claims) == {
        "iss", "aud", "exp", "nbf", "iat", "jti", "client_id", "api_product_list",
        "application_id", "application_name", "developer_email",
    }  # fmt: skip
    assert claims["iss"] == "http://apigee.test/remote-service/verifyApiKey"
    assert claims["client_id"] == "key-1"  # the GCP proxy's client_id is the key itself
    assert claims["api_product_list"] == ["httpbin-product"]
    assert claims["application_name"] == "httpbin-app"
    assert claims["developer_email"] == "dev@x.com"
    assert claims["iat"] == claims["nbf"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 300


async def test_verify_api_key_custom_client_id_and_unique_jti():
    fake = FakeApigee()
    fake.add_key("key-1", app="a", developer_email="d@x", products=[], client_id="cid-9")
    async with client(fake) as http:
        tokens = [
            (await http.post(f"{RS}/verifyApiKey", json={"apiKey": "key-1"})).json()["token"] for _ in "ab"
        ]
    claims = [decode(fake, t) for t in tokens]
    assert claims[0]["client_id"] == "cid-9"
    assert claims[0]["api_product_list"] == []
    assert claims[0]["jti"] != claims[1]["jti"]
    assert claims[0]["application_id"] == claims[1]["application_id"]


async def test_verify_api_key_rejections():
    fake = FakeApigee()
    fake.add_key("key-1", app="a", developer_email="d@x", products=["p"])
    fake.add_key("pending", app="a", developer_email="d@x", products=["p"], status="pending")
    fault = {"fault": {"faultstring": "Invalid ApiKey", "detail": {"errorcode": "oauth.v2.InvalidApiKey"}}}
    async with client(fake) as http:
        unknown = await http.post(f"{RS}/verifyApiKey", json={"apiKey": "nope"})
        assert (unknown.status_code, unknown.json()) == (401, fault)
        assert (await http.post(f"{RS}/verifyApiKey", json={"apiKey": "pending"})).status_code == 401
        fake.revoke_key("key-1")
        revoked = await http.post(f"{RS}/verifyApiKey", json={"apiKey": "key-1"})
        assert (revoked.status_code, revoked.json()) == (401, fault)
        for body in (b"{}", b'{"apiKey": ""}', b'{"apiKey": 7}', b"not json", b"[]"):
            missing = await http.post(f"{RS}/verifyApiKey", content=body)
            assert missing.status_code == 400
            assert missing.json() == {"error": "invalid_request", "error_description": "invalid request"}
    assert fake.calls["verifyApiKey"] == 8


# -- remote-token -----------------------------------------------------------------------------------


async def test_certs_serves_the_signing_jwks():
    fake = FakeApigee()
    async with client(fake) as http:
        response = await http.get("/remote-token/certs")
    assert response.json() == fake.jwks
    (key,) = fake.jwks["keys"]
    assert {k: key[k] for k in ("kty", "kid", "alg", "use", "e")} == {
        "kty": "RSA", "kid": fake.signing_kid, "alg": "RS256", "use": "sig", "e": "AQAB",
    }  # fmt: skip
    assert len(base64.urlsafe_b64decode(key["n"] + "==")) == 256  # 2048-bit modulus
    datetime.strptime(fake.signing_kid, "%Y-%m-%dT%H:%M:%SZ")  # RFC 3339 kid like the CLI's


async def test_token_endpoint():
    fake = FakeApigee(token_ttl=900)
    fake.add_key("key-1", app="app", developer_email="d@x", products=["p1", "p2"])
    good = {"client_id": "key-1", "client_secret": "s", "grant_type": "client_credentials"}
    async with client(fake) as http:
        response = await http.post("/remote-token/token", json=good)
        form = await http.post("/remote-token/token", data=good)
        bad_secret = await http.post("/remote-token/token", json={**good, "client_secret": ""})
        unknown = await http.post("/remote-token/token", json={**good, "client_id": "nope"})
        bad_grant = await http.post("/remote-token/token", json={**good, "grant_type": "password"})
        fake.revoke_key("key-1")
        revoked = await http.post("/remote-token/token", json=good)
    body = response.json()
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 900)
    claims = decode(fake, body["access_token"])
    assert claims["iss"] == "http://apigee.test/remote-token/token"
    assert claims["api_product_list"] == ["p1", "p2"]
    assert (claims["client_id"], claims["application_name"], claims["developer_email"]) == (
        "key-1",
        "app",
        "d@x",
    )
    assert claims["scope"] == "" and claims["access_token"]
    assert form.status_code == 200
    assert [r.status_code for r in (bad_secret, unknown, revoked)] == [401, 401, 401]
    assert bad_grant.status_code == 400


# -- auth -------------------------------------------------------------------------------------------


async def test_basic_auth_enforced_on_remote_service_only():
    fake = FakeApigee(basic_auth=("key", "secret"))
    good = "Basic " + base64.b64encode(b"key:secret").decode()
    wrong = "Basic " + base64.b64encode(b"key:other").decode()
    async with client(fake) as http:
        for headers in (
            {},
            {"Authorization": wrong},
            {"Authorization": "Basic !!!"},
            {"Authorization": "Bearer x"},
        ):
            denied = await http.get(f"{RS}/products", headers=headers)
            assert (denied.status_code, denied.json()) == (401, {"error": "unauthorized"})
        assert (await http.get(f"{RS}/products", headers={"Authorization": good})).status_code == 200
        assert (await http.get("/remote-token/certs")).status_code == 200
    assert fake.last_headers["products"]["authorization"] == good
    assert fake.calls["products"] == 5


async def test_bearer_internal_jwt_enforced():
    clock = Clock(time.time())
    private, jwks = policy_key()
    other, _ = policy_key()
    fake = FakeApigee(policy_jwks=jwks, clock=clock)
    fake.add_key("k", app="a", developer_email="d@x", products=[])

    async def status(token: str) -> int:
        async with client(fake) as http:
            headers = {"Authorization": f"Bearer {token}"}
            return (await http.post(f"{RS}/verifyApiKey", json={"apiKey": "k"}, headers=headers)).status_code

    assert await status(internal_jwt(private, now=clock.now)) == 200
    assert await status(internal_jwt(private, now=clock.now, iss="someone")) == 401
    assert await status(internal_jwt(private, now=clock.now, aud="other")) == 401
    assert await status(internal_jwt(other, now=clock.now)) == 401
    assert await status("not-a-jwt") == 401
    stale = internal_jwt(private, now=clock.now)
    clock.now += 601  # the fake checks exp with its injected clock
    assert await status(stale) == 401
    async with client(fake) as http:
        assert (await http.post(f"{RS}/quotas", json={})).status_code == 401
        basic = {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}
        assert (await http.get(f"{RS}/products", headers=basic)).status_code == 401


# -- faults -----------------------------------------------------------------------------------------


async def test_fail_next_counts_down_and_is_counted():
    fake = FakeApigee()
    fake.fail_next("products", 503, count=2)
    fake.fail_next("products", 500, body=b"oops", headers={"Retry-After": "1"})
    async with client(fake) as http:
        first = await http.get(f"{RS}/products")
        assert (first.status_code, first.json()) == (503, {"error": "injected"})
        assert (await http.get(f"{RS}/products")).status_code == 503
        custom = await http.get(f"{RS}/products")
        assert (custom.status_code, custom.content, custom.headers["retry-after"]) == (500, b"oops", "1")
        assert (await http.get(f"{RS}/products")).status_code == 200
        assert (await http.get("/remote-token/certs")).status_code == 200  # other endpoints unaffected
    assert fake.calls["products"] == 4


async def test_drop_then_fail_then_malformed_in_order():
    fake = FakeApigee()
    fake.malformed_next("quotas", b"{not json", count=1)
    fake.fail_next("quotas", 502)
    fake.drop_next("quotas", count=2)
    body = {"identifier": "q", "weight": 1, "interval": 1, "allow": 5, "timeUnit": "minute"}
    async with client(fake) as http:
        for _ in range(2):
            with pytest.raises(httpx.ConnectError):
                await http.post(f"{RS}/quotas", json=body)
        assert (await http.post(f"{RS}/quotas", json=body)).status_code == 502
        malformed = await http.post(f"{RS}/quotas", json=body)
        assert (malformed.status_code, malformed.content) == (200, b"{not json")
        assert malformed.headers["content-type"] == "application/json"
        ok = await http.post(f"{RS}/quotas", json=body)
    assert ok.json()["used"] == 1  # faulted calls did not count toward the quota
    assert fake.calls["quotas"] == 5


async def test_malformed_next_custom_status_and_type():
    fake = FakeApigee()
    fake.malformed_next("verifyApiKey", b"<html>", status=500, content_type="text/html", count=2)
    async with client(fake) as http:
        for _ in range(2):
            response = await http.post(f"{RS}/verifyApiKey", json={"apiKey": "x"})
            assert (response.status_code, response.text, response.headers["content-type"]) == (
                500,
                "<html>",
                "text/html",
            )
        assert (await http.post(f"{RS}/verifyApiKey", json={"apiKey": "x"})).status_code == 401


async def test_set_delay_applies_to_every_answer():
    fake = FakeApigee()
    fake.set_delay("certs", 0.2)
    fake.fail_next("certs", 500)
    async with client(fake) as http:
        started = time.monotonic()
        assert (await http.get("/remote-token/certs")).status_code == 500
        assert time.monotonic() - started >= 0.2
        started = time.monotonic()
        assert (await http.get("/remote-token/certs")).status_code == 200
        assert time.monotonic() - started >= 0.2
        fake.set_delay("certs", 0)
        started = time.monotonic()
        await http.get("/remote-token/certs")
        assert time.monotonic() - started < 0.2


def test_fault_knobs_validate_arguments():
    fake = FakeApigee()
    with pytest.raises(ValueError, match="unknown endpoint"):
        fake.fail_next("analytics", 500)
    with pytest.raises(ValueError, match="count"):
        fake.drop_next("products", count=0)
    with pytest.raises(KeyError):
        fake.revoke_key("missing")


# -- quotas -----------------------------------------------------------------------------------------


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


async def test_quotas_count_per_identifier_in_calendar_minutes():
    clock = Clock(T0)  # 10:20:30 UTC
    fake = FakeApigee(clock=clock)
    ask = {"identifier": "p-app", "weight": 3, "interval": 1, "allow": 5, "timeUnit": "minute"}
    async with client(fake) as http:
        first = (await http.post(f"{RS}/quotas", json=ask)).json()
        assert first == {
            "allowed": 5, "used": 3, "exceeded": 0,
            "expiryTime": ms(2024, 5, 17, 10, 21), "timestamp": int(T0 * 1000),
        }  # fmt: skip
        clock.now += 20.5
        second = (await http.post(f"{RS}/quotas", json=ask)).json()
        assert (second["used"], second["exceeded"], second["expiryTime"]) == (5, 1, ms(2024, 5, 17, 10, 21))
        assert second["timestamp"] == int((T0 + 20.5) * 1000)
        other = (await http.post(f"{RS}/quotas", json={**ask, "identifier": "other", "weight": 0})).json()
        assert (other["used"], other["exceeded"]) == (0, 0)
        assert fake.quota_count("p-app") == 6
        clock.now += 10  # 10:21:00.5 - a new window
        assert fake.quota_count("p-app") == 0
        third = (await http.post(f"{RS}/quotas", json={**ask, "weight": 1})).json()
        assert (third["used"], third["exceeded"], third["expiryTime"]) == (1, 0, ms(2024, 5, 17, 10, 22))


@pytest.mark.parametrize(
    ("unit", "interval", "start", "end"),
    [
        ("second", 1, (2024, 5, 17, 10, 20, 30), (2024, 5, 17, 10, 20, 31)),
        ("second", 7, (2024, 5, 17, 10, 20, 29), (2024, 5, 17, 10, 20, 36)),  # 7 s steps from 2019-01-01
        ("minute", 5, (2024, 5, 17, 10, 20), (2024, 5, 17, 10, 25)),
        ("hour", 1, (2024, 5, 17, 10), (2024, 5, 17, 11)),
        ("hour", 4, (2024, 5, 17, 8), (2024, 5, 17, 12)),
        ("day", 1, (2024, 5, 17), (2024, 5, 18)),
        ("month", 1, (2024, 5, 1), (2024, 6, 1)),
        ("month", 5, (2024, 1, 1), (2024, 6, 1)),  # 5-month steps from 2019-01: month 60 of 2019-01
        ("month", 12, (2024, 1, 1), (2025, 1, 1)),
    ],
)
def test_quota_windows_are_calendar_aligned_in_utc(unit, interval, start, end):
    assert quota_window(T0, unit, interval) == (
        datetime(*start, tzinfo=UTC).timestamp(),
        datetime(*end, tzinfo=UTC).timestamp(),
    )


async def test_quotas_reject_bad_requests():
    fake = FakeApigee(clock=Clock())
    ask = {"identifier": "q", "weight": 1, "interval": 1, "allow": 5, "timeUnit": "minute"}
    bad = [
        {},
        {**ask, "timeUnit": "week"},
        {**ask, "interval": 0},
        {**ask, "weight": -1},
        {**ask, "allow": "5"},
    ]
    async with client(fake) as http:
        for body in [*bad, {**ask, "identifier": ""}, {**ask, "weight": True}]:
            assert (await http.post(f"{RS}/quotas", json=body)).status_code == 400, body
        month = (await http.post(f"{RS}/quotas", json={**ask, "timeUnit": "month"})).json()
    assert month["expiryTime"] == ms(2024, 6, 1)


# -- real loopback server ---------------------------------------------------------------------------


async def test_server_answers_like_the_transport_and_keeps_alive():
    fake = FakeApigee()
    fake.set_products(PRODUCTS)
    fake.add_key("key-1", app="a", developer_email="d@x", products=["httpbin-product"])
    async with await fake.serve() as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.remote_service_url == server.base_url + "/remote-service"
        assert server.runtime_url == server.base_url
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            first = await http.get(f"{RS}/products")
            again = await http.get(f"{RS}/products", headers={"If-None-Match": first.headers["etag"]})
            local = [r.extensions["network_stream"].get_extra_info("client_addr") for r in (first, again)]
            assert local[0] == local[1]  # the same connection served both requests
            assert first.json() == {"apiProduct": PRODUCTS}
            assert first.headers["etag"] == fake.products_etag
            assert (again.status_code, again.content) == (304, b"")
            verified = await http.post(f"{RS}/verifyApiKey", json={"apiKey": "key-1"})
            claims = decode(fake, verified.json()["token"])
            assert claims["iss"] == f"{server.base_url}/remote-service/verifyApiKey"
            assert (await http.get("/remote-token/certs")).json() == fake.jwks
            assert (await http.get("/elsewhere")).status_code == 404
    assert fake.calls["products"] == 2


async def test_server_drop_closes_without_answer():
    fake = FakeApigee()
    fake.drop_next("products")
    async with await fake.serve() as server, httpx.AsyncClient(base_url=server.base_url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(f"{RS}/products")
        assert (await http.get(f"{RS}/products")).status_code == 200
    assert fake.calls["products"] == 2


async def test_server_faults_and_delay():
    fake = FakeApigee()
    fake.fail_next("token", 503, body=b"busy", headers={"Retry-After": "2"})
    fake.set_delay("certs", 0.3)
    async with await fake.serve() as server, httpx.AsyncClient(base_url=server.base_url) as http:
        failed = await http.post("/remote-token/token", json={})
        assert (failed.status_code, failed.text, failed.headers["retry-after"]) == (503, "busy", "2")
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/remote-token/certs", timeout=0.05)


async def test_server_limits_and_connection_close():
    fake = FakeApigee()
    async with await fake.serve() as server, httpx.AsyncClient(base_url=server.base_url) as http:
        big = await http.post(f"{RS}/verifyApiKey", content=b"x" * ((1 << 20) + 1))
        assert big.status_code == 413

        async def chunks():
            yield b'{"apiKey": "k"}'

        chunked = await http.post(f"{RS}/verifyApiKey", content=chunks())
        assert chunked.status_code == 501
        closing = await http.get("/remote-token/certs", headers={"Connection": "close"})
        assert (closing.status_code, closing.headers["connection"]) == (200, "close")
        assert (await http.get("/remote-token/certs")).status_code == 200


async def test_server_close_drops_idle_keep_alive_connections():
    fake = FakeApigee()
    server = await fake.serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /remote-token/certs HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
    )
    assert json.loads(await reader.readexactly(length)) == fake.jwks
    await asyncio.wait_for(server.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await writer.wait_closed()


async def test_server_rejects_garbage_and_non_loopback_hosts():
    fake = FakeApigee()
    async with await fake.serve() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"HELLO\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
        writer.close()
        await writer.wait_closed()
    with pytest.raises(ValueError, match="loopback"):
        await fake.serve(host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        await LoopbackServer.start(fake.handler, host="example.com")


# -- standalone -------------------------------------------------------------------------------------


def test_standalone_runs_until_sigterm(tmp_path: Path):
    products = tmp_path / "products.json"
    products.write_text(json.dumps({"apiProduct": PRODUCTS}))
    command = [sys.executable, "-m", "tests.fakes.apigee", "--port", "0", "--products", str(products)]
    command += ["--key", "key-1:app:dev@x.com:httpbin-product,other", "--basic-auth", "k:s"]
    account = new_service_account("http://127.0.0.1/token")
    (tmp_path / "sa.pem").write_text(account.public_key_pem)
    command += ["--service-account", f"{account.client_email}={tmp_path / 'sa.pem'}"]
    root = Path(__file__).parents[3]
    with subprocess.Popen(
        command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            line = process.stdout.readline()
            base_url = line.split()[4]
            assert base_url.startswith("http://127.0.0.1:"), line
            assert http_status(base_url) == 401
            with httpx.Client(base_url=base_url, auth=("k", "s")) as http:
                assert http.get(f"{RS}/products").json() == {"apiProduct": PRODUCTS}
                token = http.post(f"{RS}/verifyApiKey", json={"apiKey": "key-1"}).json()["token"]
                certs = http.get("/remote-token/certs").json()
            key = jwt.PyJWKSet.from_dict(certs).keys[0]
            claims = jwt.decode(token, key, algorithms=["RS256"], audience="remote-service-client")
            assert claims["api_product_list"] == ["httpbin-product", "other"]
            assert claims["developer_email"] == "dev@x.com"
            with httpx.Client(base_url=base_url, headers={"Authorization": "Bearer junk"}) as http:
                assert http.get("/v1/organizations/org/apps").status_code == 401  # only the account's tokens
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0, process.stderr.read()


def http_status(base_url: str) -> int:
    with httpx.Client(base_url=base_url) as http:
        return http.get(f"{RS}/products").status_code


@pytest.mark.parametrize(
    "argv",
    [
        ["--key", "only:two"],
        ["--key", ":app:d@x:"],
        ["--basic-auth", "nocolon"],
        ["--service-account", "a@b"],
    ],
)
def test_standalone_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "expected" in capsys.readouterr().err
