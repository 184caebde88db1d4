"""Command line: ``authz serve``, ``authz check-config`` and ``authz keys new|hash``.

Every flag can also come from an ``AUTHZ_*`` environment variable (read here, once, and nowhere else).
Exit codes: 0 success, 1 a port cannot be opened (or a worker of ``--workers N`` did not exit cleanly), 2 bad
config or catalog (or a bad ``--workers``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import string
import sys
from collections.abc import Mapping

import yaml

from authz import __version__, logs
from authz.config import (
    DEFAULT_ANALYTICS_SECRET_DIR,
    DEFAULT_POLICY_SECRET_DIR,
    effective_config,
    load_config,
)
from authz.decision.authorize import key_digest
from authz.errors import ConfigError, ListenError
from authz.render import command as render_command
from authz.standalone.catalog_file import load_catalog
from authz.workers import MAX_WORKERS, parse_role, supervise, tag_logs, worker_count

KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 40  # like Apigee consumer keys; about 238 bits of entropy


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(prog="authz", description="Envoy ext_authz service for Apigee")
    parser.add_argument("--version", action="version", version=f"authz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "run the service"), ("check-config", "validate and print the config")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("-c", "--config", default=env.get("AUTHZ_CONFIG", "config.yaml"))
        command.add_argument(
            "-p",
            "--policy-secret",
            default=env.get("AUTHZ_POLICY_SECRET", DEFAULT_POLICY_SECRET_DIR),
            help="directory with remote-service.key, .properties and .crt (Apigee X/hybrid)",
        )
        command.add_argument(
            "-a",
            "--analytics-secret",
            default=env.get("AUTHZ_ANALYTICS_SECRET", DEFAULT_ANALYTICS_SECRET_DIR),
            help="directory with client_secret.json, the analytics service account (Apigee X/hybrid; "
            "without it, Google Application Default Credentials)",
        )
        command.add_argument("-l", "--log-level", default=env.get("AUTHZ_LOG_LEVEL", "info"),
                             choices=["debug", "info", "warning", "error"], type=str.lower)  # fmt: skip
        command.add_argument("-j", "--json-log", action="store_true",
                             default=env.get("AUTHZ_JSON_LOG", "") in ("1", "true"))  # fmt: skip
        if name == "serve":
            _worker_arguments(command, env)
    keys = commands.add_parser("keys", help="API keys for the local catalog")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    key_commands.add_parser("new", help="print a new random API key and its catalog line")
    key_commands.add_parser("hash", help="read API keys on stdin, print their key_sha256 lines")
    render_command.add_parser(commands, env)
    return parser


def _workers(value: str) -> int:
    try:
        return worker_count(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (--workers or AUTHZ_WORKERS)") from None


def _worker_arguments(command: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    command.add_argument(
        "-w",
        "--workers",
        type=_workers,
        default=env.get("AUTHZ_WORKERS", "1"),
        help=f"worker processes sharing the ports (1 to {MAX_WORKERS}; default 1, a single process)",
    )
    # Set by the supervisor for each worker it starts; not for users.
    command.add_argument("--worker", help=argparse.SUPPRESS)
    command.add_argument("--worker-socket", default="", help=argparse.SUPPRESS)


def _serve(args: argparse.Namespace) -> int:
    """One process, one worker of a supervisor, or (``--workers`` N > 1) the supervisor of N workers."""
    config = load_config(args.config, args.policy_secret, args.analytics_secret)
    if args.worker is None and args.workers > 1:
        if config.standalone:
            load_catalog(config.tenant.catalog_file)  # fail before starting anything, as one process does
        argv = ["serve", "--config", args.config, "--policy-secret", args.policy_secret]
        argv += ["--analytics-secret", args.analytics_secret, "--log-level", args.log_level]
        argv += ["--json-log"] if args.json_log else []
        return asyncio.run(supervise(config, argv, args.workers))
    role = None
    if args.worker is not None:
        try:
            role = parse_role(args.worker, args.worker_socket)
        except ValueError as exc:
            print(f"authz: {exc}", file=sys.stderr)
            return 2
        tag_logs(role.index)
    from authz.app import serve  # grpc is imported only to serve

    return asyncio.run(serve(config, role))


def new_key() -> str:
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def _keys(command: str) -> int:
    if command == "new":
        key = new_key()
        print(f"API key (give it to the client; it is not stored anywhere): {key}")
        print("Catalog line (paste under the app's credentials):")
        print(f'  - key_sha256: "{key_digest(key)}"')
        return 0
    for line in sys.stdin:
        if line.strip():
            print(f'- key_sha256: "{key_digest(line.strip())}"')
    return 0


def _check_config(path: str, policy_secret: str, analytics_secret: str) -> int:
    config = load_config(path, policy_secret, analytics_secret)
    if config.standalone:
        catalog = load_catalog(config.tenant.catalog_file)
        print(f"# catalog: {len(catalog.products)} products, {len(catalog.credentials)} credentials")
    print(yaml.safe_dump(effective_config(config), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        return _keys(args.keys_command)
    if args.command == "render":
        return render_command.main(args)
    logs.setup(args.log_level, args.json_log)
    try:
        if args.command == "check-config":
            return _check_config(args.config, args.policy_secret, args.analytics_secret)
        return _serve(args)
    except ConfigError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 1
