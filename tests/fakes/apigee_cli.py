"""The command line of `python -m tests.fakes.apigee`: a FakeApigee on loopback until SIGTERM/SIGINT.

Example: `python -m tests.fakes.apigee --port 8080 --products products.json --key KEY:app:dev@x.com:p1,p2`.
Prints one line with the base URL once listening. Imports only the stdlib and tests.fakes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from tests.fakes.apigee import FakeApigee


def _parse_key(spec: str) -> tuple[str, str, str, list[str]]:
    parts = spec.split(":", 3)
    if len(parts) != 4 or not all(parts[:3]):
        raise argparse.ArgumentTypeError(f"expected KEY:app:developer@email:product1,product2, got {spec!r}")
    return parts[0], parts[1], parts[2], [p for p in parts[3].split(",") if p]


def _parse_basic(spec: str) -> tuple[str, str]:
    key, sep, secret = spec.partition(":")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY:SECRET")
    return key, secret


async def _run(args: argparse.Namespace) -> None:
    policy_jwks = json.loads(args.policy_jwks.read_text()) if args.policy_jwks else None
    fake = FakeApigee(org=args.org, env=args.env, basic_auth=args.basic_auth, policy_jwks=policy_jwks)
    if args.products:
        loaded = json.loads(args.products.read_text())
        fake.set_products(loaded["apiProduct"] if isinstance(loaded, dict) else loaded)
    for key, app, email, products in args.key:
        fake.add_key(key, app=app, developer_email=email, products=products)
    for email, public_key in args.service_account:
        fake.add_service_account(email, public_key.read_text())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with await fake.serve(args.host, args.port) as server:
        print(
            f"fake apigee listening on {server.base_url} remote_service_api={server.remote_service_url}",
            flush=True,
        )
        await stop.wait()


def _parse_account(value: str) -> tuple[str, Path]:
    email, sep, path = value.partition("=")
    if not sep or not email or not path:
        raise argparse.ArgumentTypeError(f"expected EMAIL=PUBLIC_KEY.pem, got {value!r}")
    return email, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.apigee", description="Serve a FakeApigee.")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--org", default="org")
    parser.add_argument("--env", default="test")
    parser.add_argument("--products", type=Path, help='a JSON list of products or {"apiProduct": [...]}')
    parser.add_argument("--key", type=_parse_key, action="append", default=[], metavar="KEY:APP:EMAIL:P1,P2")
    parser.add_argument("--basic-auth", type=_parse_basic, metavar="KEY:SECRET", help="require Basic auth")
    parser.add_argument("--policy-jwks", type=Path, help="require internal JWTs verified by this JWKS file")
    parser.add_argument(
        "--service-account",
        type=_parse_account,
        action="append",
        default=[],
        metavar="EMAIL=PUBLIC_KEY.pem",
        help="a Google service account whose tokens /token issues (the management API and analytics)",
    )
    asyncio.run(_run(parser.parse_args(argv)))
    return 0
