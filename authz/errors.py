"""The service's exception hierarchy; each class carries a stable ``code``.

    AuthzError
    ├── ConfigError            bad config or catalog file: names the file, the key and the problem
    ├── CatalogError           a local catalog that cannot be loaded (a ConfigError subclass)
    ├── ListenError            a port that cannot be opened at start-up
    └── ApigeeError            a call to Apigee's remote-service API that did not give a usable answer
        ├── ApigeeUnavailable  transport error, timeout, 5xx, 429 or a malformed body: retry later
        └── ApigeeRejected     any other 4xx: Apigee refused the request (bad credentials, bad input)

Check never raises to grpc: its one error boundary (server/authorization.py) turns any exception into an
explicit 503 deny with reason ``internal_error``.

The codes are reused as the ``reason`` label of metrics and in deny bodies, so they never change.
This module imports nothing from the project.
"""

from __future__ import annotations

from typing import ClassVar


class AuthzError(Exception):
    """Base of every error this service raises on purpose."""

    code: ClassVar[str] = "internal_error"


class ConfigError(AuthzError):
    """A config (or catalog) file that cannot be used: ``{file}: {key}: {problem}``."""

    code = "config_error"

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class CatalogError(ConfigError):
    """A local catalog file that cannot be loaded; the last good catalog stays in use."""

    code = "catalog_error"


class ListenError(AuthzError):
    """A listener that cannot be opened (port in use, no permission); start-up fails with exit code 1."""

    code = "listen_error"


class ApigeeError(AuthzError):
    """Apigee did not give a usable answer."""

    code = "apigee_error"


class ApigeeUnavailable(ApigeeError):
    """Retryable: the call failed in transport, timed out, or Apigee answered 5xx, 429 or garbage.

    ``retry_after`` is Apigee's own hint (a ``Retry-After`` header), in seconds, when it gave one.
    """

    code = "apigee_unavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ApigeeRejected(ApigeeError):
    """Not retryable as is: Apigee answered a 4xx other than 408 and 429."""

    code = "apigee_rejected"

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)
