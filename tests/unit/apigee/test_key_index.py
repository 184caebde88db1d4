"""KeyIndex: the management API's apps and developers as local key decisions (reference §3.2's rules)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from authz.apigee.key_index import Developer, apps_of, build, developers_from, digest, for_caller, next_page
from authz.decision.authorize import key_digest

DEVELOPERS = developers_from(
    [
        {
            "developer": [
                {"email": "Dev@Example.com", "developerId": "d-1", "status": "active"},
                {"email": "gone@example.com", "developerId": "d-2", "status": "inactive"},
            ]
        }
    ]
)


def cred(key: str, status: str = "approved", expires: Any = "-1", **products: str) -> dict[str, Any]:
    return {
        "consumerKey": key,
        "consumerSecret": "s",
        "status": status,
        "expiresAt": expires,
        "issuedAt": "1700000000000",
        "apiProducts": [
            {"apiproduct": name, "status": s} for name, s in (products or {"orders": "approved"}).items()
        ],
    }


def app(
    *credentials: dict[str, Any], name: str = "orders-app", status: str = "approved", dev: str = "d-1"
) -> dict:
    return {
        "appId": f"id-{name}",
        "name": name,
        "developerId": dev,
        "status": status,
        "credentials": list(credentials),
    }


def test_an_approved_key_of_an_approved_app_of_an_active_developer_grants_its_approved_products():
    index = build([app(cred("k1", orders="approved", pending="pending", old="revoked"))], DEVELOPERS)
    found = index.get(digest("k1"))
    assert found is not None
    assert (found.app_name, found.developer_email, found.products) == (
        "orders-app",
        "Dev@Example.com",
        ("orders",),
    )
    assert found.active and found.expires_at is None
    assert found.client_id == "" and found.key_sha256 == ""  # the index holds no key, nor its digest
    assert index.get(digest("other")) is None and len(index) == 1


@pytest.mark.parametrize(
    ("listing", "active"),
    [
        (app(cred("k1", status="revoked")), False),
        (app(cred("k1"), status="revoked"), False),
        (app(cred("k1"), dev="d-2"), False),  # the developer is inactive
        (app(cred("k1")), True),
    ],
)
def test_revoked_credential_revoked_app_or_inactive_developer_make_an_inactive_key(listing, active):
    found = build([listing], DEVELOPERS).get(digest("k1"))
    assert found is not None and found.active is active


@pytest.mark.parametrize(
    ("expires", "seconds"), [("-1", None), ("1800000000000", 1_800_000_000.0), (1e3, None)]
)
def test_expiry_from_epoch_milliseconds(expires, seconds):
    index = build([app(cred("k1", expires=expires))], DEVELOPERS)
    if isinstance(expires, float):  # not an integer: left out, so /verifyApiKey decides
        assert index.get(digest("k1")) is None and index.skipped == 1
    else:
        found = index.get(digest("k1"))
        assert found is not None and found.expires_at == seconds


def test_developer_found_by_email_when_the_id_is_not_listed():
    listing = {"appId": "a", "name": "n", "developerEmail": "dev@example.com", "status": "approved",
               "credentials": [cred("k1")]}  # fmt: skip
    found = build([listing], DEVELOPERS).get(digest("k1"))
    assert found is not None and found.active and found.developer_email == "Dev@Example.com"


def test_an_app_group_app_has_no_developer_and_is_indexed():
    listing = {"appId": "a", "name": "team-app", "status": "approved", "credentials": [cred("k1")]}
    found = build([listing], DEVELOPERS).get(digest("k1"))
    assert found is not None and found.active and found.developer_email == ""


def test_an_app_whose_developer_is_not_listed_is_left_out(caplog):
    caplog.set_level(logging.WARNING)
    index = build([app(cred("k1"), cred("k2"), dev="d-new")], DEVELOPERS)
    assert len(index) == 0 and index.skipped == 2
    assert "not in the developer listing" in caplog.text and "k1" not in caplog.text


@pytest.mark.parametrize(
    "bad",
    [
        "not an object",
        {"status": "approved"},  # no consumerKey
        {"consumerKey": "", "status": "approved"},
        {"consumerKey": 12, "status": "approved"},
        {"consumerKey": "k9", "status": "approved", "expiresAt": "soon"},
        {"consumerKey": "k9", "status": "approved", "expiresAt": True},
        {"consumerKey": "k9", "status": "approved", "apiProducts": "orders"},
        {"consumerKey": "x" * 3000, "status": "approved"},
    ],
)
def test_a_malformed_credential_is_left_out_and_the_others_kept(bad):
    index = build([app(cred("k1"), bad)], DEVELOPERS)
    assert index.skipped == 1 and index.get(digest("k1")) is not None and len(index) == 1


@pytest.mark.parametrize(
    "bad", ["x", {"name": "n", "credentials": []}, {"appId": "a", "name": "n", "credentials": 3}]
)
def test_a_malformed_app_is_left_out(bad):
    index = build([bad, app(cred("k1"))], DEVELOPERS)
    assert index.skipped == 1 and len(index) == 1


def test_a_key_listed_twice_is_left_out():
    index = build([app(cred("dup"), cred("k1")), app(cred("dup"), name="other-app")], DEVELOPERS)
    assert index.get(digest("dup")) is None and index.get(digest("k1")) is not None


def test_equal_credentials_are_one_shared_object():
    index = build([app(cred("k1"), cred("k2"), cred("k3", status="revoked"))], DEVELOPERS)
    assert index.get(digest("k1")) is index.get(digest("k2"))
    assert index.get(digest("k3")) is not index.get(digest("k1"))


def test_add_app_adds_and_updates_one_apps_credentials():
    index = build([app(cred("k1"))], DEVELOPERS)
    index.add_app(app(cred("k1", status="revoked"), cred("k2")), DEVELOPERS)
    k1, k2 = index.get(digest("k1")), index.get(digest("k2"))
    assert k1 is not None and not k1.active and k2 is not None and k2.active


def test_for_caller_describes_the_key_as_verify_api_key_does():
    found = build([app(cred("k1"))], DEVELOPERS).get(digest("k1"))
    assert found is not None
    caller = for_caller(found, "k1", digest("k1"))
    assert caller.client_id == "k1" and caller.key_sha256 == key_digest("k1")
    assert (caller.app_name, caller.products, caller.active) == (found.app_name, found.products, found.active)


def test_pages_and_their_shapes():
    assert apps_of({"app": [1, 2]}) == [1, 2] and apps_of({}) == []
    assert next_page({"nextPageToken": "t"}) == "t" and next_page({"nextPageToken": ""}) is None
    assert next_page({}) is None
    with pytest.raises(ValueError, match="not a list"):
        apps_of({"app": {}})
    with pytest.raises(ValueError, match="not a list"):
        developers_from([{"developer": "x"}])
    assert developers_from([{"developer": [{"status": "active"}, "x"]}]) == {}
    assert developers_from([{"developer": [{"email": "A@b", "status": "inactive"}]}]) == {
        "a@b": Developer("A@b", False)
    }
