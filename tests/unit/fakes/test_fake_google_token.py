"""FakeApigee's Google token endpoint (`POST /token`, JWT-bearer grant) and the tokens `datalocation` takes."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest

from tests.fakes.apigee import CLOUD_PLATFORM, GOOGLE_TOKEN_URI, JWT_BEARER, FakeApigee
from tests.support.apigee_config import new_service_account
from tests.support.clock import FakeClock

BASE = "http://googleapis.test"
DATALOCATION = "/v1/organizations/org/environments/test/datalocation"
ACCOUNT = new_service_account(f"{BASE}/token")


def assertion(account=ACCOUNT, **claims) -> str:
    now = int(time.time())
    payload = {
        "iss": account.client_email,
        "aud": GOOGLE_TOKEN_URI,
        "scope": CLOUD_PLATFORM,
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    key = account.info["private_key"]
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": account.info["private_key_id"]})


def query() -> dict[str, str]:
    return {
        "dataset": "api",
        "relative_file_path": f"1715941230.api.org.test.{uuid.uuid4()}.gz",
        "repo": "edge",
    }


@pytest.fixture
def fake():
    fake = FakeApigee()
    fake.add_service_account(ACCOUNT.client_email, ACCOUNT.public_key_pem)
    return fake


async def grant(http: httpx.AsyncClient, token: str, grant_type: str = JWT_BEARER) -> httpx.Response:
    return await http.post("/token", data={"grant_type": grant_type, "assertion": token})


async def test_a_service_account_gets_a_token_that_datalocation_takes(fake):
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE) as http:
        response = await grant(http, assertion())
        assert response.status_code == 200
        body = response.json()
        assert (body["expires_in"], body["token_type"]) == (3600, "Bearer")
        assert fake.google_tokens_issued == [body["access_token"]]
        ok = await http.get(
            DATALOCATION, params=query(), headers={"Authorization": f"Bearer {body['access_token']}"}
        )
        assert ok.status_code == 200
        other = await http.get(DATALOCATION, params=query(), headers={"Authorization": "Bearer anything"})
        assert (other.status_code, other.json()["error"]["status"]) == (401, "UNAUTHENTICATED")
        # the aud may also be the token_uri itself
        assert (await grant(http, assertion(aud=f"{BASE}/token"))).status_code == 200


@pytest.mark.parametrize(
    ("make", "error", "description"),
    [
        (lambda: assertion(), "unsupported_grant_type", "Invalid grant_type"),
        (lambda: "not-a-jwt", "invalid_grant", "malformed"),
        (lambda: assertion(iss="stranger@x.iam.gserviceaccount.com"), "invalid_grant", "account not found"),
        (lambda: assertion(new_service_account(f"{BASE}/token")), "invalid_grant", "Invalid JWT Signature"),
        (lambda: assertion(aud="https://apigee.googleapis.com/"), "invalid_grant", "audience"),
        (
            lambda: assertion(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
            "invalid_grant",
            "short-lived",
        ),
        (lambda: assertion(exp=int(time.time()) + 7200), "invalid_grant", "short-lived"),
        (
            lambda: assertion(scope="https://www.googleapis.com/auth/devstorage.read_only"),
            "invalid_scope",
            "scope",
        ),
        (lambda: assertion(scope=None), "invalid_scope", "scope"),
    ],
)
async def test_bad_grants_are_google_400s(fake, make, error, description):
    grant_type = "client_credentials" if error == "unsupported_grant_type" else JWT_BEARER
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE) as http:
        response = await grant(http, make(), grant_type)
    assert response.status_code == 400
    assert response.json()["error"] == error and description in response.json()["error_description"]
    assert fake.google_tokens_issued == []


async def test_issued_tokens_expire_and_google_token_still_works():
    clock = FakeClock(time.time())
    fake = FakeApigee(google_token="ya29.fixed", google_token_ttl=60, clock=clock.now)
    fake.add_service_account(ACCOUNT.client_email, ACCOUNT.public_key_pem)
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE) as http:
        token = (await grant(http, assertion())).json()["access_token"]
        for bearer, status in ((token, 200), ("ya29.fixed", 200)):
            response = await http.get(
                DATALOCATION, params=query(), headers={"Authorization": f"Bearer {bearer}"}
            )
            assert response.status_code == status
        clock.advance(61)
        expired = await http.get(DATALOCATION, params=query(), headers={"Authorization": f"Bearer {token}"})
        assert expired.status_code == 401
        fixed = await http.get(DATALOCATION, params=query(), headers={"Authorization": "Bearer ya29.fixed"})
        assert fixed.status_code == 200
