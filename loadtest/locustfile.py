"""Locust scenarios through Envoy's ext_authz: the answers a gateway owes each kind of caller, under load.

One ``FastHttpUser`` with a weighted task per scenario; every request is named after its scenario, so
Locust's stats are grouped per scenario:

==============  ===========================================  ====================================
scenario        request                                      right answer
==============  ===========================================  ====================================
valid_key       the valid API key on ``--authz-path``        200 (the upstream's)
invalid_key     an unknown API key on ``--authz-path``       401
jwt_cached      one bearer token, reused                     200
jwt_unique      a fresh token per request (tokens file)      200 (each costs a signature check)
quota           the quota key on ``--authz-quota-path``      200 until the limit, then 429
wrong_path      the valid key on ``--authz-wrong-path``      403 (no product of the app has it)
==============  ===========================================  ====================================

Any other answer is marked a failure whose message names the scenario, the kind of wrong outcome
(``wrong allow``: a 200 where a deny was due; ``wrong deny``, ``wrong status``, ``error``: see
``loadtest/locust_outcomes.py``), the expected and the got status. The statuses and outcomes are also
tallied per scenario (summed over worker processes) and written as JSON to ``--authz-outcomes-file`` when
Locust quits; ``loadtest/locust_run.py`` reads it to count wrong allows apart and to check the quota key's
200s against its limit.

Every setting is a Locust option with an environment variable, so the same file runs against a real
deployment (``loadtest/README.md``)::

    LOCUST_AUTHZ_API_KEY=...  LOCUST_AUTHZ_QUOTA_KEY=...  LOCUST_AUTHZ_JWT=...
    locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 60s --host https://orders-xyz.a.run.app

A scenario without what it needs (no key, no token) gets weight 0 and a warning. Signing a token inside a
greenlet costs about 0.3 ms of this process's one core, so the unique tokens are signed beforehand and
read from ``--authz-tokens-file`` (one a line); when they run out they are reused (counted, then cached
by the service, which the runner reports).
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

# Locust puts this file's directory on sys.path; the shared module is imported as part of `loadtest`.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from loadtest.locust_outcomes import (  # noqa: E402 - needs the repository root on sys.path
    DEFAULT_PATH,
    DEFAULT_QUOTA_PATH,
    DEFAULT_WEIGHTS,
    DEFAULT_WRONG_PATH,
    INVALID_KEY,
    JWT_CACHED,
    JWT_UNIQUE,
    QUOTA,
    VALID_KEY,
    WRONG_PATH,
    Expectation,
    Outcome,
    Tally,
    classify,
    expectations,
    failure_message,
    option_env,
    parse_weights,
)

log = logging.getLogger("authz-locust")
TALLY_KEY = "authz_tally"  # the worker report's field


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    def option(name: str, help_text: str, default: str = "", **more: Any) -> None:
        env = option_env(name)
        parser.add_argument(f"--{name}", env_var=env, default=default, help=f"authz: {help_text}", **more)

    option("authz-api-key", "a valid API key (valid_key, wrong_path)", is_secret=True)
    option("authz-invalid-key", "an API key the service does not know", "locust-unknown-key-0000")
    option("authz-quota-key", "a valid key whose product has a small quota (quota)", is_secret=True)
    option("authz-jwt", "a valid bearer token reused on every jwt_cached request", is_secret=True)
    option("authz-tokens-file", "valid bearer tokens, one a line, one per jwt_unique request")
    option("authz-key-header", "the header that carries the API key", "x-api-key")
    option(
        "authz-header",
        "one more header on every request, 'Name: value' (e.g. X-Serverless-Authorization for Cloud Run IAM)",
        is_secret=True,
    )
    option("authz-path", "a path the valid key's product covers", DEFAULT_PATH)
    option("authz-quota-path", "a path of the quota key's product", DEFAULT_QUOTA_PATH)
    option("authz-wrong-path", "a path no product of the valid key covers", DEFAULT_WRONG_PATH)
    option("authz-allow-status", "what an allowed request answers (the upstream's status)", "200")
    option("authz-invalid-key-status", "the status for an unknown key", "401")
    option("authz-wrong-path-status", "the status for a path outside the products", "403")
    option("authz-quota-status", "the status once the quota is spent", "429")
    weights = ",".join(f"{name}={weight}" for name, weight in DEFAULT_WEIGHTS.items())
    option("authz-weights", f"task weights, 0 turns one off (defaults {weights})")
    option("authz-wait", "seconds each user waits between requests", "0")
    option("authz-outcomes-file", "write the per-scenario tally (JSON) here when Locust quits")


class Settings:
    """The parsed options, set once by the init listener."""

    headers: dict[str, dict[str, str]] = {}
    paths: dict[str, str] = {}
    expect: dict[str, Expectation] = {}
    tokens: list[str] = []
    outcomes_file: str = ""
    extra: dict[str, str] = {}
    environment: Any = None


def extra_header(text: str) -> dict[str, str]:
    """``--authz-header 'Name: value'`` as a one-entry dict ({} when empty)."""
    if not text:
        return {}
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(
            "--authz-header: expected 'Name: value' (the value is not shown: it may be a secret)"
        )
    return {name.strip().lower(): value.strip()}


TALLY = Tally()
_token_serials = itertools.count()


@events.init.add_listener
def _configure(environment: Any, **_kwargs: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # e.g. `locust --list`
        return
    Settings.environment = environment
    key_header = opts.authz_key_header.lower()
    Settings.extra = extra_header(opts.authz_header)
    Settings.headers = {
        VALID_KEY: {key_header: opts.authz_api_key},
        INVALID_KEY: {key_header: opts.authz_invalid_key},
        JWT_CACHED: {"authorization": f"Bearer {opts.authz_jwt}"},
        QUOTA: {key_header: opts.authz_quota_key},
        WRONG_PATH: {key_header: opts.authz_api_key},
    }
    for headers in Settings.headers.values():
        headers.update(Settings.extra)
    Settings.paths = {name: opts.authz_path for name in (VALID_KEY, INVALID_KEY, JWT_CACHED, JWT_UNIQUE)}
    Settings.paths.update({QUOTA: opts.authz_quota_path, WRONG_PATH: opts.authz_wrong_path})
    Settings.expect = expectations(
        int(opts.authz_allow_status),
        int(opts.authz_invalid_key_status),
        int(opts.authz_wrong_path_status),
        int(opts.authz_quota_status),
    )
    if opts.authz_tokens_file:
        Settings.tokens = [line for line in Path(opts.authz_tokens_file).read_text().split() if line]
    Settings.outcomes_file = opts.authz_outcomes_file
    weights = parse_weights(opts.authz_weights)
    missing = {
        VALID_KEY: not opts.authz_api_key,
        WRONG_PATH: not opts.authz_api_key,
        QUOTA: not opts.authz_quota_key,
        JWT_CACHED: not opts.authz_jwt,
        JWT_UNIQUE: not Settings.tokens,
    }
    for name, absent in missing.items():
        if absent and weights[name]:
            log.warning("scenario %s is off: its key or token is not configured", name)
            weights[name] = 0
    TALLY.enabled = sorted(name for name, weight in weights.items() if weight)
    tasks = [getattr(AuthzUser, name) for name, weight in weights.items() for _ in range(weight)]
    if not tasks:
        raise SystemExit("authz locustfile: every scenario is off (configure at least one key or token)")
    AuthzUser.tasks = tasks
    AuthzUser.wait_time = constant(float(opts.authz_wait))


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any]) -> None:
    data[TALLY_KEY] = TALLY.drain().to_dict()


@events.worker_report.add_listener
def _collect(client_id: str, data: dict[str, Any]) -> None:
    if TALLY_KEY in data:
        TALLY.merge(Tally.from_dict(data[TALLY_KEY]))


@events.test_start.add_listener
def _started(environment: Any, **_kwargs: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        TALLY.enabled = []  # the workers report theirs; the master's own options may differ


@events.quit.add_listener
def _write_tally(exit_code: int, **_kwargs: Any) -> None:
    """After the runner stopped (so no request lands after the write), before Locust exits."""
    if isinstance(Settings.environment.runner, WorkerRunner) or not Settings.outcomes_file:
        return
    TALLY.write(Path(Settings.outcomes_file))


class AuthzUser(FastHttpUser):
    """One caller cycling through the scenarios by weight (the init listener sets ``tasks``)."""

    wait_time = constant(0)

    def _check(self, scenario: str, path: str, headers: dict[str, str]) -> None:
        expect = Settings.expect[scenario]
        with self.client.get(path, headers=headers, name=scenario, catch_response=True) as response:
            status = response.status_code or 0
            outcome = classify(expect, status)
            if outcome is Outcome.OK:
                TALLY.record(scenario, status, outcome, time.time())
                response.success()
            else:
                message = failure_message(scenario, outcome, expect, status)
                TALLY.record(scenario, status, outcome, time.time(), message)
                response.failure(message)

    @task(DEFAULT_WEIGHTS[VALID_KEY])
    def valid_key(self) -> None:
        self._check(VALID_KEY, Settings.paths[VALID_KEY], Settings.headers[VALID_KEY])

    @task(DEFAULT_WEIGHTS[INVALID_KEY])
    def invalid_key(self) -> None:
        self._check(INVALID_KEY, Settings.paths[INVALID_KEY], Settings.headers[INVALID_KEY])

    @task(DEFAULT_WEIGHTS[JWT_CACHED])
    def jwt_cached(self) -> None:
        self._check(JWT_CACHED, Settings.paths[JWT_CACHED], Settings.headers[JWT_CACHED])

    @task(DEFAULT_WEIGHTS[JWT_UNIQUE])
    def jwt_unique(self) -> None:
        serial = next(_token_serials)
        if serial >= len(Settings.tokens):
            TALLY.tokens_reused += 1
        token = Settings.tokens[serial % len(Settings.tokens)]
        headers = {"authorization": f"Bearer {token}", **Settings.extra}
        self._check(JWT_UNIQUE, Settings.paths[JWT_UNIQUE], headers)

    @task(DEFAULT_WEIGHTS[QUOTA])
    def quota(self) -> None:
        self._check(QUOTA, Settings.paths[QUOTA], Settings.headers[QUOTA])

    @task(DEFAULT_WEIGHTS[WRONG_PATH])
    def wrong_path(self) -> None:
        self._check(WRONG_PATH, Settings.paths[WRONG_PATH], Settings.headers[WRONG_PATH])
