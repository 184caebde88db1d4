"""kill -9 of a process writing analytics, at named points; then recovery in this process.

A subprocess puts records of two tenants into a Buffer, prints how many rounds are durable after each
flush, and kills itself with SIGKILL at a named point (inside a patched write of the module, or rename).
Every record acknowledged before the kill must then be staged for its own tenant, exactly once here (each
point is deterministic), and nothing staged may be corrupt. Reliability §6.4 D-02, D-08.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from authz.analytics.buffer import Buffer
from authz.metrics import new_metrics
from tests.support.clock import FakeClock

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
TENANTS = [("org", "prod"), ("other-org", "test")]
ROUND = 50  # records per tenant between flushes

SCRIPT = r"""
import asyncio, json, os, signal, sys
from authz.analytics import buffer, gzipfile
from authz.clock import SystemClock
from authz.metrics import new_metrics

point, root = sys.argv[1], sys.argv[2]
TENANTS = [("org", "prod"), ("other-org", "test")]
ROUND = 50
sent = 0


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def put_round(buf):
    global sent
    for i in range(sent, sent + ROUND):
        for org, env in TENANTS:
            assert buf.put((org, env), json.dumps({"id": f"{org}~{env}:{i}", "pad": os.urandom(48).hex()}).encode() + b"\n")
    sent += ROUND


async def flushed(buf):
    await buf.flush()
    print(sent, flush=True)  # every record below `sent` is durable


async def main():
    buf = buffer.Buffer(root, "org", new_metrics(), SystemClock())
    if point == "mid_salvage":  # a restart that dies inside its own recovery, after the first rename
        real = gzipfile.replace
        gzipfile.replace = lambda src, dst: (real(src, dst), die())
        await buf.recover()
        return
    await buf.recover()
    put_round(buf)
    await flushed(buf)
    if point == "after_rotate":
        await buf.rotate()
    put_round(buf)
    await flushed(buf)
    if point in ("after_flush", "after_rotate"):
        die()
    put_round(buf)
    if point == "mid_append":  # the crash lands inside a write: half the bytes of this flush
        real = gzipfile.write_at
        gzipfile.write_at = lambda fd, data, offset: (real(fd, data[: len(data) // 2], offset), die())
        await buf.flush()
    if point == "mid_rename":  # the file is closed (trailer written, fsynced), not yet renamed
        await flushed(buf)
        gzipfile.replace = die
        await buf.rotate()
    raise SystemExit(f"no crash at {point}")


asyncio.run(main())
"""


def crash(point: str, root: Path) -> int:
    """Run the writer until it kills itself at point; the rounds it reported durable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, point, str(root)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    reported = done.stdout.split()
    return int(reported[-1]) if reported else 0


async def recovered(root: Path) -> dict[tuple[str, str], Counter[str]]:
    """Recover as a restart does; the ids staged per tenant, checking every staged file on the way."""
    buf = Buffer(root, "org", new_metrics(), FakeClock())
    await buf.recover()
    ids: dict[tuple[str, str], Counter[str]] = {tenant: Counter() for tenant in TENANTS}
    for staged in buf.staged():
        data = gzip.decompress(staged.path.read_bytes())  # one complete, valid gzip stream
        records = [json.loads(line) for line in data.splitlines()]  # every line a whole record
        assert data.endswith(b"\n") and len(records) == staged.records
        org, env = staged.tenant
        assert staged.path.parent.name == f"{org}~{env}"
        assert all(r["id"].startswith(f"{org}~{env}:") for r in records), "attributed to another tenant"
        ids[staged.tenant].update(r["id"] for r in records)
    assert not list((root / "analytics" / "temp").rglob("*.gz"))
    assert not (root / "analytics" / "quarantine").exists()
    await buf.close()  # the next restart takes the directory
    return ids


def check(ids: dict[tuple[str, str], Counter[str]], durable: int, *, at_most: int) -> None:
    for org, env in TENANTS:
        staged = ids[(org, env)]
        want = {f"{org}~{env}:{i}" for i in range(durable)}
        assert want <= set(staged), f"lost: {sorted(want - set(staged))[:5]}"
        assert all(n == 1 for n in staged.values()), "duplicates"
        assert len(staged) <= at_most


@pytest.mark.parametrize(
    ("point", "durable", "at_most"),
    [
        ("after_flush", 2 * ROUND, 2 * ROUND),
        ("after_rotate", 2 * ROUND, 2 * ROUND),  # one file staged, one in temp
        ("mid_append", 2 * ROUND, 3 * ROUND),  # complete lines of the half-written flush survive too
        ("mid_rename", 3 * ROUND, 3 * ROUND),
    ],
)
async def test_every_durable_record_is_staged_after_a_kill(tmp_path, point, durable, at_most):
    assert crash(point, tmp_path) == durable

    ids = await recovered(tmp_path)

    check(ids, durable, at_most=at_most)
    if point == "mid_append":  # the first half of the cut flush is read back up to its last whole line
        assert len(ids[TENANTS[0]]) > durable
    assert await recovered(tmp_path) == ids  # a second restart changes nothing


async def test_a_kill_inside_recovery_neither_loses_nor_duplicates(tmp_path):
    durable = crash("after_flush", tmp_path)
    crash("mid_salvage", tmp_path)  # one tenant's file renamed into staging, its source not deleted
    assert len(list((tmp_path / "analytics" / "temp").rglob("*.gz"))) == 2
    assert len(list((tmp_path / "analytics" / "staging").rglob("*.gz"))) == 1

    check(await recovered(tmp_path), durable, at_most=durable)
