"""write_json: the atomic write behind the on-disk snapshots (products, key index) that a cold start reads.

A temp file (mode 0600) in the target's directory (created 0700 if need be), fsync, rename: a reader sees
the old file or the new one, never half of one. Blocking: run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any


def write_json(path: str, document: dict[str, Any], prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(json.dumps(document, separators=(",", ":")).encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
