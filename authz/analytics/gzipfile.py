"""The analytics buffer's file primitives: a gzip NDJSON file written in durable steps, and salvage.

Each ``OpenFile.append`` compresses, ends with a zlib sync flush (the last one with the gzip trailer),
writes at the file's end and fsyncs, so everything appended so far can be read back after a crash even
without the trailer; a failed write is undone (the compressor restored, the file cut back). ``recompress``
salvages the complete lines of a damaged or unfinished file into a new one. Module-level functions, so
that tests inject failures and crashes here (``write_at``, ``replace``).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final, Literal

log = logging.getLogger(__name__)

Tenant = tuple[str, str]  # (org, env)

LEVEL: Final = 6  # gzip's default, as Go's gzip.NewWriter
GZIP: Final = 31  # zlib wbits: a gzip header and trailer
READ_CHUNK: Final = 1 << 18


def write_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of data at offset."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_renamed(*directories: Path) -> None:
    """After a rename that happened: a failed fsync only loses it on a power cut, not worth undoing."""
    for directory in directories:
        try:
            fsync_dir(directory)
        except OSError as exc:
            log.warning("analytics: cannot fsync %s: %s", directory, exc)


def create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


class OpenFile:
    """A tenant's open file. Used only under the buffer's lock, in its worker thread."""

    __slots__ = ("tenant", "path", "created", "opened", "fd", "comp", "size", "records", "broken")

    def __init__(self, tenant: Tenant, path: Path, created: float, opened: float, fd: int) -> None:
        self.tenant, self.path, self.created, self.opened, self.fd = tenant, path, created, opened, fd
        self.comp = zlib.compressobj(LEVEL, zlib.DEFLATED, GZIP)
        self.size = 0
        self.records = 0
        self.broken = False  # a failed write could not be undone: the file is salvaged, never appended to

    def append(self, data: bytes, records: int, *, last: bool = False) -> None:
        """Compress data, write it and fsync; on OSError, undo (or mark the file broken) and re-raise."""
        before = self.comp.copy()
        out = self.comp.compress(data) + self.comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
        try:
            write_at(self.fd, out, self.size)
            os.fsync(self.fd)
        except OSError:
            self.comp = before
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                self.broken = True
            raise
        self.size += len(out)
        self.records += records


def inflate(
    f: BinaryIO, sink: Callable[[bytes], None], limit: int | None = None
) -> Literal["clean", "truncated", "corrupt"]:
    """Feed sink the decompressed bytes of each gzip member of f (its first limit bytes), until the data
    ends or is damaged."""
    d = zlib.decompressobj(GZIP)
    fed = False
    left = -1 if limit is None else limit
    while chunk := f.read(READ_CHUNK if left < 0 else min(READ_CHUNK, left)):
        left -= len(chunk)
        while chunk:
            fed = True
            try:
                sink(d.decompress(chunk))
            except zlib.error:  # bad header, bad deflate data, bad CRC: keep what came before
                return "corrupt"
            if not d.eof:
                break
            chunk, d, fed = d.unused_data, zlib.decompressobj(GZIP), False
    return "truncated" if fed else "clean"


def recompress(src: Path, dst: Path, limit: int | None = None) -> tuple[str, int]:
    """Write the complete lines readable from src (its first limit bytes) to a new gzip file dst,
    fsynced: (state, lines)."""
    comp = zlib.compressobj(LEVEL, zlib.DEFLATED, GZIP)
    fd = create(dst)
    offset, records, tail = 0, 0, b""

    def sink(data: bytes) -> None:
        nonlocal offset, records, tail
        data = tail + data
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if cut:
            records += data.count(b"\n", 0, cut)
            out = comp.compress(data[:cut])
            write_at(fd, out, offset)
            offset += len(out)

    try:
        with open(src, "rb") as f:
            state = inflate(f, sink, limit)
        write_at(fd, comp.flush(), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return state, records
