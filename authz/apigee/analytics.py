"""AnalyticsClient: the HTTP calls that hand analytics records to Apigee (reference §3.4, §3.5), or in
standalone mode to the user's own HTTP endpoint.

Four kinds, fixed at construction:

* ``gcp`` (Apigee X / hybrid): ``GET {base}/v1/organizations/{org}/environments/{env}/datalocation`` with a
  Google bearer token (``base`` is ``https://apigee.googleapis.com`` in production), then ``PUT`` the gzip
  file to the signed URL with **no** Authorization header (GCS refuses a second auth mechanism).
* ``legacy`` (legacy SaaS, OPDK without ``legacy_endpoint``): ``GET {internal_api}/analytics/organization/
  {org}/environment/{env}?encrypt=true&file_content_type=application/x-gzip&relative_file_path=..&tenant=
  {org}~{env}`` with the Basic header, then ``PUT`` with ``Content-Type: application/x-gzip`` and
  ``x-amz-server-side-encryption: AES256``. The Go adapter keeps the Basic header on that PUT wherever the
  URL points; this client sends it only when the signed URL has the same origin as ``internal_api``, so the
  tenant's credentials never go to a storage host.
* ``axpublisher`` (OPDK, ``analytics.legacy_endpoint: true``): ``POST {internal_api}/axpublisher/
  organization/{org}/environment/{env}`` with ``{"organization", "environment", "records": [...]}``.
* ``endpoint`` (standalone, ``analytics.endpoint``): ``POST`` the staged file as is to that URL, with
  ``Content-Type: application/x-ndjson``, ``Content-Encoding: gzip``, ``x-apigee-organization``,
  ``x-apigee-environment`` and ``x-analytics-file`` (the staged file's name, the same on every retry, so a
  receiver can drop a file it already has). No Authorization header. Any 2xx confirms the file.

Every call is timed in ``apigee_requests_seconds{org,env,api="analytics",code,method}`` under the file's
own tenant. Errors follow the tree in ``authz.errors``: transport errors, timeouts, 5xx, 408 and 429 raise
``ApigeeUnavailable`` (with Apigee's ``Retry-After``); any other answer that is not the one expected (a
4xx, a redirect, a PUT answered with anything but exactly 200, an endpoint POST answered other than 2xx)
raises ``ApigeeRejected(status)``, except 401/403 on our own call (the signed-URL GET, the axpublisher POST,
the endpoint POST, which may sit behind an authenticating proxy): refused credentials are
not the file's fault, so they raise ``ApigeeUnavailable`` with a 5-minute ``retry_after`` and uploads pause;
a 200 without a usable ``{"url": ...}`` raises ``ApigeeUnavailable``. Nothing here retries or deletes
files: the uploader (``authz.analytics.uploader``) owns that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx

from authz.apigee.client import retry_after
from authz.apigee.signer import Authorizer
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import Metrics

log = logging.getLogger(__name__)

Kind = Literal["gcp", "legacy", "axpublisher", "endpoint"]
TokenProvider = Callable[[], Awaitable[str]]
"""Returns a current Google OAuth2 access (or ID) token, without the ``Bearer`` prefix."""

GCP_ANALYTICS_BASE = "https://apigee.googleapis.com"  # the Go adapter forces this base in GCP mode
GZIP = "application/x-gzip"
NDJSON = "application/x-ndjson"
ENDPOINT_TIMEOUT = 30.0  # seconds per socket operation on the analytics.endpoint client
MAX_URL_BODY_BYTES = 64 * 1024  # a {"url": ...} answer is a few hundred bytes
API = "analytics"  # the api label of apigee_requests_seconds


def new_endpoint_http_client() -> httpx.AsyncClient:
    """The HTTP client of the ``endpoint`` kind: the system's trust roots, no client certificate,
    ``ENDPOINT_TIMEOUT``, no redirects (a 3xx is not a confirmation)."""
    return httpx.AsyncClient(
        timeout=ENDPOINT_TIMEOUT,
        limits=httpx.Limits(max_connections=8, max_keepalive_connections=2),
        follow_redirects=False,
    )


class AnalyticsClient:
    """Uploads analytics to Apigee (or the standalone endpoint) for any tenant; the tenant (org, env) is an
    argument of every call.

    Args:
        http: the shared client (timeout, TLS and pool from ``new_http_client``); no auth of its own.
        kind: which of the four protocols above to speak.
        base_url: ``tenant.internal_api`` for ``legacy`` and ``axpublisher``; the Google API base for
            ``gcp`` (``GCP_ANALYTICS_BASE`` in production, the fake's URL in tests); for ``endpoint`` the
            URL itself (``analytics.endpoint``), used exactly as given.
        metrics: where calls are timed.
        authorizer: the Basic (or internal JWT) Authorization for ``legacy`` and ``axpublisher``.
        token: the Google bearer token provider for ``gcp``.
        owns_http: ``aclose()`` closes ``http`` (a client made for this one, like the ``endpoint``'s from
            ``new_endpoint_http_client``); a shared client is closed by its owner.

    Raises:
        ValueError: the credentials the kind needs are missing.
    """

    def __init__(
        self, http: httpx.AsyncClient, kind: Kind, base_url: str, metrics: Metrics, *,
        authorizer: Authorizer | None = None, token: TokenProvider | None = None, owns_http: bool = False,
    ) -> None:  # fmt: skip
        if kind == "gcp" and token is None:
            raise ValueError("the gcp analytics client needs a token provider")
        if kind in ("legacy", "axpublisher") and authorizer is None:
            raise ValueError(f"the {kind} analytics client needs an authorizer")
        self._http = http
        self.kind: Kind = kind
        self._base = base_url.rstrip("/")
        self._endpoint = base_url
        self._origin = _origin(httpx.URL(self._base))
        self._metrics = metrics
        self._authorizer = authorizer
        self._token = token
        self._owns_http = owns_http

    async def aclose(self) -> None:
        """Close the HTTP client if this client owns it (``owns_http``); otherwise nothing."""
        if self._owns_http:
            await self._http.aclose()

    def relative_name(self, org: str, env: str, path: Path, now: float) -> str:
        """The ``relative_file_path`` for one upload attempt of ``path`` at ``now`` (epoch seconds).

        ``gcp``: ``{unix}.api.{org}.{env}.{uuid4}.gz`` (a fresh uuid per attempt). ``legacy``:
        ``date=YYYY-MM-DD/time=HH-MM-00/{file name}``. The Go adapter formats that partition in local time;
        here it is UTC, which is what the Go adapter sends from a container anyway and does not depend on
        the host's zone. ``axpublisher`` has no files, and ``endpoint`` sends the file as staged: the file
        name (stable across retries).
        """
        if self.kind == "gcp":
            return f"{int(now)}.api.{org}.{env}.{uuid.uuid4()}.gz"
        if self.kind == "legacy":
            at = datetime.fromtimestamp(now, UTC)
            return f"date={at:%Y-%m-%d}/time={at:%H-%M}-00/{path.name}"
        return path.name

    async def upload(self, org: str, env: str, path: Path, relative_name: str) -> None:
        """Upload one gzip NDJSON file for (org, env): through a signed URL, where only exactly 200 confirms
        it, or (``endpoint``) in one POST, where any 2xx does.

        Raises:
            OSError: ``path`` cannot be read (``FileNotFoundError`` when it is gone).
            ApigeeUnavailable: transport error, timeout, 5xx/408/429, no usable signed URL, or 401/403 on
                our own call (with the credentials pause).
            ApigeeRejected: any other status (for example 404 on the GET, 403 on the PUT, 400 on the POST).
            ValueError: the client is of kind ``axpublisher``.
        """
        if self.kind == "axpublisher":
            raise ValueError("an axpublisher client publishes records; it does not upload files")
        content = await asyncio.to_thread(path.read_bytes)
        if self.kind == "endpoint":
            await self._post_file(org, env, content, relative_name)
            return
        url = await self._signed_url(org, env, relative_name)
        headers: dict[str, str] = {}
        if self.kind == "legacy":
            headers = {"Content-Type": GZIP, "x-amz-server-side-encryption": "AES256"}
            if _origin(url) == self._origin:
                headers["Authorization"] = self._authorization()
        # httpx sets Content-Length for a bytes body; the client has no auth, so GCS gets no Authorization.
        response = await self._send(org, env, "PUT", url, content=content, headers=headers)
        if response.status_code != 200:  # the Go adapter confirms an upload by exactly 200
            raise ApigeeRejected(response.status_code, f"PUT signed URL: HTTP {response.status_code}")

    async def publish(self, org: str, env: str, records: Sequence[dict[str, Any]]) -> None:
        """``POST {internal_api}/axpublisher/organization/{org}/environment/{env}``; returns on 200.

        Raises:
            ApigeeUnavailable: transport error, timeout, 5xx/408/429.
            ApigeeRejected: any other status.
            ValueError: the client is not of kind ``axpublisher``.
        """
        if self.kind != "axpublisher":
            raise ValueError(f"a {self.kind} client uploads files; it does not publish records")
        body = {"organization": org, "environment": env, "records": list(records)}
        url = f"{self._base}/axpublisher/organization/{org}/environment/{env}"
        headers = {"Content-Type": "application/json", "Authorization": self._authorization()}
        content = json.dumps(body, separators=(",", ":")).encode()
        response = await self._send(org, env, "POST", url, content=content, headers=headers)
        _check_credentials(response.status_code, "POST axpublisher")
        if response.status_code != 200:
            raise ApigeeRejected(response.status_code, f"POST axpublisher: HTTP {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("rejected"):
            log.warning(
                "axpublisher %s~%s rejected %s of %d records", org, env, answer.get("rejected"), len(records)
            )

    async def _post_file(self, org: str, env: str, content: bytes, relative_name: str) -> None:
        """``endpoint``: the gzip file as the body of one POST; 2xx confirms it."""
        headers = {
            "Content-Type": NDJSON,
            "Content-Encoding": "gzip",
            "x-apigee-organization": org,
            "x-apigee-environment": env,
            "x-analytics-file": relative_name,
        }
        response = await self._send(org, env, "POST", self._endpoint, content=content, headers=headers)
        _check_credentials(response.status_code, "POST endpoint")
        if not 200 <= response.status_code < 300:
            raise ApigeeRejected(response.status_code, f"POST endpoint: HTTP {response.status_code}")

    async def _signed_url(self, org: str, env: str, relative_name: str) -> httpx.URL:
        if self.kind == "gcp":
            assert self._token is not None
            url = f"{self._base}/v1/organizations/{org}/environments/{env}/datalocation"
            params = {"dataset": "api", "relative_file_path": relative_name, "repo": "edge"}
            headers = {"Authorization": f"Bearer {await self._token()}", "Accept": "application/json"}
        else:  # the Go adapter's query, keys in url.Values.Encode() (sorted) order
            url = f"{self._base}/analytics/organization/{org}/environment/{env}"
            params = {"encrypt": "true", "file_content_type": GZIP, "relative_file_path": relative_name,
                      "tenant": f"{org}~{env}"}  # fmt: skip
            headers = {"Authorization": self._authorization(), "Accept": "application/json"}
        response = await self._send(org, env, "GET", url, params=params, headers=headers)
        status = response.status_code
        _check_credentials(status, "GET signed URL")
        if status != 200:
            raise ApigeeRejected(status, f"GET signed URL: HTTP {status}")
        if len(response.content) > MAX_URL_BODY_BYTES:
            raise ApigeeUnavailable(f"GET signed URL: body over {MAX_URL_BODY_BYTES} bytes")
        try:
            signed = response.json().get("url")
            parsed = httpx.URL(signed)
        except (ValueError, AttributeError, TypeError, httpx.InvalidURL):
            raise ApigeeUnavailable('GET signed URL: the body is not {"url": "..."}') from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ApigeeUnavailable("GET signed URL: not an absolute http(s) URL")
        return parsed

    def _authorization(self) -> str:
        assert self._authorizer is not None
        return self._authorizer.authorization()

    async def _send(
        self, org: str, env: str, method: str, url: str | httpx.URL, **kwargs: Any
    ) -> httpx.Response:
        """One timed request; transport errors and the transient statuses raise ``ApigeeUnavailable``."""
        started = time.perf_counter()
        code = "error"
        try:
            response = await self._http.request(method, url, **kwargs)
            code = str(response.status_code)
        except httpx.HTTPError as exc:
            raise ApigeeUnavailable(f"{method} {API}: {type(exc).__name__}") from exc
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.apigee_requests.labels(org, env, API, code, method).observe(elapsed)
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise ApigeeUnavailable(f"{method} {API}: HTTP {status}", retry_after(response))
        return response


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


CREDENTIALS_PAUSE = 300.0  # seconds: uploads wait this long after Apigee refused our credentials


def _check_credentials(status: int, call: str) -> None:
    """401/403 from our own authenticated call is about the credentials, not the file: pause uploads
    (transient, with a long wait) instead of quarantining every staged file."""
    if status in (401, 403):
        problem = f"{call}: HTTP {status}: credentials refused, uploads paused"
        raise ApigeeUnavailable(problem, CREDENTIALS_PAUSE)
