"""The state behind FakeApigee's management API: developers, their apps and the apps' credentials.

One `Directory` is the single source of truth for API keys: the management listings render it and
`/verifyApiKey` and `/remote-token/token` answer from it (`verify`), so a test can ask both about one key.
The JSON shapes are Apigee X's (`organizations.apps`, `organizations.developers`; Apigee Edge's are the
same, only its apps listing pages by an inclusive appId `startKey`, `list_apps_from`): timestamps and
`expiresAt` are epoch-ms **strings**, `expiresAt` `"-1"` means never. Ids are UUIDs derived from the org
and names (uuid5), so a listing's order by `appId` is the same on every run; real Apigee uses random ones.
Mistakes in arranging state raise: `KeyError` for an unknown email/app/key, `ValueError` for a bad status
or a duplicate (Apigee's 409). Imports only the stdlib.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

NEVER = -1  # expiresAt of a credential that does not expire
PAGE_MAX = 1000  # default and largest pageSize and rows (apps) and count (developers)
DEVELOPER_STATUSES = frozenset({"active", "inactive"})
APP_STATUSES = frozenset({"approved", "revoked"})
# Apigee keys are approved or revoked; "pending" stays for the callers of add_key(status="pending").
CREDENTIAL_STATUSES = frozenset({"approved", "revoked", "pending"})
PRODUCT_STATUSES = frozenset({"approved", "revoked", "pending"})
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Developer:
    email: str
    developer_id: str
    status: str
    created_at: int
    last_modified_at: int


@dataclass
class Credential:
    consumer_key: str
    consumer_secret: str
    status: str
    expires_at: int
    issued_at: int
    products: dict[str, str]  # apiproduct -> status, in the order given
    client_id: str  # fake-only: what /verifyApiKey puts in `client_id` (the GCP proxy: the key itself)

    def approved_products(self) -> list[str]:
        return [name for name, status in self.products.items() if status == "approved"]


@dataclass
class App:
    app_id: str
    name: str
    developer_id: str
    developer_email: str
    status: str
    created_at: int
    last_modified_at: int
    credentials: list[Credential] = field(default_factory=list)
    attributes: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Verified:
    """A key `/verifyApiKey` accepts, with what its claims are made of."""

    credential: Credential
    app: App
    products: list[str]  # the credential's approved products


class Directory:
    """Developers, apps and credentials of one org. `clock` returns epoch seconds (the fake's clock)."""

    def __init__(self, org: str, clock: Callable[[], float]) -> None:
        self.org, self._clock = org, clock
        self.developers: dict[str, Developer] = {}  # email -> developer
        self.apps: dict[str, App] = {}  # appId -> app
        self._by_key: dict[str, App] = {}  # consumerKey -> the app holding it

    # -- arranging state -------------------------------------------------------------------------------

    def add_developer(self, email: str, status: str = "active") -> str:
        email = email.lower()
        _check_status(status, DEVELOPER_STATUSES)
        if email in self.developers:
            raise ValueError(f"developer {email!r} already exists")
        now = self._now_ms()
        developer_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.org}/developers/{email}"))
        self.developers[email] = Developer(email, developer_id, status, now, now)
        return developer_id

    def add_app(self, name: str, developer_email: str, status: str = "approved") -> str:
        _check_status(status, APP_STATUSES)
        email = developer_email.lower()
        if email not in self.developers:
            self.add_developer(email)
        if self.find_app(email, name) is not None:
            raise ValueError(f"developer {email!r} already has an app {name!r}")
        developer = self.developers[email]
        app_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.org}/developers/{email}/apps/{name}"))
        now = self._now_ms()
        self.apps[app_id] = App(app_id, name, developer.developer_id, email, status, now, now)
        return app_id

    def add_credential(
        self,
        app_id: str,
        consumer_key: str,
        products: Mapping[str, str] | list[str],
        status: str = "approved",
        expires_at_ms: int = NEVER,
        client_id: str | None = None,
    ) -> None:
        app = self.apps[app_id]
        if consumer_key in self._by_key:
            raise ValueError(f"consumer key {consumer_key!r} already exists")
        _check_status(status, CREDENTIAL_STATUSES)
        statuses = dict.fromkeys(products, "approved") if isinstance(products, list) else dict(products)
        for product_status in statuses.values():
            _check_status(product_status, PRODUCT_STATUSES)
        _check_expiry(expires_at_ms)
        credential = Credential(
            consumer_key,
            secrets.token_urlsafe(24),
            status,
            expires_at_ms,
            self._now_ms(),
            statuses,
            client_id or consumer_key,
        )
        app.credentials.append(credential)
        self._by_key[consumer_key] = app
        self._touch(app)

    def put_key(
        self,
        consumer_key: str,
        *,
        app: str,
        developer_email: str,
        products: list[str],
        client_id: str | None,
        status: str,
    ) -> None:
        """FakeApigee.add_key: find or create the developer and its app `app`, then add or replace the key."""
        email = developer_email.lower()
        found = self.find_app(email, app)
        app_id = found.app_id if found is not None else self.add_app(app, email)
        if consumer_key in self._by_key:
            self.delete_credential(consumer_key)
        self.add_credential(app_id, consumer_key, list(products), status=status, client_id=client_id)

    def set_developer_status(self, email: str, status: str) -> None:
        _check_status(status, DEVELOPER_STATUSES)
        developer = self.developers[email.lower()]
        developer.status = status
        developer.last_modified_at = max(self._now_ms(), developer.last_modified_at + 1)

    def set_app_status(self, app_id: str, status: str) -> None:
        _check_status(status, APP_STATUSES)
        app = self.apps[app_id]
        app.status = status
        self._touch(app)

    def set_credential_status(self, consumer_key: str, status: str) -> None:
        _check_status(status, CREDENTIAL_STATUSES)
        self.credential(consumer_key).status = status
        self._touch(self._by_key[consumer_key])

    def set_credential_product_status(self, consumer_key: str, product: str, status: str) -> None:
        _check_status(status, PRODUCT_STATUSES)
        credential = self.credential(consumer_key)
        if product not in credential.products:
            raise KeyError(product)
        credential.products[product] = status
        self._touch(self._by_key[consumer_key])

    def set_credential_expiry(self, consumer_key: str, expires_at_ms: int) -> None:
        _check_expiry(expires_at_ms)
        self.credential(consumer_key).expires_at = expires_at_ms
        self._touch(self._by_key[consumer_key])

    def delete_credential(self, consumer_key: str) -> None:
        app = self._by_key.pop(consumer_key)
        app.credentials = [c for c in app.credentials if c.consumer_key != consumer_key]
        self._touch(app)

    # -- reading ---------------------------------------------------------------------------------------

    def credential(self, consumer_key: str) -> Credential:
        app = self._by_key[consumer_key]
        return next(c for c in app.credentials if c.consumer_key == consumer_key)

    def find_app(self, developer_email: str, name: str) -> App | None:
        email = developer_email.lower()
        return next((a for a in self.apps.values() if a.developer_email == email and a.name == name), None)

    def verify(self, consumer_key: str) -> Verified | None:
        """The key if `/verifyApiKey` accepts it: it and its app approved, unexpired, developer active."""
        app = self._by_key.get(consumer_key)
        if app is None:
            return None
        credential = self.credential(consumer_key)
        expires = credential.expires_at
        if (
            credential.status != "approved"
            or (expires != NEVER and expires <= self._now_ms())
            or app.status != "approved"
            or self.developers[app.developer_email].status != "active"
        ):
            return None
        return Verified(credential, app, credential.approved_products())

    def list_apps(self, page_size: int, page_token: str) -> tuple[list[App], str]:
        """One page of apps ordered by appId, and the token of the next page ("" after the last).

        Raises:
            ValueError: `page_token` is not one this directory handed out.
        """
        ordered = sorted(self.apps)
        start = 0
        if page_token:
            last = _decode_page_token(page_token)
            if last not in self.apps:
                raise ValueError("Invalid pageToken: unknown app.")
            start = ordered.index(last) + 1
        page = ordered[start : start + page_size]
        more = start + page_size < len(ordered)
        token = base64.urlsafe_b64encode(page[-1].encode()).decode().rstrip("=") if more else ""
        return [self.apps[app_id] for app_id in page], token

    def list_apps_from(self, rows: int, start_key: str) -> list[App]:
        """Up to `rows` apps ordered by appId, from `start_key` on (inclusive, like Apigee Edge's listing);
        an unknown `start_key` starts at the first appId above it, like a scan of sorted keys."""
        ordered = sorted(app_id for app_id in self.apps if app_id >= start_key)
        return [self.apps[app_id] for app_id in ordered[:rows]]

    def list_developers(self, count: int, start_key: str) -> list[Developer]:
        """Up to `count` developers ordered by email, from `start_key` on (inclusive, like Apigee)."""
        emails = sorted(e for e in self.developers if e >= start_key.lower())
        return [self.developers[email] for email in emails[:count]]

    def app_names(self, developer: Developer) -> list[str]:
        return sorted(a.name for a in self.apps.values() if a.developer_id == developer.developer_id)

    # -- helpers ---------------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _touch(self, app: App) -> None:
        # Strictly increasing, so a change shows in lastModifiedAt even when the test's clock stands still.
        app.last_modified_at = max(self._now_ms(), app.last_modified_at + 1)


def parse_limit(raw: str | None, name: str, maximum: int = PAGE_MAX) -> int:
    """pageSize / count: absent or 0 -> `maximum`; above it is clamped (Apigee coerces, no error).

    Raises:
        ValueError: not a non-negative integer.
    """
    if raw is None or raw == "":
        return maximum
    if not raw.isdigit():
        raise ValueError(f"Invalid value for {name}: {raw!r}.")
    return min(int(raw), maximum) or maximum


def credential_json(credential: Credential) -> dict[str, Any]:
    return {
        "consumerKey": credential.consumer_key,
        "consumerSecret": credential.consumer_secret,
        "status": credential.status,
        "expiresAt": str(credential.expires_at),
        "issuedAt": str(credential.issued_at),
        "apiProducts": [{"apiproduct": n, "status": s} for n, s in credential.products.items()],
        "scopes": [],
        "attributes": [],
    }


def app_json(app: App, *, credentials: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "appId": app.app_id,
        "name": app.name,
        "developerId": app.developer_id,
        "developerEmail": app.developer_email,
        "status": app.status,
        "createdAt": str(app.created_at),
        "lastModifiedAt": str(app.last_modified_at),
        "attributes": [dict(a) for a in app.attributes],
    }
    if credentials:
        body["credentials"] = [credential_json(c) for c in app.credentials]
    return body


def developer_json(developer: Developer, app_names: list[str]) -> dict[str, Any]:
    local = developer.email.partition("@")[0]
    return {
        "email": developer.email,
        "developerId": developer.developer_id,
        "status": developer.status,
        "firstName": local,
        "lastName": "Developer",
        "userName": local,
        "createdAt": str(developer.created_at),
        "lastModifiedAt": str(developer.last_modified_at),
        "apps": app_names,
        "attributes": [],
    }


def _decode_page_token(token: str) -> str:
    try:
        decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("Invalid pageToken.") from None
    if not _UUID.fullmatch(decoded):
        raise ValueError("Invalid pageToken.")
    return decoded


def _check_status(status: str, allowed: frozenset[str]) -> None:
    if status not in allowed:
        raise ValueError(f"status {status!r} is not one of {sorted(allowed)}")


def _check_expiry(expires_at_ms: int) -> None:
    if expires_at_ms != NEVER and expires_at_ms < 0:
        raise ValueError(f"expires_at_ms must be -1 (never) or epoch ms, got {expires_at_ms}")
