"""``make run``: the local stack. authz (standalone, demo catalog) + Envoy sidecar + an echo upstream.

Envoy listens on 127.0.0.1:8080 if that port is free, else on a free port. Environment overrides:
``DEVSTACK_LISTEN_PORT``, ``DEVSTACK_ADMIN_PORT``, ``DEVSTACK_AUTHZ_PORT``, ``DEVSTACK_METRICS_PORT``,
``DEVSTACK_UPSTREAM_PORT``. Every route carries the API name ``orders-api`` (ext_authz context extension
``apigee_api``). Logs and the generated configs go to a temp dir, printed at start. Ctrl-C or SIGTERM
stops Envoy, then authz, then the upstream, each by PID.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from devstack.procs import StartupError, free_port, port_is_free
from devstack.stack import Stack, start_stack
from devstack.upstream import EchoUpstream

# A public demo credential, valid only against devstack/demo/catalog.yaml (which holds its SHA-256).
DEMO_KEY = "demo-key-9b1d7c2e4f6a8035"
DEMO_CATALOG = Path(__file__).resolve().parent / "demo" / "catalog.yaml"
DEMO_API = "orders-api"
DEFAULT_LISTEN_PORT = 8080
WATCH_INTERVAL = 1.0  # seconds between liveness checks of the children while running


def _port_from_env(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value:
        return int(value)
    if default is not None and port_is_free(default):
        return default
    return free_port()


def _check_demo_key() -> None:
    """Fail early if the catalog's key hash and DEMO_KEY have drifted apart."""
    digest = hashlib.sha256(DEMO_KEY.encode()).hexdigest()
    if digest not in DEMO_CATALOG.read_text():
        raise SystemExit(f"{DEMO_CATALOG}: no credential with sha256(DEMO_KEY) = {digest}")


def _banner(stack: Stack, upstream: EchoUpstream, work_dir: Path) -> str:
    url = stack.url
    return f"""
authz demo stack is up (org demo, env test, API {DEMO_API!r} set by the Envoy route).
  Envoy listener   {url}
  Envoy admin      {stack.admin_url}
  authz gRPC       127.0.0.1:{stack.api_port}
  authz metrics    {stack.metrics_url}/metrics   (/readyz /livez /healthz)
  echo upstream    {upstream.url}
  logs and configs {work_dir}

Try:
  # no key: 401
  curl -i {url}/v1/orders
  # the demo key: 200 and the headers the upstream received
  curl -i -H 'x-api-key: {DEMO_KEY}' {url}/v1/orders
  # a path no product of the app covers: 403
  curl -i -H 'x-api-key: {DEMO_KEY}' {url}/v2/x
  # an unknown key: 401
  curl -i -H 'x-api-key: wrong-key' {url}/v1/orders
  # Prometheus metrics
  curl -s {stack.metrics_url}/metrics

Ctrl-C to stop."""


def main() -> int:
    _check_demo_key()
    work_dir = Path(tempfile.mkdtemp(prefix="authz-devstack-"))
    print(f"logs and configs: {work_dir}", flush=True)

    # While starting, SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so start_stack stops whatever it
    # has started; once up, both just set `stop`.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    upstream = EchoUpstream(port=int(os.environ.get("DEVSTACK_UPSTREAM_PORT", "0")))
    try:
        try:
            stack = start_stack(
                work_dir,
                DEMO_CATALOG,
                upstream.port,
                api_name=DEMO_API,
                listen_port=_port_from_env("DEVSTACK_LISTEN_PORT", DEFAULT_LISTEN_PORT),
                admin_port=_port_from_env("DEVSTACK_ADMIN_PORT"),
                api_port=_port_from_env("DEVSTACK_AUTHZ_PORT"),
                metrics_port=_port_from_env("DEVSTACK_METRICS_PORT"),
            )
        except StartupError as exc:
            print(f"\nstart-up failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted during start-up", file=sys.stderr)
            return 130
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            print(_banner(stack, upstream, work_dir), flush=True)
            while not stop.wait(WATCH_INTERVAL):
                for proc in (stack.authz_proc, stack.envoy_proc):
                    if not proc.alive():
                        print(
                            f"\n{proc.name} exited with code {proc.returncode}:\n{proc.log_tail()}",
                            file=sys.stderr,
                        )
                        return 1
            print("\nstopping...", flush=True)
        finally:
            stack.close()
    finally:
        upstream.close()
    print(f"stopped; logs kept in {work_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
