"""Layout: the analytics directory on disk, its names, its lock, and the salvage of files left behind.

Under ``{temp_dir}/analytics/`` (directories 0700, files 0600), one directory per tenant ``org~env`` as in
the Go adapter (reference §6), so a file it left behind is picked up too::

    .lock                                          held by the one process that owns this temp_dir
    temp/org~env/{unix}-{random}.gz                the open file, appended to every flush_interval
    staging/org~env/{unix}-{random}-{records}.gz   closed, waiting for upload (the count: drops are counted)
    quarantine/org~env/...                         set aside: unreadable, or refused by Apigee for good

Salvage is idempotent: a salvaged file keeps its name's stem, and a temp file whose stem is already staged
(a crash after the rename, before the unlink) is just deleted. Everything here is blocking file work, run
by the buffer in its worker thread (the lock at start). Must not import grpc, envoy or httpx.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from authz.analytics import gzipfile
from authz.errors import ListenError

log = logging.getLogger(__name__)

Tenant = tuple[str, str]  # (org, env)

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # an org or env; Apigee's names are narrower
_STAGED = re.compile(r"(\d+)-([0-9a-f]{8})-(\d+)\.gz")
_OPEN = re.compile(r"(\d+)-([0-9a-f]{8})\.gz")
_FOREIGN = re.compile(r"(\d+)-.*\.gz")  # the Go adapter's {unix}-{uuid}.gz


def tenant_dir(tenant: Tenant) -> str | None:
    """The directory name ``org~env``, or None when either part could escape or confuse the layout."""
    org, env = tenant
    if all(_NAME.fullmatch(part) and part not in (".", "..") for part in (org, env)):
        return f"{org}~{env}"
    return None


def tenant_of(name: str) -> Tenant | None:
    """The tenant of a directory named ``org~env``; None for any other name."""
    org, sep, env = name.partition("~")
    return (org, env) if sep and tenant_dir((org, env)) == name else None


@dataclass(frozen=True)
class StagedFile:
    """A closed gzip NDJSON file waiting for upload."""

    path: Path
    tenant: Tenant
    records: int
    bytes: int
    created: float  # epoch seconds its first flush was written (whole seconds, from its name)


Salvaged = StagedFile | Literal["empty", "corrupt"]


class Layout:
    def __init__(self, temp_dir: str | Path) -> None:
        self.root = Path(temp_dir) / "analytics"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """An exclusive lock on ``{root}/.lock``: two processes salvaging each other's open files would
        upload records twice or lose them.

        Raises:
            ListenError: another process (or service) holds this temp_dir.
        """
        if self._lock_fd is not None:
            return
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            where = self.root.parent
            raise ListenError(
                f"global.temp_dir {where} is in use by another authz process: give each its own"
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def directory(self, kind: str, tenant: Tenant) -> Path:
        """``{root}/{kind}/{org~env}``, created (0700) if need be."""
        name = tenant_dir(tenant)
        assert name is not None  # the buffer refuses such a tenant; recovery skips such directories
        path = self.root / kind / name
        if not path.is_dir():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            for level in (self.root, self.root / kind, path):
                level.mkdir(mode=0o700, exist_ok=True)
        return path

    def new_file(self, tenant: Tenant, now: float, mono: float) -> gzipfile.OpenFile:
        """A new, empty temp file for tenant, its name durable in its directory."""
        directory = self.directory("temp", tenant)
        created = int(now)
        path = directory / f"{created}-{secrets.token_hex(4)}.gz"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            gzipfile.fsync_dir(directory)  # the file's name must survive a power loss, as its data will
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return gzipfile.OpenFile(tenant, path, float(created), mono, fd)

    def publish(self, f: gzipfile.OpenFile) -> StagedFile:
        """Rename a finished (closed) temp file into staging, its record count in its name."""
        directory = self.directory("staging", f.tenant)
        target = directory / f"{f.path.name[:-3]}-{f.records}.gz"
        gzipfile.replace(f.path, target)
        gzipfile.sync_renamed(directory, f.path.parent)
        return StagedFile(target, f.tenant, f.records, f.size, f.created)

    def set_aside(self, path: Path, tenant: Tenant) -> None:
        gzipfile.replace(path, self.directory("quarantine", tenant) / path.name)

    def salvage(self, src: Path, tenant: Tenant, limit: int | None = None) -> Salvaged:
        """Stage the complete lines of a file that was not closed (a crash, a failed close; its first
        limit bytes) or that the Go adapter staged; quarantine it when nothing in it is readable."""
        directory = self.directory("staging", tenant)
        ours = _OPEN.fullmatch(src.name)
        if ours:
            stem, created = src.name[:-3], int(ours[1])
            done = next(directory.glob(f"{stem}-*.gz"), None)
            if done is not None:  # staged before a crash (or a failed unlink) left the source behind
                src.unlink(missing_ok=True)
                return staged_file(done, tenant) or "empty"
        else:
            foreign = _FOREIGN.fullmatch(src.name)
            created = int(foreign[1]) if foreign else int(src.stat().st_mtime)
            stem = f"{created}-{secrets.token_hex(4)}"
        tmp = directory / f"{stem}.gz.tmp"
        state, records = gzipfile.recompress(src, tmp, limit)
        if records == 0:
            tmp.unlink()
            if state == "corrupt":
                self.set_aside(src, tenant)
                log.warning("analytics: %s has nothing readable: quarantined", src)
                return "corrupt"
            src.unlink()
            return "empty"
        if state == "corrupt":
            log.warning("analytics: %s is damaged: %d records before the damage kept", src, records)
        target = directory / f"{stem}-{records}.gz"
        gzipfile.replace(tmp, target)
        gzipfile.sync_renamed(directory)
        src.unlink()
        gzipfile.sync_renamed(src.parent)
        return StagedFile(target, tenant, records, size(target), float(created))

    def scan(self, in_use: set[Path]) -> tuple[list[StagedFile], int]:
        """Recovery: the staged files, salvaging the temp ones (but those in use) and foreign staged ones.
        Returns them and how many files were quarantined as corrupt."""
        staged: list[StagedFile] = []
        salvage: list[tuple[Path, Tenant]] = []
        for path, tenant in self._files("staging"):
            if path.name.endswith(".tmp"):
                path.unlink()  # a salvage cut short: its source is still there
            elif found := staged_file(path, tenant):
                staged.append(found)
            else:
                salvage.append((path, tenant))
        salvage += [(path, tenant) for path, tenant in self._files("temp") if path not in in_use]
        corrupt = 0
        for path, tenant in salvage:
            try:
                result = self.salvage(path, tenant)
            except OSError as exc:  # left in place for the next start
                log.error("analytics: cannot salvage %s: %s", path, exc)
                continue
            if isinstance(result, StagedFile):
                staged.append(result)
            corrupt += result == "corrupt"
        return staged, corrupt

    def _files(self, kind: str) -> list[tuple[Path, Tenant]]:
        found = []
        base = self.root / kind
        for directory in sorted(base.iterdir()) if base.is_dir() else ():
            tenant = tenant_of(directory.name)
            if tenant is None or not directory.is_dir():
                log.warning("analytics: %s is not an org~env directory: ignored", directory)
                continue
            found += [(path, tenant) for path in sorted(directory.iterdir()) if path.is_file()]
        return found


def staged_file(path: Path, tenant: Tenant) -> StagedFile | None:
    """A file this buffer staged, described by its name; None for another name."""
    ours = _STAGED.fullmatch(path.name)
    return StagedFile(path, tenant, int(ours[3]), size(path), float(ours[1])) if ours else None


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
