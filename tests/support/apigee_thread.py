"""A FakeApigee served on 127.0.0.1 by its own asyncio loop on a daemon thread, for tests that run the
service as a subprocess (e2e) and still need to turn the fake's knobs.

    with ApigeeThread(FakeApigee(policy_jwks=secret.jwks)) as apigee:
        ... apigee.remote_service_url ...           # for tenant.remote_service_api
        apigee.call(apigee.fake.revoke_key, KEY)    # a knob, run on the fake's loop
        apigee.down(); apigee.up()                  # unreachable (connection refused), then back

The loop, thread safety and down/up are those of :class:`tests.support.fake_thread.FakeThread`.
"""

from __future__ import annotations

from tests.fakes.apigee import FakeApigee
from tests.support.fake_thread import HOST, FakeThread

__all__ = ["HOST", "ApigeeThread"]


class ApigeeThread(FakeThread[FakeApigee]):
    """Owns the loop thread and the server; ``up=False`` starts with Apigee unreachable."""

    name = "fake-apigee"

    @property
    def remote_service_url(self) -> str:
        """The value for ``tenant.remote_service_api``."""
        return self.base_url + self.fake.base_path
