"""status.json: the supervisor's view of its children, written atomically.

write() puts the document in a temporary file in the same directory and renames
it over status.json, so a reader (the CLI's `status`, the metrics child) sees the
old or the new document, never half of one. No fsync: the document is a live
view rewritten every few seconds, worthless after a crash, and a power loss that
empties it reads as "no status" (read_status returns None), never as wrong data.
"""

from __future__ import annotations

import json
import os
from typing import Any

VERSION = 1


def write(path: str, doc: dict[str, Any]) -> None:
    """Atomically replace `path` with doc as JSON (tmp file + rename).

    The tmp file is created afresh (a leftover, or a symlink planted in its
    place, is unlinked first; O_EXCL|O_NOFOLLOW), so the write never lands in
    another file.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    data = json.dumps(doc, indent=1, sort_keys=False, default=str).encode()
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_status(path: str) -> dict[str, Any] | None:
    """The last status document, or None when there is none (or it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return doc if isinstance(doc, dict) else None


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
