"""Headless Locust runs of ``loadtest/locustfile.py``: against a local stack it starts, or a deployment.

    python -m loadtest.locust_run                                   # local stack (standalone), 10 users, 10 s
    python -m loadtest.locust_run --apigee --users 20 --duration 30 # authz in Apigee mode, against a fake
    LOCUST_AUTHZ_API_KEY=... LOCUST_AUTHZ_QUOTA_KEY=... \\
        python -m loadtest.locust_run --host https://orders-xyz.a.run.app --quota-limit 100
    python -m loadtest.locust_run -- --authz-weights quota=0        # after --: more Locust options

``--local`` (the default) starts authz + Envoy sidecar + echo upstream (``loadtest/locust_stack.py``) with
its own keys, tokens and products, and hands them to the locustfile as ``LOCUST_AUTHZ_*`` variables.
``--host URL`` sends the load to an existing deployment; the keys and tokens then come from the
environment (``LOCUST_AUTHZ_*``) or the Locust options after ``--`` (``loadtest/README.md``).

Locust (the ``locust`` next to this Python) runs as a subprocess with ``--csv`` and a hard timeout; its
log, CSV files and the locustfile's tally go to the work dir. The runner prints requests/s, failure rate
and p50/p95/p99 overall and per scenario, the wrong outcomes (wrong allows apart) and the quota check.

Exit code: 0 when the run had no wrong outcome, every enabled scenario sent requests and the quota key
stayed within its bound; 1 otherwise; 2 when the run could not be made (a process did not start, Locust
failed or overran); 130 on Ctrl-C. Every process it started is stopped by PID, on every path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.procs import StartupError
from loadtest.locust_outcomes import DEFAULT_WEIGHTS, JWT_UNIQUE, Tally, quota_bound
from loadtest.locust_report import build_report, format_report
from loadtest.locust_stack import DEFAULT_QUOTA_LIMIT, QUOTA_WINDOW, Target, start_local

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
LOCUST_EXTRA_TIME = 60.0  # seconds Locust may take beyond --duration (start-up, stop, writing CSV) before
LOCUST_STOP_TIMEOUT = 10.0  # it is stopped: SIGTERM, this long to write its files, then SIGKILL
STOP_TIMEOUT = "5"  # Locust's --stop-timeout: users finish the request in flight, so every answer counts
# jwt_unique tokens signed for each second of the run: measured on 2 shared cores, 10 users sent about
# 2,700 requests/s in all, 1/11 of them jwt_unique (about 25/s a user, 250/s in all, CPU-bound beyond).
# With a margin; past the pool tokens are reused (counted and reported), not failed.
TOKENS_PER_USER_SECOND = 35
TOKENS_PER_SECOND_MAX = 400


class RunError(Exception):
    """Locust could not run or left no results; the message says why (exit code 2)."""


@dataclass(frozen=True)
class LocustRun:
    stats_path: Path  # Locust's final stats (--json-file)
    tally_path: Path
    log_path: Path
    returncode: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.locust_run",
        description="Headless Locust run of loadtest/locustfile.py with a pass/fail verdict.",
        epilog="Options after -- go to Locust (e.g. -- --authz-wrong-path /v2/x).",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--local", action="store_true", help="start the local stack (the default)")
    target.add_argument("--host", help="an existing deployment's base URL (keys from LOCUST_AUTHZ_*)")
    parser.add_argument(
        "--apigee", action="store_true", help="local stack in Apigee mode against a fake Apigee"
    )
    parser.add_argument("--users", type=int, default=10, help="concurrent Locust users (default 10)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    parser.add_argument(
        "--quota-limit",
        type=int,
        help=f"the quota key's limit per window (local: the catalog's, default {DEFAULT_QUOTA_LIMIT}; "
        "--host: unchecked unless given)",
    )
    parser.add_argument("--quota-window", type=float, default=QUOTA_WINDOW, help="its window in seconds")
    parser.add_argument(
        "--quota-slack",
        type=int,
        help="allowed beyond the limit per window: Apigee mode admits up to limit + replicas "
        "(default: 1 with --apigee, else 0)",
    )
    parser.add_argument("--jwt-pool", type=int, help="local: distinct tokens signed for jwt_unique")
    parser.add_argument("--work-dir", type=Path, help="logs, CSV and configs (default: a new temp dir)")
    parser.add_argument("--report-json", type=Path, help="also write the parsed report here as JSON")
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (Locust options go after --)")
    args.locust_args = extra
    if args.host and args.apigee:
        parser.error("--apigee starts a local stack; it does not go with --host")
    if args.users < 1 or args.duration <= 0:
        parser.error("--users and --duration must be positive")
    return args


def locust_binary() -> str:
    """The ``locust`` console script next to this Python (the venv's)."""
    candidate = Path(sys.executable).parent / "locust"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("locust")
    if found is None:
        raise RunError("no locust executable: install the test extra (pip install -e '.[test]')")
    return found


def locust_argv(args: argparse.Namespace, url: str, stats_path: Path, tally_path: Path) -> list[str]:
    spawn_rate = args.spawn_rate if args.spawn_rate is not None else args.users
    return [
        locust_binary(),
        "-f", str(LOCUSTFILE),
        "--headless",
        "--users", str(args.users),
        "--spawn-rate", f"{spawn_rate:g}",
        "--run-time", f"{math.ceil(args.duration)}s",
        "--stop-timeout", STOP_TIMEOUT,
        "--host", url,
        "--json-file", str(stats_path.with_suffix("")),  # Locust adds .json
        "--authz-outcomes-file", str(tally_path),
        *args.locust_args,
    ]  # fmt: skip


def run_locust(args: argparse.Namespace, target: Target, work_dir: Path) -> LocustRun:
    """Run Locust against ``target`` and wait for it (bounded); it is stopped by PID on every path.

    Raises:
        RunError: Locust overran its time, or exited in a way that left no results.
    """
    stats_path, tally_path = work_dir / "locust-stats.json", work_dir / "locust-tally.json"
    log_path = work_dir / "locust.log"
    argv = locust_argv(args, target.url, stats_path, tally_path)
    env = {**os.environ, **target.env, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv is ours
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=HERE.parent, start_new_session=True,
        )  # fmt: skip
    try:
        returncode = proc.wait(timeout=args.duration + LOCUST_EXTRA_TIME)
    except subprocess.TimeoutExpired:
        raise RunError(f"locust did not finish within {args.duration + LOCUST_EXTRA_TIME:.0f}s") from None
    finally:
        _stop(proc)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    if returncode not in (0, 1):  # 1: Locust saw failures, which the report judges
        raise RunError(f"locust exited with code {returncode} (log {log_path}):\n{tail}")
    if not stats_path.exists() or not tally_path.exists():
        raise RunError(f"locust left no stats or tally (log {log_path}):\n{tail}")
    return LocustRun(stats_path, tally_path, log_path, returncode)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Locust then writes its files), wait, then SIGKILL; by PID."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(LOCUST_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def remote_target(args: argparse.Namespace) -> Target:
    return Target(
        url=args.host.rstrip("/"),
        env={},
        quota_limit=args.quota_limit,
        quota_window=args.quota_window,
        quota_slack=args.quota_slack or 0,
        description=f"existing deployment {args.host}",
    )


def jwt_pool(args: argparse.Namespace) -> int:
    if args.jwt_pool is not None:
        return int(args.jwt_pool)
    per_second = min(args.users * TOKENS_PER_USER_SECOND, TOKENS_PER_SECOND_MAX) * DEFAULT_WEIGHTS[JWT_UNIQUE]
    return math.ceil(per_second * (args.duration + 1))


def start_target(args: argparse.Namespace, work_dir: Path, stack: contextlib.ExitStack) -> Target:
    if args.host:
        return remote_target(args)
    quota_limit = args.quota_limit if args.quota_limit is not None else DEFAULT_QUOTA_LIMIT
    target = start_local(
        work_dir, stack, apigee=args.apigee, quota_limit=quota_limit, jwt_pool=jwt_pool(args)
    )
    if args.quota_slack is not None:
        target.quota_slack = args.quota_slack
    return target


def run(args: argparse.Namespace, work_dir: Path) -> int:
    with contextlib.ExitStack() as stack:
        try:
            target = start_target(args, work_dir, stack)
        except StartupError as exc:
            print(f"setup failed: {exc}", file=sys.stderr)
            return 2
        print(f"target: {target.description}", flush=True)
        print(f"locust: {args.users} users for {args.duration:g}s, log {work_dir / 'locust.log'}", flush=True)
        try:
            result = run_locust(args, target, work_dir)
        except RunError as exc:
            print(f"run failed: {exc}", file=sys.stderr)
            return 2
    tally = Tally.read(result.tally_path)
    quota = None
    if target.quota_limit is not None:
        quota = quota_bound(tally, target.quota_limit, target.quota_window, target.quota_slack)
    try:
        report = build_report(result.stats_path, tally, quota)
    except (ValueError, KeyError) as exc:
        print(f"run failed: cannot read {result.stats_path}: {exc}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if args.report_json is not None:
        args.report_json.write_text(json.dumps(report.to_dict(), indent=1))
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="authz-locust-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work_dir}", flush=True)
    # SIGTERM unwinds like Ctrl-C, so the ExitStack and run_locust stop what they started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args, work_dir)
    except KeyboardInterrupt:
        print("interrupted: stopped every process started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
