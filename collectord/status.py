"""status.json: the supervisor's view of its children, written atomically.

write() puts the document in a temporary file in the same directory, fsyncs it,
renames it over status.json and fsyncs the directory, so a reader (the CLI's
`status`) sees the old or the new document, never half of one.
"""

from __future__ import annotations

import json
import os
from typing import Any

VERSION = 1


def write(path: str, doc: dict[str, Any]) -> None:
    """Atomically replace `path` with doc as JSON (tmp + fsync + rename + dir fsync)."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    data = json.dumps(doc, indent=1, sort_keys=False, default=str).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


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
