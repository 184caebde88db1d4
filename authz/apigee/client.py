"""ApigeeClient: the remote-service API (products, verifyApiKey, quotas, the remote-token JWKS) over one
httpx.AsyncClient.

Every call but the public JWKS carries the Authorization header from an Authorizer, has the client's
timeout, is timed in
``apigee_requests_seconds{org,env,api,code,method}``, and maps failures onto the error tree:
transport errors, timeouts, 5xx, 429 and unparseable bodies raise ``ApigeeUnavailable`` (retry later, never
"bad key"); other 4xx raise ``ApigeeRejected``. The wire contract is reference §3.1, §3.2 and §3.3.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx

from authz.apigee.signer import Authorizer
from authz.config import TenantConfig
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import Metrics

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
MAX_BODY_BYTES = 64 * 1024 * 1024  # a products list far beyond any real org
MAX_JWKS_BYTES = 256 * 1024  # a JWKS holds a handful of keys; anything bigger is not one


@dataclass(frozen=True)
class ProductsResponse:
    """``not_modified`` (304) keeps the current catalog; otherwise ``products`` is the raw list."""

    not_modified: bool
    products: tuple[dict[str, Any], ...] = ()
    etag: str | None = None


@dataclass(frozen=True)
class VerifyResponse:
    """``token`` is the JWT Apigee issued for a valid key; None means Apigee says the key is invalid."""

    token: str | None


@dataclass(frozen=True)
class QuotaResponse:
    """Apigee's count for one quota bucket after a ``POST /quotas`` (reference §3.3)."""

    allowed: int
    used: int  # capped at allowed
    exceeded: int  # the surplus over allowed
    expiry: float  # epoch seconds, the window's end (the wire's expiryTime is epoch MILLISECONDS)
    timestamp: float  # epoch seconds (ms on the wire too); 0 when absent


def tls_context(ca_file: str, cert_file: str, key_file: str, allow_unverified: bool) -> ssl.SSLContext | bool:
    """The ``verify`` argument for httpx from ``tenant.tls`` (custom CA, client certificate, insecure)."""
    if not (ca_file or cert_file or allow_unverified):
        return True
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    if allow_unverified:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def new_http_client(tenant: TenantConfig) -> httpx.AsyncClient:
    """The one HTTP client for Apigee: ``tenant.client_timeout`` per call, ``tenant.tls``, bounded pool."""
    tls = tenant.tls
    return httpx.AsyncClient(
        timeout=tenant.client_timeout,
        verify=tls_context(tls.ca_file, tls.cert_file, tls.key_file, tls.allow_unverified_ssl_cert),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        follow_redirects=False,
    )


def new_google_http_client(timeout: float) -> httpx.AsyncClient:
    """The HTTP client for Apigee X/hybrid analytics: Google's management API (``datalocation``) and the
    signed Cloud Storage URL. Public Google endpoints: the system's trust roots and no client certificate,
    not ``tenant.tls``, which is for the runtime's own (often private) CA and mTLS."""
    return httpx.AsyncClient(
        timeout=timeout,
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=4),
        follow_redirects=False,
    )


class ApigeeClient:
    def __init__(
        self, http: httpx.AsyncClient, remote_service_api: str, authorizer: Authorizer,
        metrics: Metrics, org: str, env: str,
    ) -> None:  # fmt: skip
        self._http = http
        self._base = remote_service_api.rstrip("/")
        self._authorizer = authorizer
        self._metrics = metrics
        self._org = org
        self._env = env

    async def _call(
        self, api: str, method: str, url: str, *, authorize: bool = True, **kwargs: Any
    ) -> httpx.Response:
        headers = {**JSON_HEADERS, **kwargs.pop("headers", {})}
        if authorize:
            headers["Authorization"] = self._authorizer.authorization()
        started = time.perf_counter()
        code = "error"
        try:
            response = await self._http.request(method, url, headers=headers, **kwargs)
            code = str(response.status_code)
        except httpx.HTTPError as exc:
            raise ApigeeUnavailable(f"{method} {api}: {type(exc).__name__}") from exc
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.apigee_requests.labels(self._org, self._env, api, code, method).observe(elapsed)
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise ApigeeUnavailable(f"{method} {api}: HTTP {status}", retry_after(response))
        if len(response.content) > MAX_BODY_BYTES:
            raise ApigeeUnavailable(f"{method} {api}: body over {MAX_BODY_BYTES} bytes")
        return response

    async def products(self, etag: str | None = None) -> ProductsResponse:
        """``GET {remote_service_api}/products`` with ``If-None-Match``.

        Raises:
            ApigeeUnavailable: transport error, 5xx/408/429, or a body that is not ``{"apiProduct": [...]}``.
            ApigeeRejected: another 4xx (for example bad credentials).
        """
        headers = {"If-None-Match": etag} if etag else {}
        response = await self._call("products", "GET", f"{self._base}/products", headers=headers)
        if response.status_code == 304:
            return ProductsResponse(not_modified=True, etag=etag)
        if response.status_code != 200:
            raise ApigeeRejected(response.status_code, f"GET products: HTTP {response.status_code}")
        body = _json(response, "products")
        # The proxy always sends the list, empty or not: "{}" or another object is an error page, not
        # "no products", and must not wipe the catalog.
        products = body.get("apiProduct") if isinstance(body, dict) else None
        if not isinstance(products, list) or not all(isinstance(p, dict) for p in products):
            raise ApigeeUnavailable('GET products: body is not {"apiProduct": [...]}')
        return ProductsResponse(False, tuple(products), response.headers.get("etag"))

    async def verify_api_key(self, api_key: str) -> VerifyResponse:
        """``POST {remote_service_api}/verifyApiKey`` with ``{"apiKey": key}``.

        A 4xx (Apigee answers 401 with a fault for unknown or revoked keys) means the key is invalid.
        Unlike the Go adapter, a 5xx or a transport error is not a bad key: it raises.

        Raises:
            ApigeeUnavailable: transport error, 5xx/408/429, or a 200 without a token.
        """
        body = json.dumps({"apiKey": api_key}) + "\n"
        response = await self._call("auth", "POST", f"{self._base}/verifyApiKey", content=body)
        if 400 <= response.status_code < 500:
            return VerifyResponse(token=None)
        token = _json(response, "verifyApiKey").get("token") if response.status_code == 200 else None
        if not isinstance(token, str) or not token:
            raise ApigeeUnavailable(f"POST verifyApiKey: HTTP {response.status_code} without a token")
        return VerifyResponse(token=token)

    async def quotas(
        self, identifier: str, weight: int, interval: int, allow: int, time_unit: str
    ) -> QuotaResponse:
        """``POST {remote_service_api}/quotas``: add ``weight`` to bucket ``identifier``, read its count.

        The body is ``{"identifier", "weight", "interval", "allow", "timeUnit"}`` in that order, ints as JSON
        numbers and the time unit lowercased, as the Go adapter sends it.

        Raises:
            ApigeeUnavailable: transport error, 5xx/408/429, or a 200 whose body is not an object with
                integer ``allowed``, ``used``, ``exceeded``, ``expiryTime`` and (unless absent or null)
                ``timestamp``.
            ApigeeRejected: any other status.
        """
        body = {"identifier": identifier, "weight": weight, "interval": interval, "allow": allow,
                "timeUnit": time_unit.lower()}  # fmt: skip
        content = json.dumps(body, separators=(",", ":"))
        response = await self._call("quotas", "POST", f"{self._base}/quotas", content=content)
        status = response.status_code
        if status != 200:
            raise ApigeeRejected(status, f"POST quotas: HTTP {status}")
        answer = _json(response, "quotas")
        if not isinstance(answer, dict):
            raise ApigeeUnavailable("POST quotas: the body is not a JSON object")
        fields: list[Any] = [answer.get(name) for name in ("allowed", "used", "exceeded", "expiryTime")]
        timestamp = answer.get("timestamp")
        fields.append(0 if timestamp is None else timestamp)
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in fields):
            raise ApigeeUnavailable(
                "POST quotas: allowed, used, exceeded, expiryTime or timestamp is not an integer"
            )
        allowed, used, exceeded, expiry_ms, timestamp_ms = fields
        return QuotaResponse(allowed, used, exceeded, expiry_ms / 1000, timestamp_ms / 1000)

    async def jwks(self, url: str) -> dict[str, Any]:
        """``GET {url}``: the remote-token proxy's JWKS (``{runtime}/remote-token/certs``), as a JSON object.

        The object is returned unchecked; ``jwks.RemoteTokenKeys`` picks the usable keys.

        Raises:
            ApigeeUnavailable: transport error, 5xx/408/429, another non-200, a body over 256 KiB, or a body
                that is not a JSON object.
            ApigeeRejected: another 4xx.
        """
        # A public document, maybe on another host: never send our credentials with it.
        response = await self._call("certs", "GET", url, authorize=False)
        status = response.status_code
        if 400 <= status < 500:
            raise ApigeeRejected(status, f"GET certs: HTTP {status}")
        if status != 200:
            raise ApigeeUnavailable(f"GET certs: HTTP {status}")
        if len(response.content) > MAX_JWKS_BYTES:
            raise ApigeeUnavailable(f"GET certs: body over {MAX_JWKS_BYTES} bytes")
        body = _json(response, "certs")
        if not isinstance(body, dict):
            raise ApigeeUnavailable("GET certs: the body is not a JSON object")
        return body


MAX_RETRY_AFTER = 600.0  # a hint longer than this is capped: we never go quiet for longer


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)


def _json(response: httpx.Response, api: str) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApigeeUnavailable(f"{api}: the body is not JSON") from None
