"""ManagementClient: the Apigee management API calls behind the key index (Apigee X / hybrid shapes).

    GET {base}/v1/organizations/{org}/apps?expand=true&includeCred=true&pageSize=100[&pageToken=T]
        -> {"app": [App...], "nextPageToken": "..."}         every app with its credentials, page by page
    GET {base}/v1/organizations/{org}/developers?expand=true&count=1000[&startKey=EMAIL]
        -> {"developer": [Developer...]}                     by email; startKey is inclusive (Apigee's rule)
    GET {base}/v1/organizations/{org}/apps/{appId}           one App (an early sync after a fallback hit)

Each call carries a Google bearer token (the ``TokenProvider`` of analytics: the analytics service account
or Application Default Credentials; the account needs ``apigee.apps.list``, ``apigee.apps.get`` and
``apigee.developers.list``, e.g. ``roles/apigee.readOnlyAdmin``). Calls are timed in
``apigee_requests_seconds{api="apps"|"app"|"developers"}``. Errors: transport errors, timeouts, 5xx, 408
and 429 raise ``ApigeeUnavailable``; other non-200 answers ``ApigeeRejected``; a body that is not a JSON
object, or a listing that does not advance, ``ApigeeUnavailable`` too (the sync keeps its last index).
Credentials in the answers are never logged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import quote

import httpx

from authz.apigee.analytics import TokenProvider
from authz.apigee.client import retry_after
from authz.errors import ApigeeRejected, ApigeeUnavailable
from authz.metrics import Metrics

PAGE_SIZE: Final = 1000  # developers a page: Apigee's maximum
APPS_PAGE_SIZE: Final = 100  # apps a page: Apigee X's maximum (larger sizes are cut to it)
MAX_PAGES: Final = 10_000  # 10 million apps: a listing that goes on longer is broken
MAX_BODY_BYTES: Final = 64 << 20  # one page of 1,000 expanded apps is a few MB


class ManagementClient:
    def __init__(
        self, http: httpx.AsyncClient, base_url: str, org: str, token: TokenProvider, metrics: Metrics
    ) -> None:
        self._http = http
        self._base = f"{base_url.rstrip('/')}/v1/organizations/{quote(org, safe='')}"
        self._org = org
        self._token = token
        self._metrics = metrics

    async def apps(self) -> AsyncIterator[dict[str, Any]]:
        """Every page of the app listing, in order."""
        token: str | None = None
        for _ in range(MAX_PAGES):
            params = {"expand": "true", "includeCred": "true", "pageSize": str(APPS_PAGE_SIZE)}
            if token:
                params["pageToken"] = token
            page = await self._get("apps", "/apps", params)
            yield page
            following = page.get("nextPageToken")
            if not isinstance(following, str) or not following:
                return
            if following == token:
                raise ApigeeUnavailable("apps: the listing returned the same page token twice")
            token = following
        raise ApigeeUnavailable(f"apps: more than {MAX_PAGES} pages")

    async def developers(self) -> AsyncIterator[dict[str, Any]]:
        """Every page of the developer listing; each page after the first without its first developer
        (the previous page's last, since ``startKey`` is inclusive)."""
        start: str | None = None
        for _ in range(MAX_PAGES):
            params = {"expand": "true", "count": str(PAGE_SIZE)}
            if start is not None:
                params["startKey"] = start
            page = await self._get("developers", "/developers", params)
            items = page.get("developer", [])
            if not isinstance(items, list):
                raise ApigeeUnavailable("developers: 'developer' is not a list")
            if start is not None:
                if not items or not isinstance(items[0], dict) or items[0].get("email") != start:
                    raise ApigeeUnavailable("developers: a page that does not start at its startKey")
                items = items[1:]
            yield {**page, "developer": items}
            last = items[-1] if items else None
            if len(items) + (start is not None) < PAGE_SIZE or not isinstance(last, dict):
                return
            email = last.get("email")
            if not isinstance(email, str) or not email:
                raise ApigeeUnavailable("developers: the last developer of a page has no email")
            start = email
        raise ApigeeUnavailable(f"developers: more than {MAX_PAGES} pages")

    async def app(self, app_id: str) -> dict[str, Any] | None:
        """One app with its credentials; None when Apigee does not know it (404)."""
        try:
            return await self._get("app", f"/apps/{quote(app_id, safe='')}", {})
        except ApigeeRejected as exc:
            if exc.status == 404:
                return None
            raise

    async def _get(self, api: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Authorization": f"Bearer {await self._token()}"}
        started, code = time.perf_counter(), "error"
        try:
            response = await self._http.get(f"{self._base}{path}", params=params, headers=headers)
            code = str(response.status_code)
        except httpx.HTTPError as exc:
            raise ApigeeUnavailable(f"GET {api}: {type(exc).__name__}") from exc
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.apigee_requests.labels(self._org, "", api, code, "GET").observe(elapsed)
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise ApigeeUnavailable(f"GET {api}: HTTP {status}", retry_after(response))
        if status != 200:
            raise ApigeeRejected(status, f"GET {api}: HTTP {status}")
        if len(response.content) > MAX_BODY_BYTES:
            raise ApigeeUnavailable(f"GET {api}: answer over {MAX_BODY_BYTES} bytes")
        try:
            body = response.json()
        except ValueError:
            raise ApigeeUnavailable(f"GET {api}: not JSON") from None
        if not isinstance(body, dict):
            raise ApigeeUnavailable(f"GET {api}: not a JSON object")
        return body
