"""JwksSource: a non-Apigee issuer's JWKS over HTTP, found by OIDC discovery unless ``jwks_uri`` is given.

Discovery reads ``{issuer}/.well-known/openid-configuration`` and trusts it only when its ``issuer`` is the
configured one, character for character (OIDC Discovery 1.0 §4.3, RFC 8414 §3.3), and its ``jwks_uri`` is
https (http only on loopback, for tests). The discovered URI is kept until a JWKS fetch fails. Every GET
is public: no credentials (even if the shared client has default ones), no redirects (3xx is a failure,
J27), status 200 only, a JSON object only, and a body cap enforced while reading, so a huge or endless
body is cut off (S-07). Failures raise ``FetchError`` with a short message, never the body. Besides
``authz.apigee``, this is the only module that imports httpx.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import httpx

from authz.errors import AuthzError
from authz.metrics import Metrics

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_DISCOVERY_BYTES = 64 * 1024
MAX_JWKS_BYTES = 256 * 1024  # a JWKS holds a handful of keys; anything bigger is not one
MAX_URL_CHARS = 2048
# Headers a shared client may add by default that must never reach a third-party key server.
_PRIVATE_HEADERS = ("authorization", "proxy-authorization", "cookie")
# identity: the cap counts decoded bytes, and a compressed body could expand far beyond one read.
_REQUEST_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


class FetchError(AuthzError):
    """A discovery document or JWKS that could not be fetched or used; the last good keys stay."""

    code = "fetch_error"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def usable_jwks_uri(uri: object) -> TypeGuard[str]:
    """An absolute https URL without credentials (http only for a loopback host)."""
    if not isinstance(uri, str) or len(uri) > MAX_URL_CHARS:
        return False
    try:
        parts = urlsplit(uri)
        port_ok = parts.port is None or parts.port > 0  # .port raises ValueError when it is not a number
    except ValueError:
        return False
    host = parts.hostname
    if not host or not port_ok or parts.username is not None or parts.password is not None:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host))


def new_http_client(timeout: float) -> httpx.AsyncClient:
    """The client for issuers' keys: default TLS verification (never the Apigee tenant's TLS settings,
    whose custom CA, client certificate or ``allow_unverified_ssl_cert`` are for Apigee only)."""
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)


class JwksSource:
    """The ``fetch`` of a ``JwksCache``: ``await source()`` is the issuer's JWKS document.

    ``metrics`` is not used yet: outbound calls are logged (DEBUG), not counted, until metrics.py has a
    series for them.
    """

    def __init__(
        self, http: httpx.AsyncClient, issuer: str, jwks_uri: str | None = None, *,
        metrics: Metrics, org: str, provider: str,
    ) -> None:  # fmt: skip
        self._http = http
        self._issuer = issuer
        self._configured = jwks_uri
        self._jwks_uri = jwks_uri  # the configured or the discovered URI; None = discover first
        self._metrics = metrics
        self._org = org
        self._provider = provider

    async def __call__(self) -> dict[str, Any]:
        """The JWKS as a JSON object (its keys unchecked: ``parse_jwks`` does that).

        Raises:
            FetchError: discovery or the JWKS GET failed (transport, non-200, over the cap, not an object).
        """
        uri = self._jwks_uri or await self._discover()
        try:
            return await self._get_object(uri, MAX_JWKS_BYTES, "JWKS")
        except FetchError:
            if self._configured is None:
                self._jwks_uri = None  # the issuer may have moved its keys: ask discovery again next time
            raise

    async def _discover(self) -> str:
        url = self._issuer.rstrip("/") + DISCOVERY_PATH
        document = await self._get_object(url, MAX_DISCOVERY_BYTES, "discovery")
        if document.get("issuer") != self._issuer:  # exact: no trailing-slash or case folding
            raise FetchError("discovery: its issuer is not the configured one")
        uri = document.get("jwks_uri")
        if not usable_jwks_uri(uri):
            raise FetchError("discovery: jwks_uri is missing or not an https URL")
        log.info("JWKS of %s: discovered at %s", self._provider, uri)
        self._jwks_uri = uri
        return uri

    async def _get_object(self, url: str, cap: int, what: str) -> dict[str, Any]:
        started = time.perf_counter()
        status = "error"
        try:
            request = self._http.build_request("GET", url, headers=_REQUEST_HEADERS)
            for name in _PRIVATE_HEADERS:
                request.headers.pop(name, None)
            response = await self._http.send(request, stream=True, auth=None, follow_redirects=False)
            try:
                status = str(response.status_code)
                body = await _read_capped(response, cap, what)
            finally:
                await response.aclose()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"GET {what}: {type(exc).__name__}") from exc
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            log.debug("JWKS of %s: GET %s: %s in %.1f ms", self._provider, what, status, elapsed)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise FetchError(f"GET {what}: the body is not JSON") from None
        if not isinstance(document, dict):
            raise FetchError(f"GET {what}: the body is not a JSON object")
        return document


async def _read_capped(response: httpx.Response, cap: int, what: str) -> bytes:
    """The body, read no further than ``cap`` bytes; a redirect or another non-200 is refused unread."""
    if response.status_code != 200:
        raise FetchError(f"GET {what}: HTTP {response.status_code}")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise FetchError(f"GET {what}: Content-Length over {cap} bytes")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > cap:
            raise FetchError(f"GET {what}: body over {cap} bytes")
    return bytes(body)
