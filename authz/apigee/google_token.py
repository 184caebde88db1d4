"""GoogleTokens: the Google OAuth2 access token for Apigee X/hybrid analytics (reference §2.2, §3.0, §3.4).

The ``gcp`` ``AnalyticsClient`` calls ``datalocation`` on the Apigee management API with a Google bearer
token. Credentials, in the Go adapter's order:

1. the analytics service account: ``client_secret.json`` of the analytics Secret (``config.
   analytics_secret_json``), exchanged at its ``token_uri`` for an access token (JWT-bearer grant, scope
   ``cloud-platform``);
2. else Application Default Credentials (``google.auth.default``): ``GOOGLE_APPLICATION_CREDENTIALS``,
   gcloud's ADC file, or the metadata server of GCE/GKE, which is how GKE Workload Identity works.

google-auth is synchronous (``requests``), so every refresh and the ADC search run in a worker thread, one
at a time: concurrent callers share the refresh in flight (single flight), and a cancelled caller does not
cancel it. A token is reused until ``REFRESH_MARGIN`` before it expires (half its lifetime for short-lived
ones), measured on the injected ``Clock``. Every HTTP call google-auth makes through here is bounded by
``timeout`` (google-auth's own default is 120 s).

Errors are ``ApigeeUnavailable``, so the uploader backs off and the files stay staged: transport errors and
retryable token-endpoint answers plainly; credentials the token endpoint refuses (``invalid_grant``, a
deleted key, ...) and no credentials at all with the 5-minute ``CREDENTIALS_PAUSE``, like a 401/403 from
``datalocation``. Neither the token nor the key is ever logged or put in an error message. Each refresh is
timed in ``apigee_requests_seconds{api="token"}`` (code ``200`` or ``error``: google-auth hides the status).
Imports google-auth and requests (its transport); no httpx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import google.auth
import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.auth.credentials import Credentials
from google.oauth2 import service_account

from authz.apigee.analytics import CREDENTIALS_PAUSE
from authz.clock import Clock
from authz.errors import ApigeeUnavailable
from authz.metrics import Metrics

log = logging.getLogger(__name__)

SCOPES: Final = ("https://www.googleapis.com/auth/cloud-platform",)
REFRESH_MARGIN: Final = 300.0  # seconds before expiry that a token is refreshed (tokens live 3600 s)
DEFAULT_TIMEOUT: Final = 30.0  # seconds per HTTP call, like tenant.client_timeout
MAX_DETAIL: Final = 200  # characters of a google-auth error kept in our message


class _Request(google.auth.transport.requests.Request):
    """google-auth's requests transport with our timeout instead of its 120 s default."""

    def __init__(self, timeout: float) -> None:
        super().__init__(session=requests.Session())
        self._timeout = timeout

    def __call__(
        self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
        timeout: float | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        timeout = timeout or self._timeout
        return super().__call__(url, method, body, headers, timeout=timeout, **kwargs)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.session.close()


def service_account_credentials(info_json: str) -> Credentials:
    """Credentials from the analytics Secret's ``client_secret.json``: a service-account key, what
    ``apigee-remote-service-cli provision --analytics-sa`` puts there.

    The Go adapter's ``google.CredentialsFromJSON`` takes any credential type; here other types (user or
    external-account configs, which can name files, URLs or commands to run) are refused, as google-auth
    advises for configs from outside: those belong in Application Default Credentials.

    Raises:
        ValueError: not JSON, not a service-account key, or one google-auth cannot use (the message names
            no secret).
    """
    try:
        info = json.loads(info_json)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(info, Mapping):
        raise ValueError("not a JSON object")
    if info.get("type") != "service_account":
        kind = json.dumps(info.get("type"))[:40]
        raise ValueError(
            f'"type" is {kind}, not "service_account" (other credentials: leave the analytics Secret out '
            "and use Application Default Credentials)"
        )
    try:
        creds: Credentials = service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
    except (ValueError, KeyError, TypeError, google.auth.exceptions.GoogleAuthError) as exc:
        # google-auth's messages name missing fields; never the key itself.
        raise ValueError(f"not usable Google credentials ({type(exc).__name__}: {_detail(exc)})") from None
    return creds


class GoogleTokens:
    """An async token provider (``authz.apigee.analytics.TokenProvider``): ``await tokens()`` -> token.

    Args:
        clock: reads ``monotonic()`` for the token's freshness.
        credentials: the service account's (see ``service_account_credentials``); None: look for
            Application Default Credentials at ``load()`` (or at the first call).
        timeout: seconds per HTTP call of google-auth.
        metrics, org: where refreshes are timed (none without metrics).
    """

    def __init__(
        self, clock: Clock, credentials: Credentials | None = None, *, timeout: float = DEFAULT_TIMEOUT,
        metrics: Metrics | None = None, org: str = "",
    ) -> None:  # fmt: skip
        self._clock = clock
        self._metrics = metrics
        self._org = org
        self._credentials = credentials
        self._searched = credentials is not None  # ADC looked for (or not needed)
        self.source = "service_account" if credentials is not None else "none"
        self._request = _Request(timeout)
        self._token: str | None = None
        self._fresh_until = 0.0  # monotonic
        self._flight: asyncio.Task[str] | None = None
        self._search: asyncio.Task[bool] | None = None

    async def load(self) -> bool:
        """Find credentials: the service account's, else ADC (searched once, in a worker thread).

        Returns:
            Whether there are credentials. ADC errors other than "none found" (a malformed file named by
            ``GOOGLE_APPLICATION_CREDENTIALS``, say) are logged and count as none.
        """
        if not self._searched:
            if self._search is None:
                self._search = asyncio.create_task(self._find_default(), name="google-adc")
            await asyncio.shield(self._search)
        return self._credentials is not None

    async def __call__(self) -> str:
        """A current access token (no ``Bearer`` prefix).

        Raises:
            ApigeeUnavailable: no credentials, the token endpoint refused them or could not be reached.
        """
        if self._token is not None and self._clock.monotonic() < self._fresh_until:
            return self._token
        if self._flight is None:
            self._flight = asyncio.create_task(self._refresh(), name="google-token-refresh")
            self._flight.add_done_callback(self._landed)
        return await asyncio.shield(self._flight)

    def close(self) -> None:
        """Close the HTTP session. A refresh still running in its worker thread (bounded by ``timeout``)
        may then fail; nothing waits for it."""
        self._request.close()

    async def _find_default(self) -> bool:
        try:
            creds, project = await asyncio.to_thread(google.auth.default, SCOPES, self._request)
        except (google.auth.exceptions.GoogleAuthError, ValueError, OSError) as exc:
            if "default credentials were not found" not in str(exc):  # found but unusable: say why
                log.warning("Google Application Default Credentials unusable: %s", _detail(exc))
            return False
        finally:
            self._searched = True
        self._credentials = creds
        self.source = f"application default credentials ({type(creds).__module__}.{type(creds).__name__})"
        log.info("Google credentials for analytics: %s, project %s", self.source, project or "-")
        return True

    async def _refresh(self) -> str:
        if not await self.load():
            raise ApigeeUnavailable(
                "no Google credentials (analytics Secret or Application Default Credentials)",
                CREDENTIALS_PAUSE,
            )
        creds = self._credentials
        assert creds is not None
        started = self._clock.monotonic()
        timer, code = time.perf_counter(), "error"
        try:
            token, expiry = await asyncio.to_thread(self._refresh_sync, creds)
            code = "200"
        except google.auth.exceptions.RefreshError as exc:
            # Retryable: the token endpoint's 5xx/429 (after google-auth's own retries). Otherwise the
            # endpoint refused these credentials: pause uploads as for a 401/403 from datalocation.
            pause = None if getattr(exc, "retryable", False) else CREDENTIALS_PAUSE
            raise ApigeeUnavailable(f"Google token refresh: {_detail(exc)}", pause) from None
        except (google.auth.exceptions.GoogleAuthError, requests.RequestException) as exc:
            raise ApigeeUnavailable(f"Google token refresh: {type(exc).__name__}: {_detail(exc)}") from None
        finally:
            if self._metrics is not None:
                elapsed = time.perf_counter() - timer
                self._metrics.apigee_requests.labels(self._org, "", "token", code, "POST").observe(elapsed)
        lifetime = float("inf") if expiry is None else expiry - time.time()  # google-auth's own wall clock
        margin = min(REFRESH_MARGIN, lifetime / 2)
        self._token, self._fresh_until = token, started + lifetime - margin
        log.debug("Google access token refreshed, valid for %.0f s", lifetime)
        return token

    def _refresh_sync(self, creds: Credentials) -> tuple[str, float | None]:
        """In a worker thread: refresh, then read what it set (nothing else touches ``creds`` meanwhile)."""
        creds.refresh(self._request)
        token = creds.token
        if not isinstance(token, str) or not token:
            raise google.auth.exceptions.RefreshError("no access token in the answer")
        expiry: datetime | None = creds.expiry  # naive UTC
        return token, None if expiry is None else expiry.replace(tzinfo=UTC).timestamp()

    def _landed(self, task: asyncio.Task[str]) -> None:
        self._flight = None
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have been cancelled meanwhile


def _detail(exc: BaseException) -> str:
    """The first argument of a google-auth error (RefreshError adds the response body as the second),
    shortened. Token-endpoint answers carry an error code and description, never a token."""
    first = exc.args[0] if exc.args else ""
    return str(first)[:MAX_DETAIL] or type(exc).__name__
