"""One log for every collectord process; each line names its process.

Line format: `2026-11-28 15:50:00,123 collectord: trades.0[4242] INFO workers.trades: ...`.
The supervisor sets the handlers up once (setup); children inherit them across
the fork and call set_process_name() so their lines say who they are. The file
handler is a WatchedFileHandler: after logrotate renames the file, every
process reopens it on its next line (and reopen() does so at once on SIGHUP).
Every open, first or after a rotation, refuses a symlink or anything but a
regular file at the log path (LogFile), so whoever can write the log directory
cannot point the daemon's lines, written as root or as its account, at another
file. `logfile = -` or foreground mode logs to stderr instead.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import stat
import sys

FORMAT = "%(asctime)s %(proc_title)s[%(process)d] %(levelname)s %(name)s: %(message)s"


class _ProcessName(logging.Filter):
    """Stamps each record with the process's collectord name (set after the fork)."""

    def __init__(self) -> None:
        super().__init__()
        self.title = "collectord: supervisor"

    def filter(self, record: logging.LogRecord) -> bool:
        record.proc_title = self.title
        return True


_name_filter = _ProcessName()


def open_log(path: str, encoding: str = "utf-8", errors: str | None = None):
    """Open `path` for appending, refusing a symlink or anything but a regular file.

    O_NOFOLLOW makes a symlink fail (ELOOP); O_NONBLOCK makes a FIFO planted there
    fail instead of hanging the daemon; then fstat must say regular file. A new
    file is created 0640. Raises OSError with a message saying which.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symlink; refusing to follow it", path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file; refusing", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding=encoding, errors=errors)
    except BaseException:
        os.close(fd)
        raise


class LogFile(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler that opens with open_log() and whose emit() never raises.

    The standard handler (re)opens its file inside emit() outside any try: a log
    file that cannot be reopened after a rotation (a symlink planted, permissions,
    no fds left) would raise out of whatever log call came next and take the
    supervisor down. Here that line is lost through handleError and the next
    line tries to open the file again.
    """

    def _open(self):
        return open_log(self.baseFilename, self.encoding or "utf-8", self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except Exception:
            self.handleError(record)


def set_process_name(name: str) -> None:
    """Lines from this process now read `collectord: <name>[pid]`."""
    _name_filter.title = f"collectord: {name}"


def _ours(handler: logging.Handler) -> bool:
    return getattr(handler, "_collectord", False)


def setup(logfile: str, loglevel: str = "INFO", *, foreground: bool = False) -> logging.Handler:
    """Install the one collectord handler on the root logger (replacing a previous one).

    Creates the log directory if needed; opens the new handler before removing
    the old, so an OSError leaves logging as it was. Returns the handler.
    """
    root = logging.getLogger()
    # The new handler first: if the file cannot be opened (OSError), the old one stays.
    if foreground or not logfile or logfile == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(os.path.dirname(logfile) or ".", exist_ok=True)
        handler = LogFile(logfile, encoding="utf-8")
    for old in list(root.handlers):
        if _ours(old):
            root.removeHandler(old)
            old.close()
    handler._collectord = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_name_filter)
    root.addHandler(handler)
    root.setLevel(getattr(logging, loglevel.upper(), logging.INFO))
    return handler


def reopen() -> None:
    """Reopen every collectord log file now (SIGHUP / SIGUSR1, after logrotate).

    The new file is opened before the old one is closed; if it cannot be
    opened (OSError is raised), the handler keeps writing to the old one.
    """
    for handler in logging.getLogger().handlers:
        if _ours(handler) and isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.acquire()
            try:
                stream = handler._open()
                old, handler.stream = handler.stream, stream
                handler._statstream()
                if old:
                    old.flush()
                    old.close()
            finally:
                handler.release()


def set_level(loglevel: str) -> None:
    logging.getLogger().setLevel(getattr(logging, loglevel.upper(), logging.INFO))


def detach_files() -> None:
    """In a new child: let go of the inherited log file; the next line opens it afresh.

    A child then holds the log only while it writes to it, so one that never
    logs keeps no fd on a file logrotate renamed or deleted.
    """
    for handler in logging.getLogger().handlers:
        if _ours(handler) and isinstance(handler, logging.handlers.WatchedFileHandler):
            stream, handler.stream = handler.stream, None
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def fds() -> set[int]:
    """File descriptors the log handlers write to (a child keeps these open)."""
    out = set()
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            if stream is not None:
                out.add(stream.fileno())
        except (OSError, ValueError):
            pass
    return out


def flush() -> None:
    """Flush every handler and the std streams (before os._exit in a child)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
