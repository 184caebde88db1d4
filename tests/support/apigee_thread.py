"""A FakeApigee served on 127.0.0.1 by its own asyncio loop on a daemon thread, for tests that run the
service as a subprocess (e2e) and still need to turn the fake's knobs.

    with ApigeeThread(FakeApigee(policy_jwks=secret.jwks)) as apigee:
        ... apigee.remote_service_url ...           # for tenant.remote_service_api
        apigee.call(apigee.fake.revoke_key, KEY)    # a knob, run on the fake's loop
        apigee.down(); apigee.up()                  # unreachable (connection refused), then back

Thread safety: the fake's state is only touched on its loop's thread. Knobs and reads go through
:meth:`call`, which runs the callable on that loop (``run_coroutine_threadsafe``) and waits for its result,
so a knob never interleaves with a request being answered. The port is chosen once, so the fake comes back
on the same address after :meth:`down`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import ParamSpec, TypeVar

from devstack.procs import free_port
from tests.fakes.apigee import FakeApigee, FakeServer

HOST = "127.0.0.1"
CALL_TIMEOUT = 10.0  # seconds a knob or a start/stop may take on the fake's loop

P = ParamSpec("P")
T = TypeVar("T")


class ApigeeThread:
    """Owns the loop thread and the server; ``up=False`` starts with Apigee unreachable."""

    def __init__(self, fake: FakeApigee, *, port: int | None = None, up: bool = True) -> None:
        self.fake = fake
        self.port = port or free_port()
        self._server: FakeServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-apigee", daemon=True)
        self._thread.start()
        if up:
            self.up()

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def remote_service_url(self) -> str:
        """The value for ``tenant.remote_service_api``."""
        return self.base_url + self.fake.base_path

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the fake's loop and return its result (or raise its error)."""

        async def run() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CALL_TIMEOUT)

    def calls(self, endpoint: str) -> int:
        """How many requests ``endpoint`` (e.g. ``"verifyApiKey"``) has received so far."""
        return self.call(lambda: self.fake.calls[endpoint])

    def up(self) -> None:
        """Serve on ``self.port`` (idempotent)."""
        if self._server is None:
            future = asyncio.run_coroutine_threadsafe(self.fake.serve(HOST, self.port), self._loop)
            self._server = future.result(CALL_TIMEOUT)

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

    def __enter__(self) -> ApigeeThread:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
