"""FakeApigee: one stateful fake of Apigee's remote-service control plane, for every test level.

It follows /work/shared/reference/apigee-adapter.md §3 and the §11 checklist: `GET {base}/products` with a
SHA-512 `ETag` and `304`, `POST {base}/verifyApiKey` minting RS256 JWTs with the GCP proxy's claims,
`POST {base}/quotas` counting calendar windows server-side (`expiryTime` in epoch **ms**, issue #31), and the
`/remote-token` proxy's `certs` JWKS and `token` endpoint. Calls to `{base}` check Basic or internal-JWT
auth (§3.0). Faults are knobs per endpoint (drop, fail, malformed, delay). The same object is an
`httpx.MockTransport` handler (`fake.transport()`) and a loopback HTTP server (`await fake.serve()`).

Analytics (§3.4, §3.5), for any org/env. `{internal}` is `internal_path` (default `/edgemicro`, like the
legacy SaaS `https://istioservices.apigee.net/edgemicro`), so `tenant.internal_api` is
`server.internal_api_url`:

    GET  {internal}/analytics/organization/{org}/environment/{env}?encrypt=true
         &file_content_type=application%2Fx-gzip&relative_file_path=date%3D..%2Ftime%3D..-00%2F<name>
         &tenant={org}~{env}                               Basic/JWT auth like {base}  -> {"url": ...}
    GET  /v1/organizations/{org}/environments/{env}/datalocation?dataset=api&repo=edge
         &relative_file_path={unix}.api.{org}.{env}.{uuid}.gz   Google Bearer (below) -> {"url"}
    PUT  /signed/{id}?relative_file_path=..&tenant=..     the signed URL: gzip NDJSON, exactly 200
    POST {internal}/axpublisher/organization/{org}/environment/{env}
         {"organization","environment","records":[...]}    Basic/JWT auth -> {"accepted":N,"rejected":M}

A signed URL works once: unknown or reused -> 403 (like an expired signature). A URL from the legacy flavour
needs `Content-Type: application/x-gzip` and `x-amz-server-side-encryption: AES256` (signed headers in S3,
else 403) and tolerates the Basic header the Go adapter keeps; a GCP (GCS) URL refuses any `Authorization`
(400, two auth mechanisms). Accepted bodies are gunzipped and split into JSON records: read them with
`analytics_records(org, env)`; `uploads` lists (org, env, relative_file_path), `publishes` (org, env, count).
A body that is not gzip NDJSON objects is a 400 (a test aid; real storage would keep the bytes).
Fault knobs take the endpoint names `analytics_url`, `datalocation`, `signed_put` and `axpublisher`.

Google OAuth2 (for Apigee X/hybrid analytics), standing for `https://oauth2.googleapis.com/token`:

    POST /token   grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>
                  -> {"access_token": "ya29.fake...", "expires_in": 3600, "token_type": "Bearer"}

The assertion is what google-auth's service-account credentials send: RS256, signed by the private key of a
service account the test registered with `add_service_account(client_email, public_key)` (`iss` names it),
`scope` including cloud-platform, `aud` a token URL (google-auth always puts Google's own there), `iat`/`exp`
at most an hour apart around the fake's clock (5 min leeway; google-auth reads the wall clock). Errors are
Google's 400 `{"error": "invalid_grant" | "invalid_scope" | ..., "error_description": ...}`. Issued tokens
(`google_tokens_issued`) live `google_token_ttl` seconds. `datalocation` accepts exactly the issued tokens
that have not expired and `google_token` if set; with neither a `google_token` nor a registered service
account it takes any Bearer token. Fault knob: `oauth_token`.
Management API (Apigee X, standing for `https://apigee.googleapis.com`, or legacy Apigee Edge, standing for
`https://api.enterprise.apigee.com`; `FakeServer.management_url`), the developers, apps and credentials in
`fake.directory` (apigee_management.py). `/verifyApiKey` and `/remote-token/token` answer from the same
state, so a listing and a key check always agree:

    GET  /v1/organizations/{org}/apps?expand=true&includeCred=true&pageSize=N&pageToken=T   Google Bearer
         -> {"app": [App...], "nextPageToken": T'}   by appId; pageSize 0/absent = `apps_page_max` (1000),
            larger is clamped; no nextPageToken on the last page; without expand=true [{"appId"}] only,
            without includeCred=true no "credentials"; a pageToken not handed out -> 400 INVALID_ARGUMENT
    GET  /v1/organizations/{org}/apps?expand=true&includeCred=true&rows=N&startKey=APPID        (Edge)
         -> {"app": [App...]}   Edge's paging, taken when rows or startKey is there and neither pageSize nor
            pageToken: by appId from startKey on (**inclusive**; an unknown startKey starts at the next
            appId above it), rows 0/absent = `apps_rows_max` (1000), larger is clamped; no nextPageToken
            (the caller asks again from its last appId until a page is short); bad rows -> 400
    GET  /v1/organizations/{org}/apps/{appId}      -> App with credentials; unknown -> 404 NOT_FOUND
    GET  /v1/organizations/{org}/developers/{email or developerId} -> Developer; unknown -> 404 NOT_FOUND
    GET  /v1/organizations/{org}/developers?expand=true&count=N&startKey=EMAIL
         -> {"developer": [Developer...]} by email, from startKey on (**inclusive**, as Apigee documents),
            count 0/absent = 1000, larger is clamped; without expand=true [{"email"}] only

    App        {"appId","name","developerId","developerEmail","status": approved|revoked,"createdAt",
                "lastModifiedAt","attributes": [],"credentials": [Credential...]}      (times: ms strings)
    Credential {"consumerKey","consumerSecret","status": approved|revoked,"expiresAt": ms string, "-1" never,
                "issuedAt","apiProducts": [{"apiproduct","status": approved|revoked|pending}],"scopes": [],
                "attributes": []}
    Developer  {"email","developerId","status": active|inactive,"firstName","lastName","userName",
                "createdAt","lastModifiedAt","apps": [app names],"attributes": []}

Arrange it with `add_developer`, `add_app`, `add_credential`, the `set_*_status` / `set_credential_expiry`
knobs and `delete_credential` (or `add_key` / `revoke_key`). A key verifies iff its credential is approved
and unexpired (fake clock), its app approved and its developer active; `api_product_list` holds its approved
products. Auth is the Google Bearer token `datalocation` takes (401 UNAUTHENTICATED) or, with
`management_basic=(username, password)` (an Edge org user), exactly that HTTP Basic pair (otherwise 401 with
Edge's `{"code", "message", "contexts"}`; a Bearer token is refused too). An org other than the fake's is a
404 NOT_FOUND. Other errors are Google's `{"error": {"code", "message", "status"}}`, except the Edge
paging's 400, which is Edge's. Fault knobs take the endpoint names `apps`, `app`, `developers` and
`developer`.

Not covered: `{base}/version`, `{base}/rotate`, `Expect: 100-continue`; over loopback, bodies over 1 MiB get
413 (http_server.MAX_BODY).

Standalone: `python -m tests.fakes.apigee --port 8080 --key KEY:app:dev@x:product1,product2`
(see apigee_cli.py).
Imports only the stdlib, httpx, pyjwt/cryptography and tests.fakes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import copy
import gzip
import hashlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.fakes.apigee_management import (
    NEVER,
    PAGE_MAX,
    Directory,
    app_json,
    developer_json,
    parse_limit,
)
from tests.fakes.http_server import ConnectionDropped, LoopbackServer

ENDPOINTS = frozenset(
    {
        "products", "verifyApiKey", "certs", "token", "quotas",
        "analytics_url", "datalocation", "signed_put", "axpublisher", "oauth_token",
        "apps", "app", "developers", "developer",
    }
)  # fmt: skip
AUDIENCE = "remote-service-client"
INTERNAL_ISSUER = "apigee-remote-service-envoy"
INVALID_API_KEY = {
    "fault": {"faultstring": "Invalid ApiKey", "detail": {"errorcode": "oauth.v2.InvalidApiKey"}}
}
INVALID_REQUEST = {"error": "invalid_request", "error_description": "invalid request"}
UNAUTHORIZED = {"error": "unauthorized"}
UNAUTHENTICATED = "Request had invalid authentication credentials."
# The GCP proxy's Quota policy is type="calendar" with StartTime 2019-01-01 00:00:00 (DistributedQuota.xml).
QUOTA_START = datetime(2019, 1, 1, tzinfo=UTC)
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
# Legacy relative_file_path: date=YYYY-MM-DD/time=HH-MM-00/<file> (GOLIB saas_uploader uploadDir).
_LEGACY_PATH = re.compile(r"date=\d{4}-\d{2}-\d{2}/time=\d{2}-\d{2}-00/[^/]+")
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # the aud google-auth puts in every assertion
ASSERTION_LEEWAY = 300.0
_Answer = Callable[[httpx.Request], httpx.Response]


@dataclass
class _SignedUrl:
    org: str
    env: str
    relative_file_path: str
    flavour: Literal["legacy", "gcp"]
    used: bool = False


@dataclass
class _Canned:
    status: int
    body: bytes
    headers: dict[str, str]


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        content=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _google_error(status: int, message: str, code: str) -> httpx.Response:
    return _json(status, {"error": {"code": status, "message": message, "status": code}})


def _edge_error(status: int, code: str, message: str) -> httpx.Response:
    return _json(status, {"code": code, "message": message, "contexts": []})


def _oauth_error(error: str, description: str) -> httpx.Response:
    return _json(400, {"error": error, "error_description": description})


def _storage_error(status: int, code: str, message: str) -> httpx.Response:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>"
    body += "</Error>"
    return httpx.Response(status, content=body.encode(), headers={"Content-Type": "application/xml"})


def quota_window(now: float, time_unit: str, interval: int) -> tuple[float, float]:
    """Return the calendar window (start, end) in epoch seconds that holds `now`, in UTC."""
    if time_unit in _UNIT_SECONDS:
        size = _UNIT_SECONDS[time_unit] * interval
        origin = QUOTA_START.timestamp()
        start = origin + (now - origin) // size * size
        return start, start + size
    if time_unit != "month":
        raise ValueError(time_unit)
    at = datetime.fromtimestamp(now, UTC)
    first = ((at.year - 2019) * 12 + at.month - 1) // interval * interval

    def month(index: int) -> float:
        return datetime(2019 + index // 12, index % 12 + 1, 1, tzinfo=UTC).timestamp()

    return month(first), month(first + interval)


class FakeApigee:
    """The control plane. Tests arrange state with `set_products`, `add_key` or the developer/app/credential
    methods, and assert on `calls`."""

    def __init__(
        self,
        *,
        org: str = "org",
        env: str = "test",
        basic_auth: tuple[str, str] | None = None,
        policy_jwks: dict[str, Any] | None = None,
        base_path: str = "/remote-service",
        internal_path: str = "/edgemicro",
        google_token: str | None = None,
        token_ttl: float = 900.0,
        google_token_ttl: float = 3600.0,
        management_basic: tuple[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.org, self.env, self.base_path = org, env, base_path.rstrip("/")
        self.internal_path = internal_path.rstrip("/")
        self.google_token = google_token  # accepted by datalocation as if issued here
        self.google_token_ttl = google_token_ttl
        self.management_basic = management_basic  # Edge: the management API takes this Basic pair only
        self._service_accounts: dict[str, Any] = {}  # client_email -> public key
        self._google_tokens: dict[str, float] = {}  # issued access token -> expiry (fake clock)
        self.google_tokens_issued: list[str] = []  # in issue order
        self.basic_auth, self.token_ttl, self._clock = basic_auth, token_ttl, clock
        self._policy_keys = jwt.PyJWKSet.from_dict(policy_jwks) if policy_jwks is not None else None
        self.calls: collections.Counter[str] = collections.Counter()
        self.last_headers: dict[str, dict[str, str]] = {}
        self.directory = Directory(org, clock)  # developers, apps, credentials: the one source of API keys
        self.apps_page_max = PAGE_MAX  # default and largest pageSize of the apps listing
        self.apps_rows_max = PAGE_MAX  # default and largest rows of the Edge apps listing
        self._quotas: dict[str, tuple[float, int]] = {}  # identifier -> (window end, count)
        self._drops: collections.Counter[str] = collections.Counter()
        self._fails: dict[str, collections.deque[_Canned]] = collections.defaultdict(collections.deque)
        self._malformed: dict[str, collections.deque[_Canned]] = collections.defaultdict(collections.deque)
        self._delays: dict[str, float] = {}
        self._signed: dict[str, _SignedUrl] = {}
        self._analytics: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        self.uploads: list[tuple[str, str, str]] = []  # accepted PUTs: (org, env, relative_file_path)
        self.publishes: list[tuple[str, str, int]] = []  # accepted axpublisher POSTs: (org, env, records)
        self._private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # The real JWKS uses an RFC 3339 timestamp as kid (cli provision / token rotate-cert).
        self.signing_kid = datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        public = RSAAlgorithm.to_jwk(self._private_key.public_key(), as_dict=True)
        self.jwks: dict[str, Any] = {
            "keys": [
                {
                    "kty": "RSA",
                    "kid": self.signing_kid,
                    "alg": "RS256",
                    "use": "sig",
                    "n": public["n"],
                    "e": public["e"],
                }
            ]
        }
        self.set_products([])
        self._routes: dict[str, tuple[str, str, Callable[[httpx.Request], httpx.Response]]] = {
            f"{self.base_path}/products": ("products", "GET", self._get_products),
            f"{self.base_path}/verifyApiKey": ("verifyApiKey", "POST", self._verify_api_key),
            f"{self.base_path}/quotas": ("quotas", "POST", self._post_quotas),
            "/remote-token/certs": ("certs", "GET", self._get_certs),
            "/remote-token/token": ("token", "POST", self._post_token),
            "/token": ("oauth_token", "POST", self._post_oauth_token),
        }
        ia = re.escape(self.internal_path)
        tenant = "organization/(?P<org>[^/]+)/environment/(?P<env>[^/]+)"  # the Go adapter's analyticsPath
        datalocation = "/v1/organizations/(?P<org>[^/]+)/environments/(?P<env>[^/]+)/datalocation"
        management = "/v1/organizations/(?P<org>[^/]+)"
        self._patterns: list[tuple[re.Pattern[str], str, str, Callable[..., httpx.Response]]] = [
            (re.compile(f"{ia}/analytics/{tenant}"), "analytics_url", "GET", self._legacy_signed_url),
            (re.compile(datalocation), "datalocation", "GET", self._datalocation),
            (re.compile("/signed/(?P<url_id>[^/]+)"), "signed_put", "PUT", self._signed_put),
            (re.compile(f"{ia}/axpublisher/{tenant}"), "axpublisher", "POST", self._axpublisher),
            (re.compile(f"{management}/apps"), "apps", "GET", self._list_apps),
            (re.compile(f"{management}/apps/(?P<app_id>[^/]+)"), "app", "GET", self._get_app),
            (re.compile(f"{management}/developers"), "developers", "GET", self._list_developers),
            (
                re.compile(f"{management}/developers/(?P<developer>[^/]+)"),
                "developer",
                "GET",
                self._get_developer,
            ),
        ]

    # -- state -----------------------------------------------------------------------------------------

    def set_products(self, products: list[dict[str, Any]]) -> None:
        """Replace the product list (Apigee JSON shape, quota fields as strings); changes the ETag."""
        self.products = copy.deepcopy(products)
        self._products_body = json.dumps({"apiProduct": self.products}).encode()
        self.products_etag = '"' + hashlib.sha512(self._products_body).hexdigest() + '"'

    def add_key(
        self,
        api_key: str,
        *,
        app: str,
        developer_email: str,
        products: list[str],
        client_id: str | None = None,
        status: str = "approved",
    ) -> None:
        """Add (or replace) an API key, every product approved, in the developer's app `app` (both created
        active/approved when missing); the real GCP proxy uses the key itself as `client_id`."""
        self.directory.put_key(
            api_key,
            app=app,
            developer_email=developer_email,
            products=products,
            client_id=client_id,
            status=status,
        )

    def revoke_key(self, api_key: str) -> None:
        self.directory.set_credential_status(api_key, "revoked")

    def add_developer(self, email: str, status: str = "active") -> str:
        """Add a developer (email lowercased, unique); returns its developerId."""
        return self.directory.add_developer(email, status)

    def add_app(self, name: str, developer_email: str, status: str = "approved") -> str:
        """Add an app to a developer (created active when missing); returns its appId."""
        return self.directory.add_app(name, developer_email, status)

    def add_credential(
        self,
        app_id: str,
        consumer_key: str,
        products: Mapping[str, str] | list[str],
        status: str = "approved",
        expires_at_ms: int = NEVER,
        client_id: str | None = None,
    ) -> None:
        """Add a key (unique in the org) to an app; `products` as a list are all approved."""
        self.directory.add_credential(app_id, consumer_key, products, status, expires_at_ms, client_id)

    def set_developer_status(self, email: str, status: str) -> None:
        self.directory.set_developer_status(email, status)

    def set_app_status(self, app_id: str, status: str) -> None:
        self.directory.set_app_status(app_id, status)

    def set_credential_status(self, consumer_key: str, status: str) -> None:
        self.directory.set_credential_status(consumer_key, status)

    def set_credential_product_status(self, consumer_key: str, product: str, status: str) -> None:
        self.directory.set_credential_product_status(consumer_key, product, status)

    def set_credential_expiry(self, consumer_key: str, expires_at_ms: int) -> None:
        """Expire the key at `expires_at_ms` (epoch ms, the fake's clock); -1 = never."""
        self.directory.set_credential_expiry(consumer_key, expires_at_ms)

    def delete_credential(self, consumer_key: str) -> None:
        self.directory.delete_credential(consumer_key)

    def add_service_account(self, client_email: str, public_key: Any) -> None:
        """Let `client_email` get Google access tokens at `/token`; `public_key` (PEM or a key object)
        verifies its assertions. From then on `datalocation` takes only tokens issued here."""
        if isinstance(public_key, str | bytes):
            public_key = serialization.load_pem_public_key(
                public_key.encode() if isinstance(public_key, str) else public_key
            )
        self._service_accounts[client_email] = public_key

    def analytics_records(self, org: str, env: str) -> list[dict[str, Any]]:
        """Every record received for (org, env), by signed-URL upload or axpublisher, in arrival order."""
        return copy.deepcopy(self._analytics.get((org, env), []))

    def quota_count(self, identifier: str) -> int:
        """Total weight counted for `identifier` in its current window (0 when unknown or expired)."""
        end, count = self._quotas.get(identifier, (0.0, 0))
        return count if self._clock() < end else 0

    # -- faults ----------------------------------------------------------------------------------------

    def fail_next(
        self,
        endpoint: str,
        status: int,
        count: int = 1,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        _check(endpoint, count)
        if body is None:
            body, headers = b'{"error":"injected"}', {"Content-Type": "application/json", **(headers or {})}
        self._fails[endpoint].extend(_Canned(status, body, dict(headers or {})) for _ in range(count))

    def clear_faults(self, endpoint: str) -> None:
        """Forget the failures queued by ``fail_next`` for ``endpoint`` (the outage is over)."""
        _check(endpoint, 1)
        self._fails[endpoint].clear()

    def set_delay(self, endpoint: str, seconds: float) -> None:
        """Sleep (real asyncio time) before every answer of `endpoint`, faulted ones included; 0 clears."""
        _check(endpoint, 1)
        self._delays[endpoint] = seconds

    def drop_next(self, endpoint: str, count: int = 1) -> None:
        _check(endpoint, count)
        self._drops[endpoint] += count

    def malformed_next(
        self,
        endpoint: str,
        body: bytes,
        status: int = 200,
        content_type: str = "application/json",
        count: int = 1,
    ) -> None:
        _check(endpoint, count)
        canned = _Canned(status, body, {"Content-Type": content_type})
        self._malformed[endpoint].extend(canned for _ in range(count))

    # -- transport -------------------------------------------------------------------------------------

    async def handler(self, request: httpx.Request) -> httpx.Response:
        """Answer one request; usable as `httpx.MockTransport(fake.handler)`."""
        route = self._route(request.url.path)
        if route is None:
            return _json(404, {"error": "not_found"})
        endpoint, method, answer = route
        self.calls[endpoint] += 1
        self.last_headers[endpoint] = {k.lower(): v for k, v in request.headers.items()}
        await request.aread()
        canned: _Canned | None = None
        dropped = self._drops[endpoint] > 0
        if dropped:
            self._drops[endpoint] -= 1
        elif self._fails[endpoint]:
            canned = self._fails[endpoint].popleft()
        elif self._malformed[endpoint]:
            canned = self._malformed[endpoint].popleft()
        if self._delays.get(endpoint, 0) > 0:
            await asyncio.sleep(self._delays[endpoint])
        if dropped:
            raise ConnectionDropped(f"fake apigee dropped {endpoint}", request=request)
        if canned is not None:
            return httpx.Response(canned.status, content=canned.body, headers=canned.headers)
        if request.method != method:
            return httpx.Response(405, headers={"Allow": method})
        if request.url.path.startswith(self.base_path + "/") and not self._authorized(request):
            return _json(401, UNAUTHORIZED)
        return answer(request)

    def _route(self, path: str) -> tuple[str, str, _Answer] | None:
        route = self._routes.get(path)
        if route is not None:
            return route
        for pattern, endpoint, method, answer in self._patterns:
            match = pattern.fullmatch(path)
            if match is not None:
                return endpoint, method, partial(answer, **match.groupdict())
        return None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> FakeServer:
        """Start a real HTTP/1.1 server on the running loop; close it with `await server.close()`."""
        server = await LoopbackServer.start(self.handler, host, port)
        return FakeServer(server, self.base_path, self.internal_path)

    # -- endpoints -------------------------------------------------------------------------------------

    def _authorized(self, request: httpx.Request) -> bool:
        if self.basic_auth is not None:
            return _has_basic(request, self.basic_auth)
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if self._policy_keys is None:
            return True
        if scheme.lower() != "bearer":
            return False
        try:
            kid = jwt.get_unverified_header(credentials).get("kid")
            key = self._policy_keys[kid] if kid else self._policy_keys.keys[0]
            claims = jwt.decode(
                credentials,
                key,
                algorithms=["RS256"],
                audience=AUDIENCE,
                issuer=INTERNAL_ISSUER,
                options={
                    "require": ["exp", "iat"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except (jwt.PyJWTError, KeyError, IndexError):
            return False
        now = self._clock()  # time checks use the injected clock, not pyjwt's wall clock
        return now < claims["exp"] and claims.get("nbf", now) <= now

    def _get_products(self, request: httpx.Request) -> httpx.Response:
        headers = {"ETag": self.products_etag}
        if request.headers.get("if-none-match") == self.products_etag:
            return httpx.Response(304, headers=headers)
        return httpx.Response(
            200, content=self._products_body, headers={"Content-Type": "application/json", **headers}
        )

    def _verify_api_key(self, request: httpx.Request) -> httpx.Response:
        api_key = _body(request).get("apiKey")
        if not isinstance(api_key, str) or not api_key:
            return _json(400, INVALID_REQUEST)
        key = self.directory.verify(api_key)
        if key is None:
            return _json(401, INVALID_API_KEY)
        claims = {
            "iss": f"{_origin(request)}{self.base_path}/verifyApiKey",
            "client_id": key.credential.client_id,
            "api_product_list": key.products,
            "application_id": key.app.app_id,
            "application_name": key.app.name,
            "developer_email": key.app.developer_email,
        }
        return _json(200, {"token": self._sign(claims)}, {"Cache-Control": "no-store"})

    def _get_certs(self, request: httpx.Request) -> httpx.Response:
        return _json(200, self.jwks)

    def _post_token(self, request: httpx.Request) -> httpx.Response:
        form = _body(request)
        if form.get("grant_type") != "client_credentials":
            return _json(400, {"error": "unsupported_grant_type", "error_description": "invalid grant type"})
        key = self.directory.verify(form.get("client_id") or "")
        if key is None or not form.get("client_secret"):
            return _json(401, {"error": "invalid_client", "error_description": "invalid client credentials"})
        claims = {
            "iss": f"{_origin(request)}/remote-token/token",
            "client_id": key.credential.client_id,
            "access_token": secrets.token_urlsafe(21),
            "api_product_list": key.products,
            "application_name": key.app.name,
            "developer_email": key.app.developer_email,
            "scope": "",
        }
        ttl = int(self.token_ttl)
        return _json(200, {"access_token": self._sign(claims), "token_type": "Bearer", "expires_in": ttl})

    def _post_quotas(self, request: httpx.Request) -> httpx.Response:
        body = _body(request)
        identifier, time_unit = body.get("identifier"), body.get("timeUnit")
        numbers = [body.get(name) for name in ("weight", "interval", "allow")]
        if (
            not isinstance(identifier, str)
            or not identifier
            or time_unit not in (*_UNIT_SECONDS, "month")
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
            or numbers[1] < 1
        ):
            return _json(400, INVALID_REQUEST)
        weight, interval, allow = numbers
        now = self._clock()
        _, end = quota_window(now, time_unit, interval)
        last_end, count = self._quotas.get(identifier, (end, 0))
        count = (count if last_end == end else 0) + weight
        self._quotas[identifier] = (end, count)
        return _json(
            200,
            {
                "allowed": allow,
                "used": min(count, allow),
                "exceeded": max(0, count - allow),
                "expiryTime": int(end * 1000),  # milliseconds, like the real proxy (the Go mocks send µs)
                "timestamp": int(now * 1000),
            },
        )

    # -- analytics (§3.4, §3.5) ------------------------------------------------------------------------

    def _issue(self, request: httpx.Request, signed: _SignedUrl) -> httpx.Response:
        url_id = secrets.token_urlsafe(12)
        self._signed[url_id] = signed
        tenant = f"{signed.org}~{signed.env}"
        query = urlencode({"relative_file_path": signed.relative_file_path, "tenant": tenant})
        return _json(200, {"url": f"{_origin(request)}/signed/{url_id}?{query}"})

    def _legacy_signed_url(self, request: httpx.Request, org: str, env: str) -> httpx.Response:
        if not self._authorized(request):
            return _json(401, UNAUTHORIZED)
        query = request.url.params
        relative = query.get("relative_file_path", "")
        if (
            query.get("encrypt") != "true"
            or query.get("file_content_type") != "application/x-gzip"
            or query.get("tenant") != f"{org}~{env}"
            or not _LEGACY_PATH.fullmatch(relative)
        ):
            return _json(400, INVALID_REQUEST)
        return self._issue(request, _SignedUrl(org, env, relative, "legacy"))

    def _datalocation(self, request: httpx.Request, org: str, env: str) -> httpx.Response:
        if not self._google_bearer(request):
            return _google_error(401, UNAUTHENTICATED, "UNAUTHENTICATED")
        query = request.url.params
        relative = query.get("relative_file_path", "")
        name = rf"\d+\.api\.{re.escape(org)}\.{re.escape(env)}\.{_UUID}\.gz"
        if query.get("dataset") != "api" or query.get("repo") != "edge" or not re.fullmatch(name, relative):
            return _google_error(400, "Request contains an invalid argument.", "INVALID_ARGUMENT")
        return self._issue(request, _SignedUrl(org, env, relative, "gcp"))

    def _google_bearer(self, request: httpx.Request) -> bool:
        scheme, _, token = str(request.headers.get("authorization", "")).partition(" ")
        return scheme.lower() == "bearer" and bool(token) and self._google_authorized(token)

    def _google_authorized(self, token: str) -> bool:
        if token == self.google_token:
            return True
        expiry = self._google_tokens.get(token)
        if expiry is not None:
            return self._clock() < expiry
        return self.google_token is None and not self._service_accounts  # no Google identity set up

    def _post_oauth_token(self, request: httpx.Request) -> httpx.Response:
        """Google's token endpoint, JWT-bearer grant only (what service-account credentials use)."""
        form = _body(request)
        if form.get("grant_type") != JWT_BEARER:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        assertion = form.get("assertion", "")
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            return _oauth_error("invalid_grant", "Invalid JWT: malformed assertion")
        key = self._service_accounts.get(issuer) if isinstance(issuer, str) else None
        if key is None:
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=["RS256"],
                options={
                    "require": ["iss", "aud", "iat", "exp"],
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if not any(isinstance(a, str) and a.endswith("/token") for a in audiences):
            return _oauth_error("invalid_grant", "Invalid JWT: audience is not a token URL")
        now, iat, exp = self._clock(), claims["iat"], claims["exp"]
        if not (exp - iat <= 3600 and iat - ASSERTION_LEEWAY <= now < exp + ASSERTION_LEEWAY):
            return _oauth_error(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
            )
        if CLOUD_PLATFORM not in str(claims.get("scope", "")).split():
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = "ya29.fake." + secrets.token_urlsafe(32)
        self._google_tokens[token] = now + self.google_token_ttl
        self.google_tokens_issued.append(token)
        return _json(
            200, {"access_token": token, "expires_in": int(self.google_token_ttl), "token_type": "Bearer"}
        )

    # -- management API (Apigee X, Edge) ---------------------------------------------------------------

    def _management_refusal(self, request: httpx.Request, org: str) -> httpx.Response | None:
        """The answer when the caller may not list `org` (auth first, like Google); None to go on."""
        if self.management_basic is not None:
            if not _has_basic(request, self.management_basic):
                return _edge_error(401, "Unauthorized", "Invalid username or password.")
        elif not self._google_bearer(request):
            return _google_error(401, UNAUTHENTICATED, "UNAUTHENTICATED")
        if org != self.org:
            return _google_error(404, f'Organization "{org}" not found.', "NOT_FOUND")
        return None

    def _list_apps(self, request: httpx.Request, org: str) -> httpx.Response:
        if (refusal := self._management_refusal(request, org)) is not None:
            return refusal
        query = request.url.params
        next_token = ""
        if ("rows" in query or "startKey" in query) and not ("pageSize" in query or "pageToken" in query):
            try:  # Apigee Edge: an inclusive startKey (an appId), no page token
                rows = parse_limit(query.get("rows"), "rows", self.apps_rows_max)
            except ValueError as exc:
                return _edge_error(400, "keymanagement.service.InvalidRequest", str(exc))
            apps = self.directory.list_apps_from(rows, query.get("startKey", ""))
        else:
            try:
                size = parse_limit(query.get("pageSize"), "pageSize", self.apps_page_max)
                apps, next_token = self.directory.list_apps(size, query.get("pageToken", ""))
            except ValueError as exc:
                return _google_error(400, str(exc), "INVALID_ARGUMENT")
        if _flag(request, "expand"):
            credentials = _flag(request, "includeCred")
            body: dict[str, Any] = {"app": [app_json(a, credentials=credentials) for a in apps]}
        else:
            body = {"app": [{"appId": a.app_id} for a in apps]}
        if next_token:
            body["nextPageToken"] = next_token
        return _json(200, body)

    def _get_app(self, request: httpx.Request, org: str, app_id: str) -> httpx.Response:
        if (refusal := self._management_refusal(request, org)) is not None:
            return refusal
        app = self.directory.apps.get(app_id)
        if app is None:
            return _google_error(404, f'App "{app_id}" not found.', "NOT_FOUND")
        return _json(200, app_json(app, credentials=True))

    def _get_developer(self, request: httpx.Request, org: str, developer: str) -> httpx.Response:
        """One developer by email (any case) or developerId, as Apigee X and Edge both accept."""
        if (refusal := self._management_refusal(request, org)) is not None:
            return refusal
        wanted = unquote(developer).lower()
        for found in self.directory.developers.values():
            if wanted in (found.email, found.developer_id):
                return _json(200, developer_json(found, self.directory.app_names(found)))
        return _google_error(404, f'Developer "{developer}" not found.', "NOT_FOUND")

    def _list_developers(self, request: httpx.Request, org: str) -> httpx.Response:
        if (refusal := self._management_refusal(request, org)) is not None:
            return refusal
        query = request.url.params
        try:
            count = parse_limit(query.get("count"), "count")
        except ValueError as exc:
            return _google_error(400, str(exc), "INVALID_ARGUMENT")
        developers = self.directory.list_developers(count, query.get("startKey", ""))
        if _flag(request, "expand"):
            found = [developer_json(d, self.directory.app_names(d)) for d in developers]
        else:
            found = [{"email": d.email} for d in developers]
        return _json(200, {"developer": found})

    # -- analytics storage -----------------------------------------------------------------------------

    def _signed_put(self, request: httpx.Request, url_id: str) -> httpx.Response:
        signed = self._signed.get(url_id)
        if signed is None or signed.used:
            return _storage_error(403, "AccessDenied", "Request has expired")
        signed.used = True
        headers = request.headers
        if signed.flavour == "gcp" and "authorization" in headers:
            return _storage_error(400, "InvalidArgument", "Only one auth mechanism allowed")
        if signed.flavour == "legacy" and (
            headers.get("content-type") != "application/x-gzip"
            or headers.get("x-amz-server-side-encryption") != "AES256"
        ):
            return _storage_error(403, "SignatureDoesNotMatch", "Signed headers do not match")
        try:
            lines = gzip.decompress(request.content).splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, EOFError, ValueError):
            return _storage_error(400, "InvalidArgument", "fake: the body is not gzip NDJSON")
        if not all(isinstance(record, dict) for record in records):
            return _storage_error(400, "InvalidArgument", "fake: a line is not a JSON object")
        self._analytics[(signed.org, signed.env)].extend(records)
        self.uploads.append((signed.org, signed.env, signed.relative_file_path))
        etag = '"' + hashlib.md5(request.content, usedforsecurity=False).hexdigest() + '"'
        return httpx.Response(200, headers={"ETag": etag})

    def _axpublisher(self, request: httpx.Request, org: str, env: str) -> httpx.Response:
        if not self._authorized(request):
            return _json(401, UNAUTHORIZED)
        body = _body(request)
        records = body.get("records")
        if body.get("organization") != org or body.get("environment") != env or not isinstance(records, list):
            return _json(400, INVALID_REQUEST)
        accepted = [record for record in records if isinstance(record, dict)]
        self._analytics[(org, env)].extend(accepted)
        self.publishes.append((org, env, len(accepted)))
        return _json(200, {"accepted": len(accepted), "rejected": len(records) - len(accepted)})

    def _sign(self, claims: dict[str, Any]) -> str:
        now = int(self._clock())
        base = {
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": int(now + self.token_ttl),
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            {**base, **claims}, self._private_key, algorithm="RS256", headers={"kid": self.signing_kid}
        )


class FakeServer:
    """A FakeApigee served over loopback: `async with await fake.serve() as server:`."""

    def __init__(self, server: LoopbackServer, base_path: str, internal_path: str = "/edgemicro") -> None:
        self._server = server
        self.port = server.port
        self.base_url = server.base_url
        self.runtime_url = server.base_url  # where /remote-token lives
        self.remote_service_url = server.base_url + base_path
        self.internal_api_url = server.base_url + internal_path  # tenant.internal_api (legacy analytics)
        self.analytics_url = server.base_url  # stands for https://apigee.googleapis.com (datalocation)
        self.management_url = server.base_url  # the same host: /v1/organizations/{org}/apps, /developers

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> FakeServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _check(endpoint: str, count: int) -> None:
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
    if count < 1:
        raise ValueError("count must be at least 1")


def _has_basic(request: httpx.Request, pair: tuple[str, str]) -> bool:
    """Whether the request carries exactly HTTP Basic `pair` (username, password)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    try:
        decoded = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    return scheme.lower() == "basic" and decoded == ":".join(pair)


def _flag(request: httpx.Request, name: str) -> bool:
    return str(request.url.params.get(name, "")).lower() == "true"


def _origin(request: httpx.Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc.decode()}"


def _body(request: httpx.Request) -> dict[str, Any]:
    """The request's JSON object (or form fields); {} when it is neither."""
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return dict(parse_qsl(request.content.decode("utf-8", "replace")))
    try:
        body = json.loads(request.content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


if __name__ == "__main__":  # `python -m tests.fakes.apigee ...`; the command line lives in apigee_cli.py
    from tests.fakes.apigee_cli import main

    raise SystemExit(main())
