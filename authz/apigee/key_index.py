"""KeyIndex: every API key of the org, from the management API's listing of apps, answered in memory.

Built from the pages of ``GET {management_api}/v1/organizations/{org}/apps?expand=true&includeCred=true``
and of ``.../developers?expand=true`` (Apigee X / hybrid shapes; legacy Edge has the same ones). Each
credential is held under the SHA-256 digest of its consumer key, never the key itself. It decides as
``/verifyApiKey`` does (reference §3.2): a key grants its credential's **approved** products when the
credential is approved and not expired, its app approved and the app's developer active. Here that becomes
a ``Credential`` whose ``active`` and ``expires_at`` ``decide`` reads, so a revoked or expired key is a 401
at once, with no call to Apigee.

What the index cannot vouch for it leaves out, so the caller falls back to ``/verifyApiKey``: a credential
without a usable consumer key, an app whose developer is not in the developer listing (created between the
two listings), an entry of the wrong shape (logged, counted in ``skipped``). Two credentials with the same
key (Apigee refuses that) keep neither.

Memory: one small slotted record per key plus its 32-byte digest; app names, e-mails and product tuples
are shared. Pure: no I/O, no clock. Must not import grpc, envoy or httpx.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from authz.decision.model import Credential

log = logging.getLogger(__name__)

NEVER: Final = "-1"  # expiresAt of a credential that does not expire
MAX_KEY_LENGTH: Final = 2048


def digest(api_key: str) -> bytes:
    """The index's key for an API key: SHA-256 of its UTF-8 bytes (32 bytes)."""
    return hashlib.sha256(api_key.encode()).digest()


@dataclass(frozen=True, slots=True)
class Developer:
    email: str
    active: bool


@dataclass
class KeyIndex:
    """Credentials by key digest.

    The credentials hold neither the key nor its digest (``key_sha256`` and ``client_id`` are empty; see
    ``for_caller``), so equal ones are one shared object.
    """

    entries: dict[bytes, Credential] = field(default_factory=dict)
    skipped: int = 0  # credentials or apps left out (the caller falls back to /verifyApiKey for them)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key_digest: bytes) -> Credential | None:
        return self.entries.get(key_digest)

    def add_app(self, app: Mapping[str, Any], developers: Mapping[str, Developer]) -> None:
        """Add or update one app's credentials (an incremental sync). A credential the app no longer has
        stays until the next full listing, which replaces the whole index."""
        _Builder(self, developers).add_app(app)


def developers_from(pages: Iterable[Mapping[str, Any]]) -> dict[str, Developer]:
    """Developers by developerId and by lowercase email, from pages of ``{"developer": [...]}``.

    Raises:
        ValueError: a page of the wrong shape.
    """
    found: dict[str, Developer] = {}
    for page in pages:
        items = page.get("developer", [])
        if not isinstance(items, list):
            raise ValueError("developers: 'developer' is not a list")
        for item in items:
            email = item.get("email") if isinstance(item, dict) else None
            if not isinstance(email, str) or not email:
                log.warning("key index: a developer without an email ignored")
                continue
            developer = Developer(email, item.get("status") == "active")
            found[email.lower()] = developer
            if isinstance(dev_id := item.get("developerId"), str) and dev_id:
                found[dev_id] = developer
    return found


def build(apps: Iterable[Mapping[str, Any]], developers: Mapping[str, Developer]) -> KeyIndex:
    """The index of every credential of the given apps (each a management API ``App`` with credentials)."""
    index = KeyIndex()
    builder = _Builder(index, developers)
    for app in apps:
        builder.add_app(app)
    builder.drop_duplicates()
    return index


def apps_of(page: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The apps of one listing page ``{"app": [...], "nextPageToken": ...}``.

    Raises:
        ValueError: a page of the wrong shape.
    """
    items = page.get("app", [])
    if not isinstance(items, list):
        raise ValueError("apps: 'app' is not a list")
    return items


def next_page(page: Mapping[str, Any]) -> str | None:
    token = page.get("nextPageToken")
    return token if isinstance(token, str) and token else None


class _Builder:
    """Adds apps to an index, sharing equal strings and product tuples between credentials."""

    def __init__(self, index: KeyIndex, developers: Mapping[str, Developer]) -> None:
        self._index = index
        self._developers = developers
        self._products: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._shared: dict[Credential, Credential] = {}
        self._seen_twice: set[bytes] = set()

    def add_app(self, app: Mapping[str, Any]) -> None:
        if not isinstance(app, Mapping):
            self._skip("an app that is not an object")
            return
        app_id, name = _text(app, "appId"), _text(app, "name")
        credentials = app.get("credentials", [])
        if not app_id or not name or not isinstance(credentials, list):
            self._skip(f"app {app_id or '?'}: no appId, name or credentials list")
            return
        developer = self._developer(app)
        if developer is None:
            self._skip(f"app {app_id}: its developer is not in the developer listing", len(credentials))
            return
        app_ok = app.get("status") == "approved" and developer.active
        for cred in credentials:
            self._credential(cred, name, developer.email, app_ok, app_id)

    def drop_duplicates(self) -> None:
        for key in self._seen_twice:
            del self._index.entries[key]
            self._index.skipped += 2
        if self._seen_twice:
            log.warning(
                "key index: %d consumer keys listed by two credentials: left out", len(self._seen_twice)
            )

    def _developer(self, app: Mapping[str, Any]) -> Developer | None:
        dev_id, email = _text(app, "developerId"), _text(app, "developerEmail")
        if not dev_id and not email:  # an app group's or company's app: no developer to be active
            return Developer("", True)
        return self._developers.get(dev_id) or self._developers.get(email.lower())

    def _credential(self, cred: Any, app_name: str, email: str, app_ok: bool, app_id: str) -> None:
        if not isinstance(cred, Mapping):
            self._skip(f"app {app_id}: a credential that is not an object")
            return
        key = cred.get("consumerKey")
        products = cred.get("apiProducts", [])
        try:
            expires = _expiry(cred.get("expiresAt", NEVER))
        except ValueError:
            key = None
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            self._skip(f"app {app_id}: a credential without a usable consumerKey or expiresAt")
            return
        if not isinstance(products, list):
            self._skip(f"app {app_id}: a credential whose apiProducts is not a list")
            return
        approved = tuple(
            p["apiproduct"]
            for p in products
            if isinstance(p, Mapping)
            and p.get("status") == "approved"
            and isinstance(p.get("apiproduct"), str)
        )
        approved = self._products.setdefault(approved, approved)
        key_digest = digest(key)
        credential = Credential(
            key_sha256="",
            client_id="",
            app_name=app_name,
            developer_email=email,
            products=approved,
            active=app_ok and cred.get("status") == "approved",
            expires_at=expires,
        )
        if key_digest in self._index.entries:
            self._seen_twice.add(key_digest)
        self._index.entries[key_digest] = self._shared.setdefault(credential, credential)

    def _skip(self, why: str, count: int = 1) -> None:
        log.warning("key index: %s: left out (checked with /verifyApiKey instead)", why)
        self._index.skipped += max(count, 1)


def for_caller(credential: Credential, api_key: str, key_digest: bytes) -> Credential:
    """The index's credential as ``/verifyApiKey`` describes it: the GCP proxy's client_id is the key."""
    return replace(credential, client_id=api_key, key_sha256=key_digest.hex())


def _text(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    return value if isinstance(value, str) else ""


def _expiry(value: Any) -> float | None:
    """expiresAt (epoch ms, a string or a number; -1 never) as epoch seconds, None for never.

    Raises:
        ValueError: not an integer.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expiresAt is not an integer")
    ms = int(value)
    return None if ms < 0 else ms / 1000
