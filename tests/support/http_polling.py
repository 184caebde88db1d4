"""Helpers for end-to-end tests that talk HTTP to Envoy: a response's outcome, and polling to a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx

DEADLINE = 10.0  # seconds the service gets to follow a change of its control plane's state
POLL_INTERVAL = 0.05

T = TypeVar("T")


def outcome(response: httpx.Response) -> tuple[int, str]:
    """(HTTP status, deny reason); the reason is "" for a response from the upstream or from Envoy itself."""
    if response.status_code == 200 or not response.content:
        return response.status_code, ""
    return response.status_code, response.json().get("reason", "")


def unavailable(transport: str, reason: str) -> tuple[int, str]:
    """The outcome of authz's 503 ("cannot decide") as a client sees it. Over Envoy's HTTP transport a 5xx
    from the authorization service is an error, answered with ``status_on_error`` (503) and no body."""
    return 503, reason if transport == "grpc" else ""


def poll(probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float = DEADLINE) -> T:
    """Call ``probe`` until ``done(value)``; fail with the last value when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f}s, last {value!r}")
        time.sleep(POLL_INTERVAL)
