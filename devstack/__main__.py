"""``make run``: the local stack. authz (standalone, demo catalog) + Envoy sidecar + an echo upstream.

``make run-apigee`` (``python -m devstack --apigee``): the same stack with authz in Apigee mode, against a
FakeApigee subprocess (``python -m tests.fakes.apigee``) that serves the demo catalog's products and the
demo key; authz signs its calls with a policy secret written to the work dir, and lists apps and keys (the
key index, every ``KEY_SYNC_INTERVAL``) and uploads analytics with a Google service account the fake knows.

Envoy listens on 127.0.0.1:8080 if that port is free, else on a free port. Environment overrides:
``DEVSTACK_LISTEN_PORT``, ``DEVSTACK_ADMIN_PORT``, ``DEVSTACK_AUTHZ_PORT``, ``DEVSTACK_METRICS_PORT``,
``DEVSTACK_UPSTREAM_PORT``, ``DEVSTACK_APIGEE_PORT`` (the fake). Every route carries the API name
``orders-api`` (ext_authz context extension ``apigee_api``). Logs and the generated configs go to a temp
dir, printed at start. Ctrl-C or SIGTERM stops Envoy, then authz, then the fake and the upstream, each by
PID.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from devstack.apigee import (
    EXT_AUTHZ_TIMEOUT,
    FakeApigeeProc,
    FakeKey,
    apigee_overrides,
    start_fake_apigee,
    write_policy_secret,
)
from devstack.procs import Proc, StartupError, free_port, port_is_free
from devstack.stack import APIGEE_TEMP_DIR, Stack, start_stack
from devstack.upstream import EchoUpstream
from tests.support.apigee_config import new_service_account, write_analytics_secret

# A public demo credential, valid only against devstack/demo/catalog.yaml (which holds its SHA-256) and
# the fake Apigee of `make run-apigee`.
DEMO_KEY = "demo-key-9b1d7c2e4f6a8035"
DEMO_CATALOG = Path(__file__).resolve().parent / "demo" / "catalog.yaml"
DEMO_API = "orders-api"
DEFAULT_LISTEN_PORT = 8080
WATCH_INTERVAL = 1.0  # seconds between liveness checks of the children while running
APIGEE_METRICS = "^(api_key_[a-z_]+_total|key_[a-z_]+|catalog_from_snapshot|products_cached)"  # banner grep
KEY_SYNC_INTERVAL = "1m"  # make run-apigee: the key index's listing interval


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


def _start_fake(work_dir: Path) -> tuple[FakeApigeeProc, Path]:
    """The fake Apigee with the demo catalog's products and DEMO_KEY (the demo app's products), and the
    policy secret directory for authz."""
    catalog = yaml.safe_load(DEMO_CATALOG.read_text())
    app = catalog["developers"][0]["apps"][0]
    key = FakeKey(DEMO_KEY, app["name"], catalog["developers"][0]["email"], tuple(app["products"]))
    secret = write_policy_secret(work_dir / "policy-secret")
    port = int(os.environ.get("DEVSTACK_APIGEE_PORT") or 0) or free_port()
    # A Google service account the fake issues tokens to: authz lists apps and keys with it (the key
    # index) and uploads analytics; it reaches authz as its analytics Secret (AUTHZ_ANALYTICS_SECRET).
    account = new_service_account(f"http://127.0.0.1:{port}/token")
    analytics_secret = write_analytics_secret(work_dir / "analytics-secret", account).parent
    os.environ["AUTHZ_ANALYTICS_SECRET"] = str(analytics_secret)
    fake = start_fake_apigee(
        work_dir, catalog["products"], [key], secret.jwks, port=port, service_account=account
    )
    return fake, secret.directory


def _banner(stack: Stack, upstream: EchoUpstream, work_dir: Path, fake: FakeApigeeProc | None) -> str:
    url = stack.url
    if fake is None:
        mode = "standalone: demo catalog"
        apigee = ""
        more = ""
    else:
        mode = "Apigee mode: products and the key index from the fake Apigee"
        apigee = f"\n  fake Apigee      {fake.remote_service_url}   (log {fake.proc.log_path})"
        more = f"""
  # where the catalog and the key index come from (apigee), and keys answered from the index
  curl -s {stack.metrics_url}/readyz
  curl -s {stack.metrics_url}/metrics | grep -E '{APIGEE_METRICS}'"""
    http_checks = ""
    if stack.transport == "http":
        http_checks = (
            f"\n  authz HTTP       127.0.0.1:{stack.http_authz_port}   (Envoy's ext_authz checks go here)"
        )
    return f"""
authz demo stack is up ({mode}; org demo, env test, API {DEMO_API!r} set by the Envoy route).
  Envoy listener   {url}
  Envoy admin      {stack.admin_url}
  authz gRPC       127.0.0.1:{stack.api_port}{http_checks}
  authz metrics    {stack.metrics_url}/metrics   (/readyz /livez /healthz)
  echo upstream    {upstream.url}{apigee}
  logs and configs {work_dir}
  analytics        {work_dir}/{APIGEE_TEMP_DIR}/analytics/staging (gzip NDJSON, staged every 2 min)

Try:
  # no key: 401
  curl -i {url}/v1/orders
  # the demo key: 200 and the headers the upstream received
  curl -i -H 'x-api-key: {DEMO_KEY}' {url}/v1/orders
  # a path no product of the app covers: 403
  curl -i -H 'x-api-key: {DEMO_KEY}' {url}/v2/x
  # an unknown key: 401
  curl -i -H 'x-api-key: wrong-key' {url}/v1/orders
  # a path with a quota of 5 a minute: five 200s, then 429 with retry-after and ratelimit-* headers
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' \\
    -H 'x-api-key: {DEMO_KEY}' {url}/v1/limited; done; echo
  # Prometheus metrics
  curl -s {stack.metrics_url}/metrics{more}

Ctrl-C to stop."""


def _stack_options(fake: FakeApigeeProc | None, policy_secret: Path | None) -> dict[str, Any]:
    """start_stack keyword arguments: fixed or free ports, and Apigee mode when there is a fake."""
    options: dict[str, Any] = {
        "api_name": DEMO_API,
        "listen_port": _port_from_env("DEVSTACK_LISTEN_PORT", DEFAULT_LISTEN_PORT),
        "admin_port": _port_from_env("DEVSTACK_ADMIN_PORT"),
        "api_port": _port_from_env("DEVSTACK_AUTHZ_PORT"),
        "metrics_port": _port_from_env("DEVSTACK_METRICS_PORT"),
    }
    if fake is not None:
        options.update(
            overrides=apigee_overrides(fake.remote_service_url, key_sync_interval=KEY_SYNC_INTERVAL),
            envoy_vars={"EXT_AUTHZ_TIMEOUT": EXT_AUTHZ_TIMEOUT},
            policy_secret_dir=policy_secret,
        )
    return options


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack", description="authz + Envoy + demo upstream")
    parser.add_argument(
        "--apigee", action="store_true", help="Apigee mode, against a fake Apigee (default: standalone)"
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="Envoy calls authz over ext_authz's HTTP transport (default: gRPC)",
    )
    return parser.parse_args(argv)


def _watch(stop: threading.Event, procs: list[Proc]) -> int:
    """Wait for ``stop``; 1 as soon as a child exits on its own."""
    while not stop.wait(WATCH_INTERVAL):
        for proc in procs:
            if not proc.alive():
                tail = proc.log_tail()
                print(f"\n{proc.name} exited with code {proc.returncode}:\n{tail}", file=sys.stderr)
                return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
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
    fake: FakeApigeeProc | None = None
    try:
        try:
            policy_secret = None
            if args.apigee:
                fake, policy_secret = _start_fake(work_dir)
            catalog = None if fake is not None else DEMO_CATALOG
            transport = "http" if args.http else "grpc"
            options = _stack_options(fake, policy_secret)
            stack = start_stack(work_dir, catalog, upstream.port, transport=transport, **options)
        except StartupError as exc:
            print(f"\nstart-up failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted during start-up", file=sys.stderr)
            return 130
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            print(_banner(stack, upstream, work_dir, fake), flush=True)
            procs = [stack.authz_proc, stack.envoy_proc] + ([fake.proc] if fake is not None else [])
            if _watch(stop, procs):
                return 1
            print("\nstopping...", flush=True)
        finally:
            stack.close()
    finally:
        if fake is not None:
            fake.proc.stop()
        upstream.close()
    print(f"stopped; logs kept in {work_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
