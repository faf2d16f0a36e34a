"""The PID file: a POSIX-locked file whose lock, not its number, says who is alive.

The daemon side (PidFile), in order:
  1. check the directory (created if missing) and refuse one another user could
     write to; open the file with O_NOFOLLOW (a symlink is refused) and refuse a
     file that is not a plain file of ours;
  2. take an exclusive `fcntl.lockf` lock without blocking (held until the
     process exits; the kernel drops it when the process dies, even by kill -9);
  3. make sure the locked inode is still the one at the path (a racing remover
     could have unlinked it between open and lock), else start over;
  4. write the pid INTO the locked file (truncate, write, fsync). Never renamed
     into place: a rename would swap the file out from under its lock.
  5. at exit, unlink the path while still holding the lock, then close.
`flock` would be wrong: its lock belongs to the open file description, which
forked children share, so a surviving child would keep the daemon "alive".

The reader side (probe): the lock holder comes from F_GETLK; its /proc start
time and command line say whether it is collectord. Only a verified lock holder
is ever signalled; a dead pid, a live unrelated pid, an unparsable or unlocked
file is stale and replaced by the next start.

Caveat for the holder: POSIX locks vanish when the holding process closes ANY fd
of the file, so the daemon must never probe its own PID file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from collectord.errors import AlreadyRunning, PidFileError

# struct flock on Linux (x86_64, aarch64): short type, short whence, off_t start,
# off_t len, pid_t pid, padded to 32 bytes.
_FLOCK = "hhqqi"
_FLOCK_SIZE = 32

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc says about one pid (a snapshot)."""

    pid: int
    state: str  # R S D Z T ...
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    start_ticks: int  # clock ticks after boot; tells a recycled pid apart
    argv: tuple[str, ...]

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def title(self) -> str:
        return " ".join(self.argv).strip()

    @property
    def is_collectord(self) -> bool:
        """A process title `collectord: ...` or a command line that runs collectord."""
        if self.title.startswith("collectord:"):
            return True
        argv = self.argv
        if argv and os.path.basename(argv[0]) == "collectord":
            return True  # the console script executed directly
        if len(argv) < 2 or not os.path.basename(argv[0]).startswith("python"):
            return False
        if os.path.basename(argv[1]) == "collectord":  # python /usr/bin/collectord ...
            return True
        # python [-X opt...] -m collectord ...: the first -m names the module run
        for i, arg in enumerate(argv[1:6], start=1):
            if arg == "-m":
                return i + 1 < len(argv) and argv[i + 1].split(".")[0] == "collectord"
        return False


def process_info(pid: int) -> ProcessInfo | None:
    """Read /proc/<pid>/stat and cmdline; None when the pid does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as err:
        if err.errno in (errno.ESRCH, errno.ENOENT):
            return None
        raise
    # comm may hold spaces and parentheses: the fields start after the LAST ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    argv = tuple(a.decode("utf-8", "replace") for a in cmd.split(b"\0") if a)
    return ProcessInfo(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        tty_nr=int(fields[4]),
        start_ticks=int(fields[19]),
        argv=argv,
    )


def same_process(before: ProcessInfo, now: ProcessInfo | None) -> bool:
    """True while `now` is still the process `before` described and not a zombie."""
    return now is not None and now.start_ticks == before.start_ticks and not now.zombie


# -- reading ----------------------------------------------------------------------


def parse_pid(text: bytes | str) -> int | None:
    """The pid on the file's first line, or None for anything unparsable."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    first = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    if not first.isdigit():
        return None
    pid = int(first)
    return pid if 0 < pid < 1 << 22 else None


def _holder_of(fd: int) -> int | None:
    """F_GETLK: the pid of a process holding a lock that would block ours, or None."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0).ljust(_FLOCK_SIZE, b"\0")
    answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, answer[: struct.calcsize(_FLOCK)])
    if l_type == fcntl.F_UNLCK:
        return None
    # l_pid is 0 when the holder lives in another pid namespace: locked, pid unknown.
    return l_pid if l_pid > 0 else 0


@dataclass(frozen=True)
class Probe:
    """One look at the PID file from outside: file, lock holder, holder's process."""

    path: str
    exists: bool
    file_pid: int | None  # the number in the file (None: absent or unparsable)
    holder: int | None  # the pid holding the lock (None: unlocked; 0: unknown pid)
    process: ProcessInfo | None  # /proc of the holder

    @property
    def running(self) -> bool:
        """A live collectord holds the lock: the only pid we ever signal."""
        return bool(self.holder) and self.process is not None and self.process.is_collectord and not self.process.zombie

    @property
    def pid(self) -> int | None:
        return self.holder if self.running else None

    def stale_reason(self) -> str:
        """Why a PID file that exists is not a running collectord (one phrase)."""
        if not self.exists:
            return "no PID file"
        if self.holder == 0:
            return "locked by a process in another pid namespace"
        if self.holder and self.process is not None and not self.process.is_collectord:
            return f"locked by pid {self.holder}, which is not collectord ({self.process.title[:60]!r})"
        if self.file_pid is None:
            return "stale PID file (unlocked, no valid pid in it)"
        other = process_info(self.file_pid)
        if other is None or other.zombie:
            return f"stale PID file (pid {self.file_pid} is dead)"
        if not other.is_collectord:
            return f"stale PID file (pid {self.file_pid} is alive but not collectord; left alone)"
        return f"stale PID file (pid {self.file_pid} does not hold its lock)"


def probe(path: str) -> Probe:
    """Look at the PID file without changing anything. Never call it in the holder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return Probe(path, False, None, None, None)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PidFileError(f"PID file {path} is a symlink; refusing to follow it") from None
        raise PidFileError(f"cannot read PID file {path}: {err.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PidFileError(f"PID file {path} is not a regular file")
        file_pid = parse_pid(os.pread(fd, 64, 0))
        holder = _holder_of(fd)
    finally:
        os.close(fd)
    info = process_info(holder) if holder else None
    return Probe(path, True, file_pid, holder, info)


# -- the daemon side -----------------------------------------------------------------


def _check_dir(directory: Path, uids: set[int], gids: set[int]) -> None:
    st = os.stat(directory)
    where = f"PID file directory {directory}"
    if not stat.S_ISDIR(st.st_mode):
        raise PidFileError(f"{where} is not a directory")
    if st.st_uid not in uids:
        raise PidFileError(f"{where} belongs to uid {st.st_uid}, not to this user or root; refusing")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PidFileError(f"{where} is writable by every user; use a private directory (chmod o-w)")
    if st.st_mode & stat.S_IWGRP and st.st_gid not in gids:
        raise PidFileError(f"{where} is writable by group {st.st_gid}; refusing (chmod g-w)")


def _check_file(path: str, st: os.stat_result, uids: set[int], gids: set[int]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise PidFileError(f"PID file {path} is not a regular file")
    if st.st_uid not in uids:
        raise PidFileError(f"PID file {path} belongs to uid {st.st_uid}, not to this user or root; refusing")
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid not in gids):
        raise PidFileError(f"PID file {path} is writable by other users; refusing (chmod 644 it)")
    if st.st_nlink > 1:
        raise PidFileError(f"PID file {path} has {st.st_nlink} hard links; refusing")


class PidFile:
    """The daemon's own PID file: open, lock, write, remove. One per process."""

    def __init__(self, path: str, *, trusted_uids: Iterable[int] = (), trusted_gids: Iterable[int] = ()):
        self.path = os.path.abspath(path)
        self.uids = {0, os.geteuid(), *trusted_uids}
        self.gids = {0, os.getegid(), *trusted_gids}
        self._fd = -1

    @property
    def fd(self) -> int:
        """The locked fd (the supervisor closes it in every child right after the fork)."""
        return self._fd

    def acquire(self, *, owner: tuple[int, int] | None = None) -> None:
        """Create the directory if missing, open and lock the file.

        owner=(uid, gid): chown a directory this call creates and the file to them
        (root preparing for a privilege drop). Raises AlreadyRunning when a live
        process holds the lock, PidFileError when the file cannot be trusted.
        """
        directory = Path(self.path).parent
        if not directory.exists():
            try:
                os.makedirs(directory, 0o755, exist_ok=True)
                os.chmod(directory, 0o755)  # despite the daemon's umask: `status` is for anyone
            except OSError as err:
                raise PidFileError(f"cannot create PID file directory {directory}: {err.strerror}") from None
            if owner is not None:
                os.chown(directory, *owner)
        _check_dir(directory, self.uids, self.gids)
        for _ in range(5):
            fd = self._open()
            try:
                _check_file(self.path, os.fstat(fd), self.uids, self.gids)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno not in (errno.EACCES, errno.EAGAIN):
                        raise PidFileError(f"cannot lock PID file {self.path}: {err.strerror}") from None
                    holder = _holder_of(fd)
                    info = process_info(holder) if holder else None
                    if info is not None and not info.is_collectord:
                        raise PidFileError(
                            f"PID file {self.path} is locked by pid {holder}, which is not collectord "
                            f"({info.title[:60]!r}); refusing"
                        ) from None
                    raise AlreadyRunning(
                        f"already running (pid {holder})" if holder else f"already running (PID file {self.path} is locked)"
                    ) from None
                # Locked; but is it still the file at the path? (a remover may have raced us)
                try:
                    at_path = os.stat(self.path, follow_symlinks=False)
                except FileNotFoundError:
                    at_path = None
                mine = os.fstat(fd)
                if at_path is not None and (at_path.st_ino, at_path.st_dev) == (mine.st_ino, mine.st_dev):
                    if owner is not None:
                        os.fchown(fd, *owner)
                    if stat.S_IMODE(mine.st_mode) != 0o644:
                        os.fchmod(fd, 0o644)  # readable by anyone who runs `status`, whatever the umask
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise PidFileError(f"PID file {self.path} keeps being replaced while locking it")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise PidFileError(f"PID file {self.path} is a symlink; refusing to follow it") from None
            raise PidFileError(f"cannot open PID file {self.path}: {err.strerror}") from None

    def write(self, pid: int | None = None) -> None:
        """Truncate, write the pid, fsync: in the locked file itself (never renamed)."""
        data = f"{os.getpid() if pid is None else pid}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def remove(self) -> None:
        """Unlink the path (if it is still our file) while locked, then close and unlock."""
        if self._fd < 0:
            return
        try:
            at_path = os.stat(self.path, follow_symlinks=False)
            mine = os.fstat(self._fd)
            if (at_path.st_ino, at_path.st_dev) == (mine.st_ino, mine.st_dev):
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or a directory we may no longer write: the lock still goes
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
