"""The analytics buffer on a tmp_path: gzip NDJSON per tenant, rotation, caps, injected ENOSPC, recovery.

No sleeps: tests call flush() / rotate() / recover() and move a FakeClock; run() is driven once, by an event.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import random
import re
import stat
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from authz.analytics import gzipfile
from authz.analytics.buffer import Buffer, StagedFile, Tenant
from authz.errors import ListenError
from authz.metrics import Metrics, new_metrics
from tests.support.clock import FakeClock

PROD: Tenant = ("org", "prod")
TEST: Tenant = ("org", "test")
START = 1_800_000_000.0


def line(i: int, tenant: Tenant = PROD) -> bytes:
    return json.dumps({"gateway_flow_id": f"{tenant[0]}~{tenant[1]}:{i}", "pad": "x" * 40}).encode() + b"\n"


def lines(n: int, tenant: Tenant = PROD, first: int = 0) -> list[bytes]:
    return [line(i, tenant) for i in range(first, first + n)]


def put_all(buf: Buffer, tenant: Tenant, items: Iterable[bytes]) -> None:
    for item in items:
        assert buf.put(tenant, item)


def gunzip(path: Path) -> list[bytes]:
    """The lines of a staged file, checking it is ONE complete gzip member with nothing after it."""
    d = zlib.decompressobj(31)
    data = d.decompress(path.read_bytes())
    assert d.eof and d.unused_data == b"", path
    return data.splitlines(keepends=True)


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"org": "org", **labels}) or 0.0


def accepted(metrics: Metrics, env: str = "prod") -> float:
    return count(metrics, "analytics_records_total", env=env, status="accepted")


def dropped(metrics: Metrics, reason: str) -> float:
    return count(metrics, "analytics_records_dropped_total", reason=reason)


def files(root: Path, kind: str) -> list[Path]:
    base = root / "analytics" / kind
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def metrics() -> Metrics:
    return new_metrics()


@pytest.fixture
def make(tmp_path: Path, clock: FakeClock, metrics: Metrics) -> Callable[..., Buffer]:
    def make(**kw: object) -> Buffer:
        return Buffer(tmp_path, "org", metrics, clock, **kw)  # type: ignore[arg-type]

    return make


def fail_writes(monkeypatch: pytest.MonkeyPatch, *, after_half: bool = True) -> list[int]:
    """Every write to a file of the buffer writes half its bytes (a partial write), then fails: ENOSPC."""
    real, calls = gzipfile.write_at, []

    def write(fd: int, data: bytes, offset: int) -> None:
        calls.append(len(data))
        if after_half:
            real(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gzipfile, "write_at", write)
    return calls


# --- writing, flushing, rotating --------------------------------------------------------------------


async def test_lines_round_trip_through_one_gzip_member_per_file(make, metrics, tmp_path):
    buf = make()
    sent = lines(300)
    for chunk in (sent[:100], sent[100:101], sent[101:]):  # three flushes, one file
        put_all(buf, PROD, chunk)
        assert accepted(metrics) == len(sent[: sent.index(chunk[0])])  # accepted only once on disk
        await buf.flush()
    assert accepted(metrics) == 300 and buf.pending == 0

    await buf.rotate()

    (staged,) = buf.staged()
    assert gunzip(staged.path) == sent
    assert re.fullmatch(r"1800000000-[0-9a-f]{8}-300\.gz", staged.path.name)
    assert staged.path.parent == tmp_path / "analytics" / "staging" / "org~prod"
    assert (staged.tenant, staged.records, staged.created) == (PROD, 300, START)
    assert staged.bytes == staged.path.stat().st_size
    assert files(tmp_path, "temp") == []
    assert stat.S_IMODE(staged.path.stat().st_mode) == 0o600
    for directory in (
        tmp_path / "analytics",
        staged.path.parent,
        tmp_path / "analytics" / "temp" / "org~prod",
    ):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


async def test_everything_flushed_is_readable_from_the_open_file(make, tmp_path):
    buf = make()
    put_all(buf, PROD, lines(10))
    await buf.flush()
    put_all(buf, PROD, lines(5, first=10))
    await buf.flush()

    (open_file,) = files(tmp_path, "temp")
    d = zlib.decompressobj(31)
    assert d.decompress(open_file.read_bytes()) == b"".join(lines(15))
    assert not d.eof  # no trailer until rotation: what a crash leaves


async def test_each_tenant_has_its_own_files_and_counts(make, metrics):
    buf = make()
    put_all(buf, PROD, lines(3, PROD))
    put_all(buf, TEST, lines(2, TEST))
    put_all(buf, ("other", "prod"), lines(1, ("other", "prod")))
    await buf.rotate()

    by_tenant = {f.tenant: f for f in buf.staged()}
    assert set(by_tenant) == {PROD, TEST, ("other", "prod")}
    assert gunzip(by_tenant[PROD].path) == lines(3, PROD)
    assert gunzip(by_tenant[TEST].path) == lines(2, TEST)
    assert by_tenant[("other", "prod")].path.parent.name == "other~prod"
    assert (accepted(metrics, "prod"), accepted(metrics, "test")) == (4, 2)  # org label: the service's


async def test_rotation_in_the_loop_stages_files_older_than_the_collection_interval(make, clock):
    buf = make(collection_interval=120.0)
    put_all(buf, PROD, lines(2))
    await buf.rotate(due_only=True)  # flushed, not due
    assert buf.staged() == []
    clock.advance(100)
    put_all(buf, TEST, lines(1, TEST))
    await buf.rotate(due_only=True)
    clock.advance(20)
    put_all(buf, PROD, lines(1, first=2))

    await buf.rotate(due_only=True)  # PROD's file is 120 s old, TEST's 20 s

    (staged,) = buf.staged()
    assert staged.tenant == PROD and staged.records == 3
    clock.advance(100)
    await buf.rotate(due_only=True)
    assert [f.tenant for f in buf.staged()] == [PROD, TEST]  # oldest first


async def test_nothing_written_means_no_file(make, tmp_path):
    buf = make()
    await buf.flush()
    await buf.rotate()
    assert buf.staged() == [] and files(tmp_path, "temp") == []


async def test_run_flushes_and_rotates_until_close(make, clock, metrics, monkeypatch):
    buf = make(flush_interval=0.0, collection_interval=60.0)
    passes = asyncio.Event()
    real = buf.rotate

    async def rotate(**kw: bool) -> None:
        await real(**kw)
        passes.set()

    monkeypatch.setattr(buf, "rotate", rotate)
    task = asyncio.create_task(buf.run())
    put_all(buf, PROD, lines(5))
    await asyncio.wait_for(passes.wait(), 5)
    assert accepted(metrics) == 5 and buf.staged() == []
    clock.advance(60)
    passes.clear()
    await asyncio.wait_for(passes.wait(), 5)
    assert [f.records for f in buf.staged()] == [5]

    put_all(buf, PROD, lines(2, first=5))
    await buf.close()
    await asyncio.wait_for(task, 5)
    assert sorted(f.records for f in buf.staged()) == [2, 5]
    assert not buf.put(PROD, line(9)) and dropped(metrics, "shutdown") == 1


# --- what put refuses -------------------------------------------------------------------------------


async def test_put_refuses_past_max_pending_and_counts_it(make, metrics):
    buf = make(max_pending=3)
    assert [buf.put(PROD, item) for item in lines(4)] == [True, True, True, False]
    assert not buf.put(TEST, line(0, TEST))
    assert dropped(metrics, "queue_full") == 2
    await buf.flush()
    assert buf.put(PROD, line(4)) and buf.pending == 1


@pytest.mark.parametrize(
    "tenant",
    [("a/b", "prod"), ("org", "../x"), ("..", "prod"), ("org", "."), ("", "prod"), ("org", "p~q"),
     ("o\x00", "prod"), ("org", "a\\b")],
)  # fmt: skip
async def test_put_refuses_a_tenant_unfit_for_a_directory_name(make, metrics, tmp_path, tenant):
    buf = make()
    assert not buf.put(tenant, line(0))
    assert dropped(metrics, "invalid") == 1
    await buf.rotate()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [b"{}", b"\n", b"", b'{"a":1}\n{"b":2}\n', b'{"a":\n1}\n'])
def test_put_refuses_what_is_not_exactly_one_line(make, metrics, bad):
    assert not make().put(PROD, bad)
    assert dropped(metrics, "invalid") == 1


# --- disk cap ---------------------------------------------------------------------------------------


async def staged_files(buf: Buffer, clock: FakeClock, sizes: Iterable[int]) -> list[StagedFile]:
    """One staged file per size (in records), each a minute after the previous one."""
    first = 0
    for n in sizes:
        put_all(buf, PROD, lines(n, first=first))
        first += n
        await buf.rotate()
        clock.advance(60)
    return buf.staged()


async def test_the_disk_cap_deletes_the_oldest_staged_files_and_counts_their_records(
    make, clock, metrics, caplog
):
    buf = make()
    staged = await staged_files(buf, clock, [10, 20, 30, 40])
    total = sum(f.bytes for f in staged)
    buf._max_bytes = total - staged[0].bytes - 1  # one byte too many for the last three
    put_all(buf, PROD, lines(50, first=100))  # an open file, never deleted

    await buf.flush()

    left = buf.staged()
    assert [f.records for f in left] == [40]  # the three oldest went
    assert not any(f.path.exists() for f in staged[:3])
    assert dropped(metrics, "overflow") == 60
    on_disk = sum(
        p.stat().st_size for p in files(buf.root.parent, "temp") + files(buf.root.parent, "staging")
    )
    assert on_disk <= buf._max_bytes
    assert "disk cap" in caplog.text
    assert count(metrics, "analytics_staged_files") == 1
    assert count(metrics, "analytics_staged_bytes") == on_disk


async def test_the_file_cap_keeps_the_newest_staged_files(make, clock, metrics, caplog):
    buf = make(max_files=2)  # analytics.file_limit
    staged = await staged_files(buf, clock, [10, 20, 30, 40])
    assert [f.records for f in staged] == [30, 40]  # the two oldest went
    assert len(files(buf.root.parent, "staging")) == 2
    assert dropped(metrics, "overflow") == 30
    assert "disk cap" in caplog.text


async def test_when_open_files_alone_fill_the_cap_new_lines_are_dropped(make, metrics):
    buf = make(max_bytes=1)
    put_all(buf, PROD, lines(5))
    await buf.flush()  # the first write always goes: under the cap before it
    put_all(buf, PROD, lines(3, first=5))
    await buf.flush()
    assert (accepted(metrics), dropped(metrics, "overflow")) == (5, 3)
    await buf.rotate()  # staged now, and over the cap: the oldest staged file goes
    assert buf.staged() == [] and dropped(metrics, "overflow") == 8


# --- a full disk ------------------------------------------------------------------------------------


async def test_enospc_drops_that_flush_counted_and_the_next_flush_writes(make, metrics, monkeypatch, caplog):
    buf = make()
    put_all(buf, PROD, lines(10))
    await buf.flush()
    calls = fail_writes(monkeypatch)
    put_all(buf, PROD, lines(7, first=10))
    await buf.flush()
    assert calls and (accepted(metrics), dropped(metrics, "disk_full")) == (10, 7)
    assert "7 records dropped (disk_full)" in caplog.text

    monkeypatch.undo()
    put_all(buf, PROD, lines(5, first=17))
    await buf.flush()
    await buf.rotate()

    (staged,) = buf.staged()
    assert gunzip(staged.path) == lines(10) + lines(5, first=17)  # the half write was undone
    assert staged.records == 15 and accepted(metrics) == 15


async def test_enospc_on_a_new_file_and_on_close(make, metrics, monkeypatch, tmp_path):
    buf = make()
    fail_writes(monkeypatch, after_half=False)
    put_all(buf, PROD, lines(3))
    await buf.flush()  # the file is created, its first write fails
    await buf.rotate()  # nothing in it: deleted, not staged
    assert dropped(metrics, "disk_full") == 3 and buf.staged() == [] and files(tmp_path, "temp") == []

    monkeypatch.undo()
    put_all(buf, PROD, lines(4))
    await buf.flush()
    fail_writes(monkeypatch)
    await buf.rotate()  # the trailer cannot be written: the file stays open
    assert buf.staged() == [] and len(files(tmp_path, "temp")) == 1
    monkeypatch.undo()
    put_all(buf, PROD, lines(1, first=4))
    await buf.rotate()
    (staged,) = buf.staged()
    assert gunzip(staged.path) == lines(5)


async def test_a_write_that_cannot_be_undone_leaves_a_file_salvaged_at_the_next_rotation(
    make, metrics, monkeypatch
):
    buf = make()
    put_all(buf, PROD, lines(6))
    await buf.flush()
    fail_writes(monkeypatch)

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(gzipfile.os, "ftruncate", no_truncate)
    put_all(buf, PROD, lines(2, first=6))
    await buf.flush()  # half a flush stays in the file, after 6 good lines
    monkeypatch.undo()
    put_all(buf, PROD, lines(3, first=8))
    await buf.flush()  # a new file
    await buf.rotate()

    assert sorted(gunzip(f.path) for f in buf.staged()) == sorted([lines(6), lines(3, first=8)])
    assert dropped(metrics, "disk_full") == 2


async def test_a_file_that_cannot_be_renamed_is_salvaged_at_the_next_rotation(
    make, metrics, monkeypatch, tmp_path
):
    buf = make()
    put_all(buf, PROD, lines(4))

    def no_rename(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gzipfile, "replace", no_rename)
    await buf.rotate()  # closed (its trailer written), not renamed
    assert buf.staged() == [] and len(files(tmp_path, "temp")) == 1
    await buf.rotate()  # still failing: kept for the next try
    assert buf.staged() == [] and len(files(tmp_path, "temp")) == 1
    monkeypatch.undo()
    await buf.rotate()
    (staged,) = buf.staged()
    assert gunzip(staged.path) == lines(4) and files(tmp_path, "temp") == []
    assert accepted(metrics) == 4 and dropped(metrics, "disk_full") == 0


async def test_a_stuck_file_found_unreadable_at_its_salvage_is_quarantined_and_counted(
    make, metrics, monkeypatch, tmp_path
):
    buf = make()
    put_all(buf, PROD, lines(4))

    def no_rename(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gzipfile, "replace", no_rename)
    await buf.rotate()
    monkeypatch.undo()
    (stuck,) = files(tmp_path, "temp")
    stuck.write_bytes(b"\0" * stuck.stat().st_size)  # damaged on disk before the next try
    await buf.rotate()

    assert buf.staged() == [] and files(tmp_path, "temp") == []
    assert [p.name for p in files(tmp_path, "quarantine")] == [stuck.name]
    assert count(metrics, "analytics_files_quarantined_total", reason="corrupt") == 1


async def test_an_unwritable_temp_dir_drops_and_counts(tmp_path, clock, metrics):
    (tmp_path / "file").write_text("not a directory")
    buf = Buffer(tmp_path / "file", "org", metrics, clock)
    put_all(buf, PROD, lines(2))
    await buf.flush()
    assert dropped(metrics, "disk_full") == 2


async def test_a_cancelled_flush_finishes_its_file_work_before_the_next_one(make, metrics, monkeypatch):
    buf = make()
    entered, release = threading.Event(), threading.Event()
    real = gzipfile.write_at

    def slow_write(fd: int, data: bytes, offset: int) -> None:
        entered.set()
        assert release.wait(5)
        real(fd, data, offset)

    monkeypatch.setattr(gzipfile, "write_at", slow_write)
    put_all(buf, PROD, lines(3))
    first = asyncio.create_task(buf.flush())
    assert await asyncio.to_thread(entered.wait, 5)
    first.cancel()
    put_all(buf, PROD, lines(2, first=3))
    second = asyncio.create_task(buf.flush())
    await asyncio.sleep(0)
    release.set()
    await second
    with pytest.raises(asyncio.CancelledError):
        await first
    await buf.rotate()
    (staged,) = buf.staged()
    assert gunzip(staged.path) == lines(5) and accepted(metrics) == 5


# --- the uploader's side ----------------------------------------------------------------------------


async def test_done_deletes_and_quarantine_sets_aside_and_counts_the_records(make, clock, metrics, tmp_path):
    buf = make()
    first, second, third = await staged_files(buf, clock, [1, 2, 3])
    assert count(metrics, "analytics_oldest_staged_seconds") == 120  # as of the last rotation
    buf.done(first)
    assert not first.path.exists()
    buf.quarantine(second, "permanent_error")

    assert buf.staged() == [third]
    assert (tmp_path / "analytics" / "quarantine" / "org~prod" / second.path.name).exists()
    assert dropped(metrics, "quarantined") == 2  # the file itself: counted by the caller (the uploader)
    assert count(metrics, "analytics_staged_files") == 1
    assert count(metrics, "analytics_oldest_staged_seconds") == 60
    buf.done(first)  # twice, or after a drop: nothing happens
    buf.quarantine(second, "permanent_error")
    assert dropped(metrics, "quarantined") == 2


# --- recovery ---------------------------------------------------------------------------------------


def flushed_file(batches: list[list[bytes]]) -> tuple[bytes, list[int]]:
    """The bytes of an open file after one flush per batch, and its size after each flush."""
    comp, data, sizes = zlib.compressobj(gzipfile.LEVEL, zlib.DEFLATED, 31), b"", []
    for batch in batches:
        data += comp.compress(b"".join(batch)) + comp.flush(zlib.Z_SYNC_FLUSH)
        sizes.append(len(data))
    return data, sizes


def leave(
    tmp_path: Path, tenant: Tenant, data: bytes, name: str = "1799999000-0badc0de.gz", kind: str = "temp"
) -> Path:
    directory = tmp_path / "analytics" / kind / f"{tenant[0]}~{tenant[1]}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def staged_lines(buf: Buffer, tenant: Tenant | None = None) -> list[bytes]:
    return [item for f in buf.staged() if tenant in (None, f.tenant) for item in gunzip(f.path)]


async def test_recovery_keeps_every_complete_line_before_a_truncation(tmp_path, clock):
    batches = [lines(40, first=0), lines(1, first=40), lines(59, first=41)]
    sent = [item for batch in batches for item in batch]
    data, sizes = flushed_file(batches)
    cuts = sorted({0, 1, 5, 9, 10, 11, *sizes, *(s - 1 for s in sizes), *range(12, len(data), 97)})
    for cut in cuts:
        root = tmp_path / str(cut)
        leave(root, PROD, data[:cut])
        buf = Buffer(root, "org", new_metrics(), clock)
        await buf.recover()

        kept = staged_lines(buf)
        assert kept == sent[: len(kept)], cut  # a prefix: nothing partial, nothing out of order
        flushes_before_cut = [size for size in sizes if size <= cut]
        assert len(kept) >= sum(len(b) for b in batches[: len(flushes_before_cut)]), cut
        assert files(root, "temp") == [] and files(root, "quarantine") == []
        if kept:
            assert [f.records for f in buf.staged()] == [len(kept)]
            assert buf.staged()[0].created == 1799999000


async def test_recovery_of_a_complete_file_left_before_its_rename(tmp_path, clock):
    data = gzip.compress(b"".join(lines(7)))  # rotation wrote the trailer, then the process died
    leave(tmp_path, PROD, data)
    buf = Buffer(tmp_path, "org", new_metrics(), clock)
    await buf.recover()
    (staged,) = buf.staged()
    assert staged.path.name == "1799999000-0badc0de-7.gz" and gunzip(staged.path) == lines(7)


async def test_recovery_quarantines_a_file_with_nothing_readable(tmp_path, clock, metrics):
    garbage = random.Random(6).randbytes(5000)
    path = leave(tmp_path, PROD, garbage)
    buf = Buffer(tmp_path, "org", metrics, clock)
    await buf.recover()
    assert buf.staged() == [] and files(tmp_path, "staging") == []
    assert files(tmp_path, "quarantine") == [tmp_path / "analytics" / "quarantine" / "org~prod" / path.name]
    assert count(metrics, "analytics_files_quarantined_total", reason="corrupt") == 1


@pytest.mark.parametrize(
    "data", [b"", b"\x1f\x8b", gzip.compress(b"")], ids=["empty", "half-header", "no-lines"]
)
async def test_recovery_deletes_a_file_with_nothing_in_it(tmp_path, clock, metrics, data):
    leave(tmp_path, PROD, data)
    buf = Buffer(tmp_path, "org", metrics, clock)
    await buf.recover()
    assert buf.staged() == [] and files(tmp_path, "temp") == [] and files(tmp_path, "quarantine") == []


async def test_recovery_keeps_the_lines_before_damage(tmp_path, clock):
    good = gzip.compress(b"".join(lines(4)))
    leave(tmp_path, PROD, good + b"\x00" * 512, name="1799999000-00000001.gz")  # zeros after a crash
    data, _ = flushed_file([lines(3, TEST)])
    flipped = data[:-8] + bytes(b ^ 0xFF for b in data[-8:])
    leave(tmp_path, TEST, flipped + gzip.compress(b"".join(lines(2, TEST))), name="1799999000-00000002.gz")
    buf = Buffer(tmp_path, "org", new_metrics(), clock)
    await buf.recover()
    assert staged_lines(buf, PROD) == lines(4)
    kept = staged_lines(buf, TEST)
    assert kept == lines(3, TEST)[: len(kept)]


async def test_recovery_stages_each_file_for_its_own_tenant(tmp_path, clock):
    """The Go adapter re-queued every tenant's files under the current one (reference §6)."""
    other: Tenant = ("other-org", "test")
    leave(tmp_path, PROD, flushed_file([lines(3, PROD)])[0])
    leave(tmp_path, other, flushed_file([lines(2, other)])[0])
    leave(
        tmp_path,
        other,
        gzip.compress(b"".join(lines(4, other, first=2))),
        "1799990000-12345678-4.gz",
        "staging",
    )

    buf = Buffer(tmp_path, "org", new_metrics(), clock)
    await buf.recover()

    assert staged_lines(buf, PROD) == lines(3, PROD)
    assert sorted(staged_lines(buf, other)) == sorted(lines(6, other))
    for f in buf.staged():
        assert f.path.parent.name == f"{f.tenant[0]}~{f.tenant[1]}"
        assert all(
            json.loads(item)["gateway_flow_id"].startswith(f.path.parent.name) for item in gunzip(f.path)
        )
    assert buf.staged()[0].records == 4  # oldest first: by the time in their names
    assert files(tmp_path, "temp") == []


async def test_recovery_is_idempotent_across_a_crash_inside_it(tmp_path, clock):
    data = flushed_file([lines(5)])[0]
    source = leave(tmp_path, PROD, data)
    buf = Buffer(tmp_path, "org", new_metrics(), clock)
    await buf.recover()
    (staged,) = buf.staged()
    leave(tmp_path, PROD, data)  # as if the process died after the rename, before deleting the source
    leave(tmp_path, PROD, b"partial", name=f"{source.name}.tmp", kind="staging")  # and a salvage cut short
    buf._layout.unlock()  # the process "died": the OS releases its lock

    again = Buffer(tmp_path, "org", new_metrics(), clock)
    await again.recover()

    assert again.staged() == [staged] and gunzip(staged.path) == lines(5)
    assert files(tmp_path, "temp") == [] and files(tmp_path, "staging") == [staged.path]


async def test_recovery_restages_the_go_adapters_files_with_a_count(tmp_path, clock):
    name = "1799999000-6ba7b810-9dad-11d1-80b4-00c04fd430c8.gz"
    leave(tmp_path, PROD, gzip.compress(b"".join(lines(3))), name, "staging")
    buf = Buffer(tmp_path, "org", new_metrics(), clock)
    await buf.recover()
    (staged,) = buf.staged()
    assert re.fullmatch(r"1799999000-[0-9a-f]{8}-3\.gz", staged.path.name) and gunzip(staged.path) == lines(3)


async def test_recovery_ignores_directories_that_are_not_a_tenant(tmp_path, clock, caplog):
    stray = tmp_path / "analytics" / "temp" / "no-tilde"
    stray.mkdir(parents=True)
    (stray / "x.gz").write_bytes(b"x")
    buf = Buffer(tmp_path, "org", new_metrics(), clock)
    await buf.recover()
    assert (stray / "x.gz").exists() and buf.staged() == []
    assert "not an org~env directory" in caplog.text


async def test_recovery_then_the_disk_cap(tmp_path, clock, metrics):
    for i in range(3):
        leave(
            tmp_path,
            PROD,
            gzip.compress(b"".join(lines(10, first=10 * i))),
            f"179999900{i}-0000000{i}-10.gz",
            "staging",
        )
    size = sum(p.stat().st_size for p in files(tmp_path, "staging"))
    buf = Buffer(tmp_path, "org", metrics, clock, max_bytes=size - 1)
    await buf.recover()
    assert [f.path.name for f in buf.staged()] == ["1799999001-00000001-10.gz", "1799999002-00000002-10.gz"]
    assert dropped(metrics, "overflow") == 10


async def test_one_process_per_temp_dir(tmp_path, clock):
    first = Buffer(tmp_path, "org", new_metrics(), clock)
    await first.recover()
    second = Buffer(tmp_path, "org", new_metrics(), clock)
    with pytest.raises(ListenError, match="is in use by another authz process"):
        await second.recover()
    await first.close()
    await second.recover()  # free again
    await second.close()
