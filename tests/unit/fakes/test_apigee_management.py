"""FakeApigee's management API (apps, developers, credentials) and /verifyApiKey answer from one state."""

from __future__ import annotations

import base64

import httpx
import jwt
import pytest

from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

BASE = "http://apigee.test"
TOKEN = {"Authorization": "Bearer t"}
APPS = "/v1/organizations/org/apps"
DEVELOPERS = "/v1/organizations/org/developers"
VERIFY = "/remote-service/verifyApiKey"
NOW_MS = 1_800_000_000_000  # FakeClock's start


def new_fake(clock: FakeClock | None = None) -> FakeApigee:
    return FakeApigee(google_token="t", clock=(clock or FakeClock()).now)


def client(fake: FakeApigee) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.transport(), base_url=BASE, headers=TOKEN)


def claims_of(fake: FakeApigee, response: httpx.Response) -> dict:
    token = response.json()["token"]
    key = jwt.PyJWKSet.from_dict(fake.jwks)[jwt.get_unverified_header(token)["kid"]]
    skip_times = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}  # FakeClock is in 2027
    return jwt.decode(token, key, algorithms=["RS256"], audience="remote-service-client", options=skip_times)


async def every_app(http: httpx.AsyncClient, page_size: int) -> tuple[list[str], int]:
    """Follow nextPageToken to the end; return the appIds in order and the number of pages."""
    ids: list[str] = []
    params = {"expand": "true", "includeCred": "true", "pageSize": str(page_size)}
    pages = 0
    while True:
        response = await http.get(APPS, params=params)
        assert response.status_code == 200
        body = response.json()
        pages += 1
        ids += [app["appId"] for app in body["app"]]
        if not body.get("nextPageToken"):
            return ids, pages
        params["pageToken"] = body["nextPageToken"]


# -- listing shapes ---------------------------------------------------------------------------------


async def test_apps_listing_shapes():
    clock = FakeClock()
    fake = new_fake(clock)
    app_id = fake.add_app("orders-app", "Dev@Example.com")
    clock.advance(1)
    fake.add_credential(
        app_id, "key-1", {"orders": "approved", "legacy": "pending"}, expires_at_ms=NOW_MS + 9
    )
    secret = fake.directory.credential("key-1").consumer_secret
    app = {
        "appId": app_id,
        "name": "orders-app",
        "developerId": fake.directory.developers["dev@example.com"].developer_id,
        "developerEmail": "dev@example.com",
        "status": "approved",
        "createdAt": str(NOW_MS),
        "lastModifiedAt": str(NOW_MS + 1000),
        "attributes": [],
    }
    credential = {
        "consumerKey": "key-1",
        "consumerSecret": secret,
        "status": "approved",
        "expiresAt": str(NOW_MS + 9),
        "issuedAt": str(NOW_MS + 1000),
        "apiProducts": [
            {"apiproduct": "orders", "status": "approved"},
            {"apiproduct": "legacy", "status": "pending"},
        ],
        "scopes": [],
        "attributes": [],
    }
    async with client(fake) as http:
        full = await http.get(APPS, params={"expand": "true", "includeCred": "true"})
        bare = await http.get(APPS, params={"expand": "true"})
        ids = await http.get(APPS, params={"includeCred": "true"})
        one = await http.get(f"{APPS}/{app_id}")
    assert full.json() == {"app": [{**app, "credentials": [credential]}]}  # one page: no nextPageToken
    assert bare.json() == {"app": [app]}
    assert ids.json() == {"app": [{"appId": app_id}]}
    assert one.json() == {**app, "credentials": [credential]}
    assert secret and len(secret) >= 32


async def test_apps_pagination_returns_every_app_once_in_appid_order():
    fake = new_fake()
    created = {fake.add_app(f"app-{i}", f"dev{i % 3}@example.com") for i in range(7)}
    async with client(fake) as http:
        for size in (1, 3, 7, 1000):
            ids, pages = await every_app(http, size)
            assert ids == sorted(created)
            assert pages == -(-7 // size)
        exact = await http.get(APPS, params={"pageSize": "7"})
        assert "nextPageToken" not in exact.json()
        default = await http.get(APPS)
        assert len(default.json()["app"]) == 7


async def test_apps_page_size_is_clamped_to_the_maximum():
    fake = new_fake()
    for i in range(1001):
        fake.add_app(f"app-{i:04}", "dev@example.com")
    async with client(fake) as http:
        big = (await http.get(APPS, params={"pageSize": "5000"})).json()
        assert len(big["app"]) == 1000 and big["nextPageToken"]
        assert len((await http.get(APPS, params={"pageSize": "0"})).json()["app"]) == 1000
        rest = await http.get(APPS, params={"pageToken": big["nextPageToken"]})
        assert len(rest.json()["app"]) == 1 and "nextPageToken" not in rest.json()
        fake.apps_page_max = 100  # what Apigee X's reference documents for pageSize
        assert len((await http.get(APPS, params={"pageSize": "1000"})).json()["app"]) == 100


@pytest.mark.parametrize(
    "params",
    [
        {"pageToken": "!!!"},
        {"pageToken": "abc"},
        {"pageToken": base64.urlsafe_b64encode(b"not-an-app-id").decode()},
        {"pageToken": base64.urlsafe_b64encode(b"00000000-0000-0000-0000-000000000000").decode()},
        {"pageSize": "ten"},
        {"pageSize": "-1"},
    ],
)
async def test_apps_bad_page_arguments_are_invalid_argument(params):
    fake = new_fake()
    fake.add_app("a", "d@example.com")
    async with client(fake) as http:
        response = await http.get(APPS, params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT") and error["message"]


async def test_developers_listing_pages_with_an_inclusive_start_key():
    clock = FakeClock()
    fake = new_fake(clock)
    emails = [f"dev{i}@example.com" for i in range(5)]
    for email in reversed(emails):
        fake.add_developer(email)
    fake.add_app("zeta", "dev1@example.com")
    fake.add_app("alpha", "dev1@example.com")
    clock.advance(2)
    fake.set_developer_status("DEV4@example.com", "inactive")
    async with client(fake) as http:
        first = (await http.get(DEVELOPERS, params={"expand": "true", "count": "2"})).json()["developer"]
        seen = [d["email"] for d in first]
        while True:  # Apigee's documented loop: startKey = the last email, skip the repeat
            params = {"expand": "true", "count": "2", "startKey": seen[-1]}
            page = (await http.get(DEVELOPERS, params=params)).json()["developer"]
            assert page[0]["email"] == seen[-1]
            seen += [d["email"] for d in page[1:]]
            if len(page) < 2:
                break
        bare = await http.get(DEVELOPERS, params={"startKey": "dev3@example.com"})
        clamped = await http.get(DEVELOPERS, params={"count": "100000"})
        bad = await http.get(DEVELOPERS, params={"count": "x"})
    assert seen == emails
    dev1 = first[1]
    assert dev1 == {
        "email": "dev1@example.com",
        "developerId": fake.directory.developers["dev1@example.com"].developer_id,
        "status": "active",
        "firstName": "dev1",
        "lastName": "Developer",
        "userName": "dev1",
        "createdAt": str(NOW_MS),
        "lastModifiedAt": str(NOW_MS),
        "apps": ["alpha", "zeta"],
        "attributes": [],
    }
    assert bare.json() == {"developer": [{"email": "dev3@example.com"}, {"email": "dev4@example.com"}]}
    assert len(clamped.json()["developer"]) == 5
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"
    inactive = fake.directory.developers["dev4@example.com"]
    assert (inactive.status, inactive.last_modified_at) == ("inactive", NOW_MS + 2000)


# -- auth, org, faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [APPS, f"{APPS}/some-id", DEVELOPERS])
async def test_management_needs_a_google_token_and_the_fakes_org(path):
    fake = new_fake()
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dDp0"}):
            denied = await http.get(path, headers=headers)
            assert denied.status_code == 401
            assert denied.json()["error"]["status"] == "UNAUTHENTICATED"
        other_org = await http.get(path.replace("/org/", "/other/"), headers=TOKEN)
        assert other_org.status_code == 404
        assert other_org.json()["error"]["code"] == 404
        assert other_org.json()["error"]["status"] == "NOT_FOUND"
        assert (await http.post(path, headers=TOKEN)).status_code == 405


async def test_unknown_app_is_not_found():
    fake = new_fake()
    async with client(fake) as http:
        response = await http.get(f"{APPS}/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404
    assert response.json()["error"]["status"] == "NOT_FOUND"


async def test_fault_knobs_apply_to_the_management_endpoints():
    fake = new_fake()
    app_id = fake.add_app("a", "d@example.com")
    fake.fail_next("apps", 503, count=2)
    fake.drop_next("app")
    fake.malformed_next("developers", b"{not json")
    async with client(fake) as http:
        assert (await http.get(APPS)).status_code == 503
        fake.clear_faults("apps")
        assert (await http.get(APPS)).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{APPS}/{app_id}")
        assert (await http.get(f"{APPS}/{app_id}")).json()["appId"] == app_id
        assert (await http.get(DEVELOPERS)).content == b"{not json"
        assert (await http.get(DEVELOPERS)).status_code == 200
        fake.set_delay("apps", 0.01)
        assert (await http.get(APPS)).status_code == 200
    assert (fake.calls["apps"], fake.calls["app"], fake.calls["developers"]) == (3, 2, 2)


# -- /verifyApiKey follows the management state -----------------------------------------------------


def expire(fake: FakeApigee, clock: FakeClock) -> None:
    fake.set_credential_expiry("key-1", int(clock.now() * 1000) + 500)
    clock.advance(0.5)


@pytest.mark.parametrize(
    ("change", "bumps_app"),
    [
        (lambda fake, app_id, clock: fake.set_credential_status("key-1", "revoked"), True),
        (lambda fake, app_id, clock: fake.revoke_key("key-1"), True),
        (lambda fake, app_id, clock: expire(fake, clock), True),
        (lambda fake, app_id, clock: fake.set_app_status(app_id, "revoked"), True),
        (lambda fake, app_id, clock: fake.set_developer_status("dev@example.com", "inactive"), False),
        (lambda fake, app_id, clock: fake.delete_credential("key-1"), True),
    ],
    ids=["credential_revoked", "revoke_key", "expired", "app_revoked", "developer_inactive", "deleted"],
)
async def test_verify_api_key_follows_every_state(change, bumps_app):
    clock = FakeClock()
    fake = new_fake(clock)
    app_id = fake.add_app("orders-app", "dev@example.com")
    fake.add_credential(app_id, "key-1", ["orders"], expires_at_ms=NOW_MS + 1000)
    async with client(fake) as http:
        assert (await http.post(VERIFY, json={"apiKey": "key-1"})).status_code == 200
        before = (await http.get(f"{APPS}/{app_id}")).json()["lastModifiedAt"]
        change(fake, app_id, clock)  # the clock may stand still: lastModifiedAt still moves
        denied = await http.post(VERIFY, json={"apiKey": "key-1"})
        after = (await http.get(f"{APPS}/{app_id}")).json()["lastModifiedAt"]
        token = await http.post(
            "/remote-token/token",
            json={"client_id": "key-1", "client_secret": "s", "grant_type": "client_credentials"},
        )
    assert denied.status_code == 401
    assert denied.json()["fault"]["detail"]["errorcode"] == "oauth.v2.InvalidApiKey"
    assert token.status_code == 401
    assert (int(after) > int(before)) == bumps_app


async def test_verify_api_key_claims_come_from_the_listing():
    fake = new_fake()
    app_id = fake.add_app("orders-app", "dev@example.com")
    fake.add_credential(app_id, "key-1", {"orders": "approved", "legacy": "approved", "beta": "pending"})
    fake.add_credential(app_id, "key-2", ["orders"], client_id="cid-2")
    async with client(fake) as http:
        listed = (await http.get(APPS, params={"expand": "true", "includeCred": "true"})).json()["app"][0]
        first = claims_of(fake, await http.post(VERIFY, json={"apiKey": "key-1"}))
        fake.set_credential_product_status("key-1", "legacy", "revoked")
        narrower = claims_of(fake, await http.post(VERIFY, json={"apiKey": "key-1"}))
        fake.set_credential_product_status("key-1", "orders", "revoked")
        empty = claims_of(fake, await http.post(VERIFY, json={"apiKey": "key-1"}))
        second = claims_of(fake, await http.post(VERIFY, json={"apiKey": "key-2"}))
    credential = next(c for c in listed["credentials"] if c["consumerKey"] == "key-1")
    approved = [p["apiproduct"] for p in credential["apiProducts"] if p["status"] == "approved"]
    assert first["api_product_list"] == approved == ["orders", "legacy"]
    assert (first["application_id"], first["application_name"]) == (listed["appId"], listed["name"])
    assert first["developer_email"] == listed["developerEmail"]
    assert first["client_id"] == "key-1"
    assert narrower["api_product_list"] == ["orders"]
    assert empty["api_product_list"] == []
    assert (second["client_id"], second["application_id"]) == ("cid-2", listed["appId"])


async def test_expiry_is_checked_against_the_fake_clock():
    clock = FakeClock()
    fake = new_fake(clock)
    app_id = fake.add_app("a", "d@example.com")
    fake.add_credential(app_id, "key-1", ["p"], expires_at_ms=NOW_MS + 1000)
    async with client(fake) as http:
        assert (await http.post(VERIFY, json={"apiKey": "key-1"})).status_code == 200
        clock.advance(1)  # now == expiresAt: expired
        assert (await http.post(VERIFY, json={"apiKey": "key-1"})).status_code == 401
        fake.set_credential_expiry("key-1", -1)
        assert (await http.post(VERIFY, json={"apiKey": "key-1"})).status_code == 200
        listed = (await http.get(f"{APPS}/{app_id}")).json()
    assert listed["credentials"][0]["expiresAt"] == "-1"


# -- add_key / revoke_key ---------------------------------------------------------------------------


async def test_add_key_and_revoke_key_write_the_directory():
    fake = new_fake()
    fake.add_key("key-1", app="orders-app", developer_email="dev@example.com", products=["orders"])
    fake.add_key("key-2", app="orders-app", developer_email="dev@example.com", products=["a", "b"])
    fake.add_key("key-3", app="other", developer_email="dev@example.com", products=[], client_id="c3")
    fake.add_key("key-1", app="moved", developer_email="x@example.com", products=["p"], status="pending")
    fake.revoke_key("key-2")
    async with client(fake) as http:
        apps = (await http.get(APPS, params={"expand": "true", "includeCred": "true"})).json()["app"]
        developers = (await http.get(DEVELOPERS, params={"expand": "true"})).json()["developer"]
        answers = [(await http.post(VERIFY, json={"apiKey": k})).status_code for k in ("key-1", "key-2")]
        third = claims_of(fake, await http.post(VERIFY, json={"apiKey": "key-3"}))
    keys = {a["name"]: {c["consumerKey"]: c["status"] for c in a["credentials"]} for a in apps}
    assert keys == {
        "orders-app": {"key-2": "revoked"},
        "other": {"key-3": "approved"},
        "moved": {"key-1": "pending"},
    }
    assert [(d["email"], d["status"], d["apps"]) for d in developers] == [
        ("dev@example.com", "active", ["orders-app", "other"]),
        ("x@example.com", "active", ["moved"]),
    ]
    assert answers == [401, 401]
    assert (third["client_id"], third["application_name"], third["api_product_list"]) == ("c3", "other", [])
    with pytest.raises(KeyError):
        fake.revoke_key("missing")


def test_arranging_mistakes_raise():
    fake = new_fake()
    app_id = fake.add_app("a", "d@example.com")
    fake.add_credential(app_id, "k", ["p"])
    with pytest.raises(ValueError, match="already exists"):
        fake.add_developer("D@example.com")
    with pytest.raises(ValueError, match="already has"):
        fake.add_app("a", "d@example.com")
    with pytest.raises(ValueError, match="already exists"):
        fake.add_credential(app_id, "k", ["p"])
    with pytest.raises(ValueError, match="status"):
        fake.set_app_status(app_id, "active")
    with pytest.raises(ValueError, match="status"):
        fake.add_credential(app_id, "k2", {"p": "maybe"})
    with pytest.raises(ValueError, match="expires_at_ms"):
        fake.set_credential_expiry("k", -5)
    with pytest.raises(KeyError):
        fake.set_credential_product_status("k", "unknown-product", "revoked")
    with pytest.raises(KeyError):
        fake.add_credential("no-such-app", "k3", [])
    with pytest.raises(KeyError):
        fake.delete_credential("missing")


# -- over loopback ----------------------------------------------------------------------------------


async def test_listing_and_verify_agree_over_loopback():
    fake = new_fake()
    for i in range(5):
        fake.add_key(f"key-{i}", app=f"app-{i}", developer_email="dev@example.com", products=["orders"])
    fake.revoke_key("key-1")
    fake.set_credential_product_status("key-2", "orders", "revoked")
    fake.set_app_status(fake.directory.find_app("dev@example.com", "app-3").app_id, "revoked")
    async with await fake.serve() as server, httpx.AsyncClient(base_url=server.management_url) as http:
        listed = {}
        params = {"expand": "true", "includeCred": "true", "pageSize": "2"}
        while True:
            body = (await http.get(APPS, params=params, headers=TOKEN)).json()
            listed |= {c["consumerKey"]: (a, c) for a in body["app"] for c in a["credentials"]}
            if not body.get("nextPageToken"):
                break
            params["pageToken"] = body["nextPageToken"]
        verified = {}
        for key in listed:
            response = await http.post(f"{server.remote_service_url}/verifyApiKey", json={"apiKey": key})
            verified[key] = claims_of(fake, response) if response.status_code == 200 else None
    assert sorted(listed) == [f"key-{i}" for i in range(5)]
    for key, (app, credential) in listed.items():
        usable = app["status"] == "approved" and credential["status"] == "approved"
        assert (verified[key] is not None) == usable, key
        if usable:
            products = [p["apiproduct"] for p in credential["apiProducts"] if p["status"] == "approved"]
            assert verified[key]["api_product_list"] == products
            assert verified[key]["application_id"] == app["appId"]
    assert sorted(k for k, v in verified.items() if v is None) == ["key-1", "key-3"]


# -- Apigee Edge: rows/startKey paging, Basic auth ----------------------------------------------------


async def test_edge_apps_listing_pages_with_an_inclusive_start_key():
    fake = new_fake()
    created = sorted(fake.add_app(f"app-{i}", f"dev{i % 3}@example.com") for i in range(10))
    params = {"expand": "true", "includeCred": "true", "rows": "3"}
    async with client(fake) as http:
        first = (await http.get(APPS, params=params)).json()
        seen, sizes = [a["appId"] for a in first["app"]], [len(first["app"])]
        while sizes[-1] == 3:  # Edge's loop: startKey = the last appId, skip the repeat, stop on a short page
            body = (await http.get(APPS, params={**params, "startKey": seen[-1]})).json()
            assert body["app"][0]["appId"] == seen[-1] and "nextPageToken" not in body
            assert "credentials" in body["app"][0]
            seen += [a["appId"] for a in body["app"][1:]]
            sizes.append(len(body["app"]))
        between = created[4][:-1] + chr(ord(created[4][-1]) - 1)  # no such app: the next one above it
        unknown = (await http.get(APPS, params={"rows": "2", "startKey": between})).json()
        past_the_end = (await http.get(APPS, params={"startKey": "~"})).json()
        bare = (await http.get(APPS, params={"startKey": created[8]})).json()
    assert seen == created and sizes == [3, 3, 3, 3, 2]
    assert [a["appId"] for a in unknown["app"]] == created[4:6]
    assert past_the_end == {"app": []}
    assert bare == {"app": [{"appId": created[8]}, {"appId": created[9]}]}


async def test_edge_rows_are_clamped_to_apps_rows_max():
    fake = new_fake()
    created = sorted(fake.add_app(f"app-{i}", "dev@example.com") for i in range(5))
    async with client(fake) as http:
        assert len((await http.get(APPS, params={"rows": "5000"})).json()["app"]) == 5
        fake.apps_rows_max = 2
        clamped = (await http.get(APPS, params={"rows": "1000", "startKey": created[1]})).json()
        default = (await http.get(APPS, params={"rows": "0"})).json()
        one = (await http.get(APPS, params={"rows": "1"})).json()
        bad = await http.get(APPS, params={"rows": "-1"})
        google = (await http.get(APPS, params={"pageSize": "2", "startKey": created[3]})).json()
    assert [a["appId"] for a in clamped["app"]] == created[1:3] and "nextPageToken" not in clamped
    assert [a["appId"] for a in default["app"]] == created[:2]
    assert [a["appId"] for a in one["app"]] == created[:1]
    assert bad.status_code == 400 and bad.json()["code"] and bad.json()["message"]
    # pageSize wins: Apigee X's paging, startKey ignored, apps_page_max untouched by apps_rows_max
    assert [a["appId"] for a in google["app"]] == created[:2] and google["nextPageToken"]


@pytest.mark.parametrize("path", [APPS, f"{APPS}/some-id", DEVELOPERS])
async def test_management_basic_replaces_the_google_token(path):
    fake = FakeApigee(google_token="t", management_basic=("reader@example.com", "pw"))
    app_id = fake.add_app("a", "d@example.com")
    path = path.replace("some-id", app_id)
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE) as http:
        ok = await http.get(path, auth=("reader@example.com", "pw"))
        assert ok.status_code == 200
        denied = [
            await http.get(path, auth=("reader@example.com", "wrong")),
            await http.get(path, auth=("other@example.com", "pw")),
            await http.get(path, headers=TOKEN),
            await http.get(path, headers={"Authorization": "Basic !!!"}),
            await http.get(path),
        ]
        other_org = await http.get(path.replace("/org/", "/other/"), auth=("reader@example.com", "pw"))
    for response in denied:
        assert response.status_code == 401
        assert response.json()["code"] == "Unauthorized" and response.json()["contexts"] == []
    assert other_org.status_code == 404


async def test_without_management_basic_basic_auth_is_refused():
    fake = new_fake()
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE) as http:
        response = await http.get(APPS, auth=("reader@example.com", "pw"))
    assert response.status_code == 401 and response.json()["error"]["status"] == "UNAUTHENTICATED"
