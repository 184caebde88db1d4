"""GoogleTokens against FakeApigee's Google token endpoint on loopback (google-auth speaks `requests`)."""

from __future__ import annotations

import asyncio
import json
import logging

import google.auth
import google.auth.exceptions
import pytest

from authz.apigee.analytics import CREDENTIALS_PAUSE
from authz.apigee.google_token import GoogleTokens, service_account_credentials
from authz.errors import ApigeeUnavailable
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee
from tests.support.apigee_config import new_service_account
from tests.support.clock import FakeClock


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
async def oauth():
    """(fake, service account): the fake on loopback, the account registered and pointed at its /token."""
    fake = FakeApigee()
    async with await fake.serve() as server:
        account = new_service_account(f"{server.base_url}/token")
        fake.add_service_account(account.client_email, account.public_key_pem)
        yield fake, account


def tokens_for(account, clock, **kwargs) -> GoogleTokens:
    return GoogleTokens(clock, service_account_credentials(account.json()), timeout=2, **kwargs)


async def test_a_token_is_fetched_once_and_reused_until_near_expiry(oauth, clock):
    fake, account = oauth
    tokens = tokens_for(account, clock)
    assert await tokens.load()
    first = await tokens()
    assert first == fake.google_tokens_issued[0] and first.startswith("ya29.")
    clock.advance(3600 - 300 - 10)  # tokens live an hour; refreshed 5 minutes before the end
    assert [await tokens() for _ in range(5)] == [first] * 5
    assert fake.calls["oauth_token"] == 1
    clock.advance(20)
    second = await tokens()
    assert second != first and second == fake.google_tokens_issued[1]
    assert fake.calls["oauth_token"] == 2
    tokens.close()


async def test_every_refresh_is_timed_by_outcome(oauth, clock):
    fake, account = oauth
    metrics = new_metrics()
    tokens = tokens_for(account, clock, metrics=metrics, org="org")
    await tokens()
    fake.drop_next("oauth_token")
    clock.advance(3600)
    with pytest.raises(ApigeeUnavailable):
        await tokens()

    def refreshes(code: str) -> float | None:
        labels = {"org": "org", "env": "", "api": "token", "code": code, "method": "POST"}
        return metrics.registry.get_sample_value("apigee_requests_seconds_count", labels)

    assert (refreshes("200"), refreshes("error")) == (1, 1)
    tokens.close()


async def test_a_short_lived_token_is_refreshed_at_half_its_life(oauth, clock):
    fake, account = oauth
    fake.google_token_ttl = 60
    tokens = tokens_for(account, clock)
    first = await tokens()
    clock.advance(25)
    assert await tokens() == first
    clock.advance(10)
    assert await tokens() != first
    assert fake.calls["oauth_token"] == 2


async def test_concurrent_callers_share_one_refresh(oauth, clock):
    fake, account = oauth
    fake.set_delay("oauth_token", 0.2)
    tokens = tokens_for(account, clock)
    got = await asyncio.gather(*(tokens() for _ in range(20)))
    assert set(got) == {fake.google_tokens_issued[0]}
    assert fake.calls["oauth_token"] == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_refresh(oauth, clock):
    fake, account = oauth
    fake.set_delay("oauth_token", 0.2)
    tokens = tokens_for(account, clock)
    first = asyncio.create_task(tokens())
    second = asyncio.create_task(tokens())
    await asyncio.sleep(0.05)
    first.cancel()
    assert await second == fake.google_tokens_issued[0]
    assert first.cancelled()
    assert await tokens() == fake.google_tokens_issued[0]
    assert fake.calls["oauth_token"] == 1


async def test_refused_credentials_pause_uploads(oauth, clock):
    fake, account = oauth
    body = json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}).encode()
    fake.fail_next("oauth_token", 400, body=body, headers={"Content-Type": "application/json"})
    tokens = tokens_for(account, clock)
    with pytest.raises(ApigeeUnavailable, match="invalid_grant: Invalid JWT Signature") as info:
        await tokens()
    assert info.value.retry_after == CREDENTIALS_PAUSE
    assert await tokens() == fake.google_tokens_issued[0]  # the next call tries again


async def test_a_key_the_endpoint_does_not_know_is_refused(oauth, clock):
    fake, _ = oauth
    stranger = new_service_account(oauth[1].info["token_uri"], "someone@else.iam.gserviceaccount.com")
    with pytest.raises(ApigeeUnavailable, match="account not found") as info:
        await tokens_for(stranger, clock)()
    assert info.value.retry_after == CREDENTIALS_PAUSE
    assert fake.google_tokens_issued == []


async def test_an_unreachable_token_endpoint_is_transient(oauth, clock):
    fake, account = oauth
    fake.drop_next("oauth_token")
    with pytest.raises(ApigeeUnavailable, match="TransportError") as info:
        await tokens_for(account, clock)()
    assert info.value.retry_after is None


async def test_a_token_endpoint_answer_without_a_token_is_transient_or_refused(oauth, clock):
    fake, account = oauth
    fake.malformed_next("oauth_token", b'{"token_type": "Bearer"}')
    with pytest.raises(ApigeeUnavailable, match="Google token refresh"):
        await tokens_for(account, clock)()


async def test_neither_token_nor_key_is_logged(oauth, clock, caplog):
    fake, account = oauth
    caplog.set_level(logging.DEBUG)
    fake.fail_next("oauth_token", 400, body=b'{"error": "invalid_grant"}')
    tokens = tokens_for(account, clock)
    with pytest.raises(ApigeeUnavailable) as info:
        await tokens()
    token = await tokens()
    secret = account.info["private_key"].splitlines()[1]
    assert token not in caplog.text and secret not in caplog.text
    assert secret not in str(info.value) and "assertion" not in str(info.value)


# -- credentials -------------------------------------------------------------------------------------


async def test_application_default_credentials_from_the_environment(oauth, clock, tmp_path, monkeypatch):
    """GOOGLE_APPLICATION_CREDENTIALS is the first place ADC looks (on GKE, the metadata server answers)."""
    fake, account = oauth
    path = tmp_path / "adc.json"
    path.write_text(account.json())
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    tokens = GoogleTokens(clock, timeout=2)
    assert tokens.source == "none"
    assert await tokens() == fake.google_tokens_issued[0]  # the first call looks for ADC itself
    assert await tokens.load()
    assert "application default credentials" in tokens.source


async def test_no_credentials_at_all(clock, monkeypatch):
    def nothing(*args, **kwargs):
        raise google.auth.exceptions.DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", nothing)
    tokens = GoogleTokens(clock)
    assert not await tokens.load()
    with pytest.raises(ApigeeUnavailable, match="no Google credentials") as info:
        await tokens()
    assert info.value.retry_after == CREDENTIALS_PAUSE


async def test_unusable_default_credentials_are_logged_and_count_as_none(
    clock, tmp_path, monkeypatch, caplog
):
    path = tmp_path / "adc.json"
    path.write_text('{"type": "service_account"}')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    assert not await GoogleTokens(clock).load()
    assert "Application Default Credentials unusable" in caplog.text
    caplog.clear()
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    assert not await GoogleTokens(clock).load()
    assert "absent.json was not found" in caplog.text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"type": "service_account", "client_email": "a@b"}', "not usable Google credentials"),
        ('{"type": "service_account", "client_email": "a@b", "token_uri": "https://t", "private_key": "x"}',
         "not usable Google credentials"),
        ('{"type": "authorized_user", "refresh_token": "r"}', '"type" is "authorized_user", not "service_account"'),
        ('{"client_email": "a@b"}', '"type" is null'),
    ],
)  # fmt: skip
def test_unusable_service_account_json(text, problem):
    with pytest.raises(ValueError, match=problem) as info:
        service_account_credentials(text)
    assert '"x"' not in str(info.value)
