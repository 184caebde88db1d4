"""FakeApigee's analytics endpoints (reference §3.4, §3.5, §11): signed URLs, the PUT, axpublisher."""

from __future__ import annotations

import base64
import gzip
import json
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.fakes.apigee import FakeApigee

BASE = "http://apigee.test"
BASIC = "Basic " + base64.b64encode(b"key:secret").decode()
RECORDS = [{"gateway_flow_id": "a", "organization": "org", "environment": "test"}, {"gateway_flow_id": "b"}]
LEGACY_REL = "date=2024-05-17/time=10-20-00/1715941230-1234.gz"
S3_HEADERS = {"Content-Type": "application/x-gzip", "x-amz-server-side-encryption": "AES256"}


def ndjson_gz(records: list) -> bytes:
    return gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records))


def legacy_query(org: str = "org", env: str = "test", rel: str = LEGACY_REL) -> dict[str, str]:
    return {
        "encrypt": "true",
        "file_content_type": "application/x-gzip",
        "relative_file_path": rel,
        "tenant": f"{org}~{env}",
    }


def gcp_query(org: str = "org", env: str = "test") -> dict[str, str]:
    return {
        "dataset": "api",
        "relative_file_path": f"1715941230.api.{org}.{env}.{uuid.uuid4()}.gz",
        "repo": "edge",
    }


def client(fake: FakeApigee) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.transport(), base_url=BASE)


async def legacy_url(http: httpx.AsyncClient, org: str = "org", env: str = "test") -> str:
    response = await http.get(
        f"/edgemicro/analytics/organization/{org}/environment/{env}",
        params=legacy_query(org, env),
        headers={"Authorization": BASIC},
    )
    assert response.status_code == 200, response.text
    return response.json()["url"]


async def test_legacy_signed_url_then_put_stores_the_records():
    fake = FakeApigee(basic_auth=("key", "secret"))
    async with client(fake) as http:
        url = await legacy_url(http)
        parts = urlsplit(url)
        assert url.startswith(f"{BASE}/signed/")
        assert parse_qs(parts.query) == {"relative_file_path": [LEGACY_REL], "tenant": ["org~test"]}
        put = await http.put(url, content=ndjson_gz(RECORDS), headers={**S3_HEADERS, "Authorization": BASIC})
        assert (put.status_code, put.content) == (200, b"")
        assert put.headers["etag"].startswith('"')
    assert fake.analytics_records("org", "test") == RECORDS
    assert fake.analytics_records("org", "prod") == []
    assert fake.uploads == [("org", "test", LEGACY_REL)]
    assert fake.calls["analytics_url"] == 1 and fake.calls["signed_put"] == 1
    assert fake.last_headers["signed_put"]["x-amz-server-side-encryption"] == "AES256"


async def test_legacy_query_is_the_go_adapters_encoding():
    # The real URL from issue #185: '=' and '/' of relative_file_path are percent-encoded.
    fake = FakeApigee()
    rel = "date=2021-03-23/time=10-02-00/1616518747-3406204593.gz"
    raw = (
        "/edgemicro/analytics/organization/org/environment/env?encrypt=true&file_content_type="
        "application%2Fx-gzip&relative_file_path=date%3D2021-03-23%2Ftime%3D10-02-00%2F1616518747-"
        "3406204593.gz&tenant=org~env"
    )
    async with client(fake) as http:
        response = await http.get(raw)
    assert response.status_code == 200
    assert parse_qs(urlsplit(response.json()["url"]).query)["relative_file_path"] == [rel]


async def test_legacy_signed_url_checks_auth_and_query():
    fake = FakeApigee(basic_auth=("key", "secret"))
    path = "/edgemicro/analytics/organization/org/environment/test"
    async with client(fake) as http:
        assert (await http.get(path, params=legacy_query())).status_code == 401
        wrong = "Basic " + base64.b64encode(b"key:nope").decode()
        assert (
            await http.get(path, params=legacy_query(), headers={"Authorization": wrong})
        ).status_code == 401
        bad = [
            {**legacy_query(), "encrypt": "false"},
            {**legacy_query(), "file_content_type": "application/json"},
            {**legacy_query(), "tenant": "org~prod"},  # another tenant than the path's
            {**legacy_query(), "relative_file_path": "1715941230-1234.gz"},
            {**legacy_query(), "relative_file_path": "date=2024-05-17/time=10-20-30/x.gz"},  # seconds not 00
            {k: v for k, v in legacy_query().items() if k != "tenant"},
        ]
        for query in bad:
            response = await http.get(path, params=query, headers={"Authorization": BASIC})
            assert response.status_code == 400, query
        assert (await http.post(path, headers={"Authorization": BASIC})).status_code == 405


async def test_signed_url_is_single_use_and_unknown_ones_are_refused():
    fake = FakeApigee()
    async with client(fake) as http:
        url = await legacy_url(http)
        assert (await http.put(url, content=ndjson_gz(RECORDS), headers=S3_HEADERS)).status_code == 200
        again = await http.put(url, content=ndjson_gz(RECORDS), headers=S3_HEADERS)
        assert again.status_code == 403
        assert b"<Code>AccessDenied</Code>" in again.content
        assert again.headers["content-type"] == "application/xml"
        assert (await http.put("/signed/never-issued", content=ndjson_gz(RECORDS))).status_code == 403
        assert (await http.get(url)).status_code == 405
    assert fake.analytics_records("org", "test") == RECORDS  # stored once


async def test_legacy_put_needs_the_signed_headers():
    fake = FakeApigee()
    async with client(fake) as http:
        for headers in (
            {},
            {"Content-Type": "application/x-gzip"},
            {"x-amz-server-side-encryption": "AES256"},
        ):
            url = await legacy_url(http)
            response = await http.put(url, content=ndjson_gz(RECORDS), headers=headers)
            assert response.status_code == 403, headers
            assert b"SignatureDoesNotMatch" in response.content
    assert fake.uploads == []


async def test_put_body_must_be_gzip_ndjson_objects():
    fake = FakeApigee()
    async with client(fake) as http:
        for body in (
            b"not gzip",
            gzip.compress(b'{"a":1}\nnot json\n'),
            gzip.compress(b"[1]\n"),
            ndjson_gz(RECORDS)[:-6],
        ):
            url = await legacy_url(http)
            assert (await http.put(url, content=body, headers=S3_HEADERS)).status_code == 400, body
        url = await legacy_url(http)
        blank_lines = gzip.compress(b'{"a":1}\n\n{"b":2}')  # no final newline, an empty line
        assert (await http.put(url, content=blank_lines, headers=S3_HEADERS)).status_code == 200
    assert fake.analytics_records("org", "test") == [{"a": 1}, {"b": 2}]


async def test_gcp_datalocation_then_put_without_authorization():
    fake = FakeApigee(google_token="ya29.token")
    path = "/v1/organizations/org/environments/test/datalocation"
    query = gcp_query()
    async with client(fake) as http:
        assert (await http.get(path, params=query)).status_code == 401
        wrong = await http.get(path, params=query, headers={"Authorization": "Bearer other"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["status"] == "UNAUTHENTICATED"
        response = await http.get(path, params=query, headers={"Authorization": "Bearer ya29.token"})
        assert response.status_code == 200
        url = response.json()["url"]
        put = await http.put(url, content=ndjson_gz(RECORDS))
        assert put.status_code == 200
    assert fake.analytics_records("org", "test") == RECORDS
    assert fake.uploads == [("org", "test", query["relative_file_path"])]


async def test_gcp_datalocation_checks_the_query():
    fake = FakeApigee()  # no google_token: any bearer token
    path = "/v1/organizations/org/environments/test/datalocation"
    bearer = {"Authorization": "Bearer anything"}
    rel = gcp_query()["relative_file_path"]
    bad = [
        {**gcp_query(), "dataset": "other"},
        {**gcp_query(), "repo": "x"},
        gcp_query("org", "prod"),  # a file name for another env than the path's
        gcp_query("other", "test"),
        {**gcp_query(), "relative_file_path": rel.replace(".gz", ".json")},
        {**gcp_query(), "relative_file_path": "date=2024-05-17/time=10-20-00/x.gz"},
    ]
    async with client(fake) as http:
        assert (await http.get(path, params=gcp_query(), headers={"Authorization": BASIC})).status_code == 401
        for query in bad:
            response = await http.get(path, params=query, headers=bearer)
            assert (response.status_code, response.json()["error"]["status"]) == (400, "INVALID_ARGUMENT"), (
                query
            )
        assert (await http.get(path, params=gcp_query(), headers=bearer)).status_code == 200


async def test_gcp_signed_url_refuses_an_authorization_header():
    fake = FakeApigee()
    path = "/v1/organizations/org/environments/test/datalocation"
    async with client(fake) as http:
        url = (await http.get(path, params=gcp_query(), headers={"Authorization": "Bearer t"})).json()["url"]
        put = await http.put(url, content=ndjson_gz(RECORDS), headers={"Authorization": "Bearer t"})
        assert put.status_code == 400
        assert (await http.put(url, content=ndjson_gz(RECORDS))).status_code == 403  # used up
    assert fake.uploads == []


async def test_tenants_are_kept_apart():
    fake = FakeApigee()
    async with client(fake) as http:
        for org, env, records in (
            ("org", "test", [{"n": 1}]),
            ("org", "prod", [{"n": 2}]),
            ("o2", "test", [{"n": 3}]),
        ):
            url = await legacy_url(http, org, env)
            assert (await http.put(url, content=ndjson_gz(records), headers=S3_HEADERS)).status_code == 200
    assert fake.analytics_records("org", "test") == [{"n": 1}]
    assert fake.analytics_records("org", "prod") == [{"n": 2}]
    assert fake.analytics_records("o2", "test") == [{"n": 3}]
    assert [u[:2] for u in fake.uploads] == [("org", "test"), ("org", "prod"), ("o2", "test")]
    fake.analytics_records("org", "test").append({"mutated": True})
    assert fake.analytics_records("org", "test") == [{"n": 1}]  # a copy


async def test_axpublisher():
    fake = FakeApigee(basic_auth=("key", "secret"))
    path = "/edgemicro/axpublisher/organization/org/environment/test"
    body = {"organization": "org", "environment": "test", "records": RECORDS}
    async with client(fake) as http:
        assert (await http.post(path, json=body)).status_code == 401
        ok = await http.post(path, json=body, headers={"Authorization": BASIC})
        assert (ok.status_code, ok.json()) == (200, {"accepted": 2, "rejected": 0})
        mixed = await http.post(
            path, json={**body, "records": [{"x": 1}, 7]}, headers={"Authorization": BASIC}
        )
        assert mixed.json() == {"accepted": 1, "rejected": 1}
        for bad in (
            {**body, "organization": "o2"},
            {**body, "environment": "prod"},
            {**body, "records": {}},
            {},
        ):
            assert (await http.post(path, json=bad, headers={"Authorization": BASIC})).status_code == 400, bad
        assert (await http.get(path, headers={"Authorization": BASIC})).status_code == 405
    assert fake.analytics_records("org", "test") == [*RECORDS, {"x": 1}]
    assert fake.publishes == [("org", "test", 2), ("org", "test", 1)]
    assert fake.uploads == []


async def test_internal_path_is_configurable():
    fake = FakeApigee(internal_path="/")
    async with client(fake) as http:
        response = await http.get("/analytics/organization/org/environment/test", params=legacy_query())
        assert response.status_code == 200
        assert (await http.get("/edgemicro/analytics/organization/org/environment/test")).status_code == 404
        body = {"organization": "org", "environment": "test", "records": []}
        assert (
            await http.post("/axpublisher/organization/org/environment/test", json=body)
        ).status_code == 200


async def test_fault_knobs_on_analytics_endpoints():
    fake = FakeApigee()
    fake.fail_next("analytics_url", 503, headers={"Retry-After": "7"})
    fake.fail_next("signed_put", 500)
    fake.fail_next("axpublisher", 429)
    fake.drop_next("datalocation")
    async with client(fake) as http:
        failed = await http.get(
            "/edgemicro/analytics/organization/org/environment/test", params=legacy_query()
        )
        assert (failed.status_code, failed.headers["retry-after"]) == (503, "7")
        url = await legacy_url(http)
        assert (await http.put(url, content=ndjson_gz(RECORDS), headers=S3_HEADERS)).status_code == 500
        # the injected failure did not spend the URL
        assert (await http.put(url, content=ndjson_gz(RECORDS), headers=S3_HEADERS)).status_code == 200
        body = {"organization": "org", "environment": "test", "records": []}
        assert (
            await http.post("/edgemicro/axpublisher/organization/org/environment/test", json=body)
        ).status_code == 429
        with pytest.raises(httpx.ConnectError):
            await http.get("/v1/organizations/org/environments/test/datalocation", params=gcp_query())
    assert (
        fake.calls["analytics_url"] == 2 and fake.calls["signed_put"] == 2 and fake.calls["datalocation"] == 1
    )
    with pytest.raises(ValueError, match="unknown endpoint"):
        fake.fail_next("analytics", 500)


async def test_over_loopback():
    fake = FakeApigee(basic_auth=("key", "secret"))
    async with await fake.serve() as server, httpx.AsyncClient() as http:
        assert server.internal_api_url == server.base_url + "/edgemicro"
        assert server.analytics_url == server.base_url
        response = await http.get(
            f"{server.internal_api_url}/analytics/organization/org/environment/test",
            params=legacy_query(),
            headers={"Authorization": BASIC},
        )
        url = response.json()["url"]
        assert url.startswith(f"{server.base_url}/signed/")
        put = await http.put(url, content=ndjson_gz(RECORDS), headers={**S3_HEADERS, "Authorization": BASIC})
        assert put.status_code == 200
        datalocation = await http.get(
            f"{server.analytics_url}/v1/organizations/org/environments/test/datalocation",
            params=gcp_query(),
            headers={"Authorization": "Bearer t"},
        )
        assert (await http.put(datalocation.json()["url"], content=ndjson_gz([{"n": 1}]))).status_code == 200
    assert fake.analytics_records("org", "test") == [*RECORDS, {"n": 1}]
