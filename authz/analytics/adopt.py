"""Per-worker analytics directories, and the adoption of those left by workers that no longer run.

With ``authz serve --workers N`` every worker owns an analytics layout of its own (``layout.Layout``, with
its lock): worker 0 the one a single process uses, ``{temp_dir}/analytics``, and worker k >= 1
``{temp_dir}/worker-{k}/analytics``. Two workers never write, salvage or upload the same file.

After scaling down (N workers, then fewer, or one process), files of a worker numbered N or more would be
left unread. Worker 0 (and a single process, which is worker 0 of 1) adopts them at start, before its own
recovery: under the orphan's lock it moves every file of ``temp/``, ``staging/`` and ``quarantine/`` into
the same place of its own layout (a rename: the same filesystem), keeping each name, so its recovery then
salvages the open ones and uploads the staged ones, exactly as a crash of its own left them. A name already
present (practically impossible: seconds and 32 random bits) is left where it is for the next start.
Blocking file work: run it in a worker thread. Must not import grpc, envoy or httpx.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from authz.analytics import gzipfile
from authz.analytics.layout import Layout, tenant_of
from authz.errors import ListenError

log = logging.getLogger(__name__)

_WORKER_DIR = re.compile(r"worker-([1-9][0-9]*)")
KINDS = ("temp", "staging", "quarantine")


def worker_temp_dir(temp_dir: str, index: int) -> str:
    """The directory whose ``analytics/`` worker ``index`` owns: temp_dir itself for worker 0."""
    return temp_dir if index == 0 else os.path.join(temp_dir, f"worker-{index}")


def adopt_orphans(temp_dir: str, count: int) -> int:
    """Move the analytics files of workers numbered ``count`` or more into worker 0's layout.

    Returns how many files moved. An orphan whose lock is held (a process still runs on it) is skipped.

    Raises:
        ListenError: another process holds worker 0's layout (its own start would fail the same way).
    """
    root = Path(temp_dir)
    orphans = sorted(
        entry
        for entry in (root.iterdir() if root.is_dir() else ())
        if (match := _WORKER_DIR.fullmatch(entry.name)) and int(match[1]) >= count and entry.is_dir()
    )
    if not orphans:
        return 0
    target = Layout(temp_dir)
    target.lock()
    moved = 0
    try:
        for directory in orphans:
            moved += _adopt(Layout(directory), target, directory)
    finally:
        target.unlock()  # the buffer's recovery takes it again, with its own descriptor
    return moved


def _adopt(orphan: Layout, target: Layout, directory: Path) -> int:
    try:
        orphan.lock()
    except ListenError:
        log.warning("analytics: %s is in use by another process: not adopted", directory)
        return 0
    moved, left = 0, 0
    try:
        for kind in KINDS:
            base = orphan.root / kind
            for tenant_path in sorted(base.iterdir()) if base.is_dir() else ():
                tenant = tenant_of(tenant_path.name)
                if tenant is None or not tenant_path.is_dir():
                    left += 1
                    continue
                destination = target.directory(kind, tenant)
                for path in sorted(tenant_path.iterdir()):
                    if (destination / path.name).exists() or not path.is_file():
                        left += 1
                        continue
                    gzipfile.replace(path, destination / path.name)
                    moved += 1
                gzipfile.sync_renamed(destination, tenant_path)
    finally:
        orphan.unlock()
    if moved:
        log.info("analytics: adopted %d files of %s (a worker that no longer runs)", moved, directory)
    if left:
        log.warning("analytics: %d entries of %s could not be adopted: left in place", left, directory)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return moved
