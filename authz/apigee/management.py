"""ManagementClient: the Apigee management API calls behind the key index (Apigee X / hybrid, or Edge).

Apigee X / hybrid (``https://apigee.googleapis.com``), with a Google bearer token:

    GET {base}/v1/organizations/{org}/apps?expand=true&includeCred=true&pageSize=100[&pageToken=T]
        -> {"app": [App...], "nextPageToken": "..."}         every app with its credentials, page by page
    GET {base}/v1/organizations/{org}/developers?expand=true&count=1000[&startKey=EMAIL]
        -> {"developer": [Developer...]}                     by email; startKey is inclusive (Apigee's rule)
    GET {base}/v1/organizations/{org}/apps/{appId}           one App (an early sync after a fallback hit)
    GET {base}/v1/organizations/{org}/developers/{email}     its Developer, when the listing did not have it

Legacy Apigee Edge (SaaS ``https://api.enterprise.apigee.com``, or OPDK's management server), with HTTP
Basic auth of an org user (``basic=(username, password)``): the same JSON shapes, developers and one app
the same calls, but the apps listing has no page token. It pages like the developers listing, by appId:

    GET {base}/v1/organizations/{org}/apps?expand=true&includeCred=true&rows=1000[&startKey=APPID]
        -> {"app": [App...]}                                 by appId; startKey is inclusive

An inclusive listing asks for the next page from the last key it saw, drops that repeated first item and
ends on a page shorter than asked for (the repeated item counted): Apigee's rule for developers, and Edge's
for apps, at most 1,000 a page with expand=true (https://discuss.google.dev/t/get-more-than-1000-app-details/93881).

Google auth: the ``TokenProvider`` of analytics (the analytics service account or Application Default
Credentials; the account needs ``apigee.apps.list``, ``apigee.apps.get``, ``apigee.developers.list`` and
``apigee.developers.get``, e.g. ``roles/apigee.readOnlyAdmin``). Edge: a user with read access to apps
and developers (e.g. the read-only organization administrator role); the Basic header is built once and
never logged. Calls are timed in ``apigee_requests_seconds{api="apps"|"app"|"developers"|"developer"}``.
Errors: transport errors, timeouts, 5xx, 408 and 429 raise ``ApigeeUnavailable``; other non-200 answers
``ApigeeRejected``; a body that is not a JSON object, or a listing that does not advance,
``ApigeeUnavailable`` too (the sync keeps its last index). Credentials in the answers are never logged.
"""

from __future__ import annotations

import base64
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
EDGE_APPS_ROWS: Final = 1000  # apps a page on Apigee Edge: its maximum with expand=true
MAX_PAGES: Final = 10_000  # 10 million apps: a listing that goes on longer is broken
MAX_BODY_BYTES: Final = 64 << 20  # one page of 1,000 expanded apps is a few MB


class ManagementClient:
    """The management calls of one org, authenticated by a Google ``token`` (Apigee X / hybrid) or by
    ``basic=(username, password)`` (Apigee Edge: also switches the apps listing to Edge's paging).

    Raises:
        ValueError: neither or both of ``token`` and ``basic`` given.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        org: str,
        token: TokenProvider | None,
        metrics: Metrics,
        *,
        basic: tuple[str, str] | None = None,
        owns_http: bool = False,
    ) -> None:
        """``owns_http``: ``aclose()`` closes ``http`` (a client made for this one); else its owner does."""
        if (token is None) == (basic is None):
            raise ValueError("ManagementClient needs exactly one of a Google token and Basic credentials")
        self._http = http
        self._base = f"{base_url.rstrip('/')}/v1/organizations/{quote(org, safe='')}"
        self._org = org
        self._token = token
        self._basic = ""  # the whole header value, made once; never logged
        if basic is not None:
            user, password = basic
            self._basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self._metrics = metrics
        self._owns_http = owns_http

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def apps(self) -> AsyncIterator[dict[str, Any]]:
        """Every page of the app listing, in order (on Edge, each page after the first without its first
        app: the previous page's last, since ``startKey`` is inclusive)."""
        if self._token is None:  # Apigee Edge: no page token, an inclusive startKey by appId
            params = {"expand": "true", "includeCred": "true"}
            pages = self._inclusive_pages("apps", "/apps", params, ("rows", EDGE_APPS_ROWS), "app", "appId")
            async for page in pages:
                yield page
            return
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
        params = {"expand": "true"}
        pages = self._inclusive_pages(
            "developers", "/developers", params, ("count", PAGE_SIZE), "developer", "email"
        )
        async for page in pages:
            yield page

    async def app(self, app_id: str) -> dict[str, Any] | None:
        """One app with its credentials; None when Apigee does not know it (404)."""
        return await self._one("app", f"/apps/{quote(app_id, safe='')}")

    async def developer(self, email_or_id: str) -> dict[str, Any] | None:
        """One developer, by email or developerId; None when Apigee does not know it (404)."""
        return await self._one("developer", f"/developers/{quote(email_or_id, safe='@')}")

    async def _one(self, api: str, path: str) -> dict[str, Any] | None:
        try:
            return await self._get(api, path, {})
        except ApigeeRejected as exc:
            if exc.status == 404:
                return None
            raise

    async def _inclusive_pages(
        self,
        api: str,
        path: str,
        params: dict[str, str],
        limit: tuple[str, int],
        field: str,
        key: str,
    ) -> AsyncIterator[dict[str, Any]]:
        """Page a listing whose ``startKey`` is inclusive: the next page starts at the last ``key`` seen,
        whose repeat is checked and dropped; a page shorter than the limit (the repeat counted) is the last.

        Args:
            api: the ``api`` label and the start of error messages ("apps", "developers").
            path: under the org, e.g. "/developers".
            params: the query of every page, without the limit and ``startKey``.
            limit: the page-size parameter and its value, e.g. ("count", 1000).
            field: the list in each answer, e.g. "developer"; pages are yielded with it trimmed.
            key: the item field ``startKey`` names, e.g. "email".

        Raises:
            ApigeeUnavailable: a page without its ``startKey`` first, a full page whose last item has no
                key, more than ``MAX_PAGES`` pages, or any error of ``_get``.
        """
        name, size = limit
        start: str | None = None
        for _ in range(MAX_PAGES):
            query = {**params, name: str(size)}
            if start is not None:
                query["startKey"] = start
            page = await self._get(api, path, query)
            items = page.get(field, [])
            if not isinstance(items, list):
                raise ApigeeUnavailable(f"{api}: {field!r} is not a list")
            if start is not None:
                if not items or not isinstance(items[0], dict) or items[0].get(key) != start:
                    raise ApigeeUnavailable(f"{api}: a page that does not start at its startKey")
                items = items[1:]
            yield {**page, field: items}
            last = items[-1] if items else None
            if len(items) + (start is not None) < size or not isinstance(last, dict):
                return
            following = last.get(key)
            if not isinstance(following, str) or not following:
                raise ApigeeUnavailable(f"{api}: the last {field} of a page has no {key}")
            start = following
        raise ApigeeUnavailable(f"{api}: more than {MAX_PAGES} pages")

    async def _authorization(self) -> str:
        if self._token is None:
            return self._basic
        return f"Bearer {await self._token()}"

    async def _get(self, api: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Authorization": await self._authorization()}
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
