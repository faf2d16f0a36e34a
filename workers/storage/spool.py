"""On-disk spool: where batches wait while PostgreSQL is unreachable.

A directory (`<spool_dir>/<collector>/`) of append-only segment files named
`<sequence>.seg`, replayed in sequence order. A segment is a run of framed
records:

    4 bytes big-endian payload length | 4 bytes big-endian CRC32 of payload | payload

and a payload is UTF-8 JSON `{"t": table, "c": [columns], "r": [[value, ...], ...]}`
whose values are the text forms PostgreSQL receives (strings or null), so
Decimals, 78-digit ids and timestamps survive exactly. Every append is
fsynced before it returns (the directory too when a segment is created): a
batch the Writer handed to the spool survives a crash or power loss.

A power loss can still leave a torn last record. Reading stops at the first
record whose header or payload is short, whose length is absurd, or whose CRC
does not match; the bytes from there on are copied to `<segment>.corrupt` (never
silently dropped), reported, and the intact prefix is what replays.

Rows the database rejects for a data reason are appended to `rejected.jsonl`
in the same directory (one JSON object per row, with the error).

One process owns a spool directory at a time (an flock on `.lock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from workers.errors import CollectorError

log = logging.getLogger(__name__)

HEADER = struct.Struct(">II")
MAX_RECORD = 256 * 1024 * 1024  # a length beyond this is corruption, not data
SEGMENT_BYTES = 64 * 1024 * 1024  # start a new segment past this size
SUFFIX = ".seg"


class SpoolError(CollectorError):
    """The spool directory cannot be used (locked by another process, unwritable,
    owned or writable by another account). A restart cannot fix it: exit 78, and
    the supervisor marks the collector FATAL until the operator fixes it and reloads.
    """

    exit_code = 78


@dataclass
class Record:
    table: str
    columns: list[str]
    rows: list[list[str | None]]


@dataclass
class Corruption:
    segment: Path
    offset: int  # where the intact prefix ends
    lost_bytes: int
    reason: str
    saved_to: Path | None


def encode(record: Record) -> bytes:
    """One framed record."""
    # surrogatepass: a lone surrogate in a string (bad upstream data) must not
    # make the batch unspoolable; the database refuses that row later, visibly.
    payload = json.dumps(
        {"t": record.table, "c": record.columns, "r": record.rows}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8", "surrogatepass")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> Record:
    """The record in payload; ValueError unless it has exactly the shape encode() writes.

    A CRC only proves the bytes are the ones written, not that this version
    wrote them (or that anyone honest did): a table name that is not a
    non-empty string, columns that are not strings, rows that are not lists of
    len(columns) strings-or-null are corruption, never half a record.
    """
    try:
        obj = json.loads(payload.decode("utf-8", "surrogatepass"))
    except RecursionError:  # "[[[[...": a nesting depth no record of ours has
        raise ValueError("nested too deeply") from None
    if type(obj) is not dict:
        raise ValueError(f"a {type(obj).__name__}, not an object")
    table, columns, rows = obj.get("t"), obj.get("c"), obj.get("r")
    if type(table) is not str or not table:
        raise ValueError("table is not a non-empty string")
    if type(columns) is not list or not columns or any(type(c) is not str or not c for c in columns):
        raise ValueError("columns are not a list of non-empty strings")
    if len(set(columns)) != len(columns):
        raise ValueError("a column is named twice")
    if type(rows) is not list:
        raise ValueError("rows are not a list")
    width = len(columns)
    for row in rows:
        if type(row) is not list or len(row) != width:
            raise ValueError(f"a row is not a list of {width} values")
        for value in row:
            if type(value) is not str and value is not None:
                raise ValueError(f"a value is a {type(value).__name__}, not a string or null")
    return Record(table, columns, rows)


class Spool:
    """Append-only, fsynced, segment files in one directory."""

    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = SEGMENT_BYTES, fsync: bool = True):
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock_fd = -1
        self._active: Path | None = None
        self._active_fd = -1
        self._active_size = 0
        self._next_seq = 1
        # In memory, so the collector's hot loop never lists the directory:
        # segment path -> size in bytes, oldest first (only this process writes here).
        self._segments: dict[Path, int] = {}
        # Totals kept as plain ints so another thread can read them (stats) safely.
        self.bytes = 0
        self.count = 0
        self.corruptions: list[Corruption] = []

    # -- lifecycle ------------------------------------------------------------
    def open(self) -> None:
        """Create the directory, check who can write it, take the lock, find earlier segments.

        Whatever sits in the spool is replayed into PostgreSQL as it is, so a
        spool another account can write to is a way to inject rows: a directory
        (or segment) owned by another user (root excepted), or one writable by
        group/others that we cannot tighten, is refused with SpoolError. Our own
        directory found group/world-writable is tightened, with a warning.
        """
        self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._check_directory()
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"spool {self.directory} is in use by another process") from None
        self._lock_fd = fd
        existing = sorted(p for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit())
        try:
            self._check_segments(existing)
        except BaseException:
            os.close(fd)
            self._lock_fd = -1
            raise
        self._segments = {p: p.stat().st_size for p in existing}
        self.bytes = sum(self._segments.values())
        self.count = len(self._segments)
        self._next_seq = (int(existing[-1].stem) + 1) if existing else 1

    def _check_directory(self) -> None:
        st = os.stat(self.directory)
        euid = os.geteuid()
        loose = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in (euid, 0):
            raise SpoolError(
                f"spool {self.directory} is owned by uid {st.st_uid}, not by this process (uid {euid}): "
                "that account could inject rows through it; chown it to this account or remove it"
            )
        if not loose:
            return
        if st.st_uid == euid:
            os.chmod(self.directory, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
            log.warning(
                "spool %s was writable by group/others (mode %04o), so other accounts could inject rows; "
                "permissions tightened to %04o (check the segments in it)",
                self.directory, stat.S_IMODE(st.st_mode), stat.S_IMODE(st.st_mode) & ~loose,
            )
            return
        raise SpoolError(
            f"spool {self.directory} is owned by root and writable by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): other accounts could inject rows through it; chmod go-w it"
        )

    def _check_segments(self, segments: list[Path]) -> None:
        """A segment another account owns or can write is not ours to replay."""
        euid = os.geteuid()
        for path in segments:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != euid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise SpoolError(
                    f"spool segment {path} is not a regular file of this account (uid {st.st_uid}, mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): it could carry injected rows; inspect it and move it "
                    "out of the spool"
                )

    def close(self) -> None:
        """Seal the active segment and release the lock."""
        self.seal()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the fd releases the flock
            self._lock_fd = -1

    # -- writing -------------------------------------------------------------
    def append(self, record: Record) -> int:
        """Append one record durably (write + fsync); returns the bytes written."""
        data = encode(record)
        if self._active_fd < 0 or self._active_size >= self.segment_bytes:
            self.seal()
            self._open_segment()
        view = memoryview(data)
        while view:
            written = os.write(self._active_fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._active_fd)
        self._active_size += len(data)
        self._segments[self._active] += len(data)
        self.bytes += len(data)
        return len(data)

    def _open_segment(self) -> None:
        path = self.directory / f"{self._next_seq:012d}{SUFFIX}"
        self._next_seq += 1
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._active = path
        self._active_size = 0
        self._segments[path] = 0
        self.count += 1
        if self.fsync:
            self._fsync_dir()

    def seal(self) -> None:
        """Close the segment being appended to; the next append starts a new one."""
        if self._active_fd >= 0:
            os.close(self._active_fd)
        self._active_fd = -1
        self._active = None
        self._active_size = 0

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading -------------------------------------------------------------
    def segments(self) -> list[Path]:
        """All segment files, oldest first (the active one included)."""
        return list(self._segments)

    def sealed(self) -> list[Path]:
        """Segments no longer appended to, oldest first: what may replay now."""
        return [p for p in self.segments() if p != self._active]

    @property
    def active(self) -> Path | None:
        return self._active

    def pending(self) -> bool:
        return bool(self._segments)

    def size(self) -> tuple[int, int]:
        """(bytes, segment count) waiting in the spool."""
        return self.bytes, self.count

    def read(self, segment: Path, offset: int = 0) -> Iterator[tuple[Record, int]]:
        """Yield (record, offset after it) from offset on.

        At the first torn or corrupt record: save the remaining bytes to
        <segment>.corrupt, log an error, remember a Corruption, and stop.
        """
        with open(segment, "rb") as f:
            data = f.read()
        pos = offset
        end = len(data)
        while pos < end:
            reason = None
            if end - pos < HEADER.size:
                reason = f"torn header ({end - pos} of {HEADER.size} bytes)"
            else:
                length, crc = HEADER.unpack_from(data, pos)
                start = pos + HEADER.size
                if length > MAX_RECORD:
                    reason = f"impossible record length {length}"
                elif start + length > end:
                    reason = f"torn record ({end - start} of {length} bytes)"
                else:
                    payload = data[start : start + length]
                    if zlib.crc32(payload) != crc:
                        reason = "CRC mismatch"
                    else:
                        try:
                            record = decode_payload(payload)
                        except (ValueError, KeyError, TypeError, RecursionError, MemoryError) as err:
                            reason = f"undecodable record ({err})"
            if reason is not None:
                self._corrupt(segment, data, pos, reason)
                return
            pos = start + length
            yield record, pos

    def _corrupt(self, segment: Path, data: bytes, pos: int, reason: str) -> None:
        saved: Path | None = segment.with_name(f"{segment.name}.{int(time.time())}.corrupt")
        try:
            with open(saved, "wb") as f:
                f.write(data[pos:])
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            log.error("spool: cannot save corrupt tail of %s: %s", segment.name, err)
            saved = None
        self.corruptions.append(Corruption(segment, pos, len(data) - pos, reason, saved))
        log.error(
            "spool: segment %s is corrupt at byte %d (%s); replaying the %d intact bytes before it; "
            "%d bytes saved to %s",
            segment.name, pos, reason, pos, len(data) - pos, saved.name if saved else "(nowhere)",
        )

    def remove(self, segment: Path) -> None:
        """Delete a fully replayed segment."""
        if segment == self._active:
            self.seal()
        segment.unlink(missing_ok=True)
        size = self._segments.pop(segment, None)
        if size is not None:
            self.bytes -= size
            self.count -= 1
        if self.fsync:
            self._fsync_dir()

    # -- rejected rows -----------------------------------------------------------
    def reject(self, table: str, columns: list[str], row: list, error: str) -> None:
        """Append a row the database refused (data error) to rejected.jsonl, durably."""
        self.reject_rows(table, columns, [row], error)

    def reject_rows(self, table: str, columns: list[str], rows: list[list], error: str) -> None:
        """Append rows that cannot be written to rejected.jsonl (one line each), one fsync for all."""
        at = round(time.time(), 3)
        data = "".join(
            json.dumps(
                {"at": at, "table": table, "error": error, "row": dict(zip(columns, row))},
                ensure_ascii=True,  # survives any string, lone surrogates included
                separators=(",", ":"),
            ) + "\n"
            for row in rows
        ).encode("utf-8")
        fd = os.open(self.directory / "rejected.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
