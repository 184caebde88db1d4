"""A fake HTTP service (FakeApigee, FakeOidc) served on 127.0.0.1 by its own asyncio loop on a daemon thread,
for tests that run the service as a subprocess (e2e) and still need to turn the fake's knobs.

    with OidcThread(FakeOidc(audience=AUD)) as oidc:
        ... oidc.issuer ...                          # for auth.jwt_providers[].issuer
        token = oidc.call(oidc.fake.mint, {"sub": "x"})
        oidc.down(); oidc.up()                       # unreachable (connection refused), then back

Thread safety: the fake's state is only touched on its loop's thread. Knobs and reads go through
:meth:`FakeThread.call`, which runs the callable on that loop and waits for its result, so a knob never
interleaves with a request being answered. The port is chosen once, so the fake comes back on the same
address after :meth:`FakeThread.down`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, ParamSpec, Protocol, TypeVar

from devstack.procs import free_port
from tests.fakes.oidc import FakeOidc

HOST = "127.0.0.1"
CALL_TIMEOUT = 10.0  # seconds a knob or a start/stop may take on the fake's loop

P = ParamSpec("P")
T = TypeVar("T")


class _Server(Protocol):
    async def close(self) -> None: ...


class Servable(Protocol):
    """A fake that serves itself on loopback and counts the requests of each endpoint."""

    calls: collections.Counter[str]

    def serve(self, host: str, port: int) -> Awaitable[_Server]: ...


F = TypeVar("F", bound=Servable)


class FakeThread(Generic[F]):
    """Owns the loop thread and the server; ``up=False`` starts with the fake unreachable."""

    name = "fake"

    def __init__(self, fake: F, *, port: int | None = None, up: bool = True) -> None:
        self.fake = fake
        self.port = port or free_port()
        self._server: _Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._thread.start()
        if up:
            self.up()

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the fake's loop and return its result (or raise its error)."""

        async def run() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CALL_TIMEOUT)

    def calls(self, endpoint: str) -> int:
        """How many requests ``endpoint`` has received so far."""
        return self.call(lambda: self.fake.calls[endpoint])

    def up(self) -> None:
        """Serve on ``self.port`` (idempotent)."""
        if self._server is None:
            future = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
            self._server = future.result(CALL_TIMEOUT)

    async def _serve(self) -> _Server:
        return await self.fake.serve(HOST, self.port)

    def down(self) -> None:
        """Stop listening and drop every open connection: from now on a connect is refused (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.close(), self._loop).result(CALL_TIMEOUT)

    def close(self) -> None:
        """Stop serving, stop the loop and join its thread."""
        self.down()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT)
        self._loop.close()

    def __enter__(self) -> FakeThread[F]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class OidcThread(FakeThread[FakeOidc]):
    """A FakeOidc whose issuer is its loopback address from the start, so tokens can be minted (and a
    service configured) while it is still down."""

    name = "fake-oidc"

    def __init__(self, fake: FakeOidc, *, port: int | None = None, up: bool = True) -> None:
        port = port or free_port()
        fake.origin = f"http://{HOST}:{port}"  # what serve() would set; known before it runs
        super().__init__(fake, port=port, up=up)

    @property
    def issuer(self) -> str:
        return self.fake.issuer

    @property
    def jwks_uri(self) -> str:
        return self.fake.jwks_uri
