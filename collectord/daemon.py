"""start: become a daemon (or stay in the foreground) and run the supervisor.

Launcher side of `start`, in order:
  1. refuse early when a live collectord holds the PID file lock ("already
     running (pid N)", exit 1) and decide who the collectors run as (privileges);
  2. open a readiness pipe, fork; the first child calls setsid and forks the
     daemon, then exits (the daemon is not a session leader, so it can never
     acquire a controlling terminal);
  3. wait on the pipe: "pid N" then "ready" -> print "started" and exit 0;
     "error CODE MESSAGE" -> print the message, exit CODE (78 for config errors);
     end of file or timeout -> exit 1 naming the log file.

Daemon side (serve(), the same code as `start --foreground`), in order:
  umask 027, chdir /, stdio to /dev/null, every other inherited fd closed
  (daemon only); create the directories
  (owned by the configured user when started as root); open, lock and write the
  PID file; switch user; construct the Supervisor and run it. Its on_ready
  callback (children spawned) writes "ready". When run() returns, the PID file is
  unlinked while still locked, then released.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import time
import traceback
from typing import Callable

from collectord import logs, pidfile, privileges
from collectord.config import Config
from collectord.errors import AlreadyRunning, CollectordError, StartError

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0  # embedded PostgreSQL's first initdb plus migrations fit in this


class _Notifier:
    """Daemon end of the readiness pipe. Each message is one line, one write (atomic)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.done = False

    def send(self, line: str) -> None:
        if self.fd < 0 or self.done:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ")[:3000] + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # the launcher gave up waiting; the daemon goes on regardless

    def finish(self, line: str) -> None:
        """Last message. The fd number stays occupied by /dev/null afterwards, so a
        later fd can never take it and be closed by the supervisor in its children."""
        self.send(line)
        self.done = True
        if self.fd >= 0:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(null, self.fd, inheritable=False)
            os.close(null)


def serve(config: Config, *, foreground: bool, notifier: _Notifier | None = None) -> int:
    """Directories, PID file, user switch, Supervisor.run(); returns its exit code.

    Raises CollectordError for anything that stops it before the supervisor runs.
    """
    from collectord.supervisor import Supervisor  # heavy (multiprocess); only when serving

    ident = privileges.plan(config)
    privileges.prepare(config, ident)
    pf = pidfile.PidFile(config.pidfile, trusted_uids={ident.uid}, trusted_gids={ident.gid})
    pf.acquire(owner=ident.owner)
    try:
        pf.write()
        if notifier is not None:
            notifier.send(f"pid {os.getpid()}")
        warning = privileges.runtime_warning(ident)
        if warning:
            if notifier is not None:
                notifier.send(f"warn {warning}")
            else:
                print(f"collectord: warning: {warning}", file=sys.stderr)
        privileges.drop(ident)

        def on_ready(*_args, **_kwargs) -> None:
            log.info("ready: pid %d, PID file %s", os.getpid(), config.pidfile)
            if notifier is not None:
                notifier.finish("ready")

        close = (pf.fd,) + ((notifier.fd,) if notifier is not None else ())
        supervisor = Supervisor(config, on_ready=on_ready, close_in_child=close, foreground=foreground)
        return supervisor.run()
    finally:
        pf.remove()


def foreground(config: Config) -> int:
    """`start --foreground`: no fork, log to stderr, the same PID file and lock."""
    running = pidfile.probe(config.pidfile)
    if running.running:
        raise AlreadyRunning(f"already running (pid {running.pid})")
    privileges.plan(config)
    return serve(config, foreground=True)


def _crash_log(config: Config, text: str) -> None:
    """Last resort for a bug in the daemon before logging works: append to the log file
    (never through a symlink: logs.open_log)."""
    if not config.logfile or config.logfile == "-":
        return
    try:
        with logs.open_log(config.logfile) as fh:
            fh.write(text)
    except OSError:
        pass


def _close_inherited(keep: set[int]) -> None:
    """Close every fd the launcher's own parent handed down (a shell's pipe, a
    test runner's saved stdout): a daemon holding them would keep its caller's
    pipes open for as long as it runs."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own fd, already gone


def _daemon_body(config: Config, notify_fd: int) -> int:
    """The grandchild: hygiene, then serve(); every failure goes down the pipe as one line."""
    notifier = _Notifier(notify_fd)
    try:
        os.umask(0o027)
        # Relative sys.path entries ('' for `python -m`) would point at / after chdir.
        sys.path[:] = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        _close_inherited(keep={0, 1, 2, notify_fd})
        code = serve(config, foreground=False, notifier=notifier)
        if not notifier.done:
            notifier.finish(f"error 1 supervisor exited with code {code} before it was ready (see {config.logfile})")
        return code
    except CollectordError as err:
        notifier.finish(f"error {err.exit_code} {err}")
        return err.exit_code
    except BaseException as err:  # a bug: its traceback goes to the log, one line to the launcher
        _crash_log(config, time.strftime("%Y-%m-%d %H:%M:%S ") + "collectord daemon crashed:\n" + traceback.format_exc())
        notifier.finish(f"error 1 internal error: {type(err).__name__}: {err} (traceback in {config.logfile})")
        return 1


def _read_lines(fd: int, timeout: float, on_line: Callable[[str], bool]) -> str:
    """Feed lines from fd to on_line until it returns True; 'eof' / 'timeout' / 'done'."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError as err:
            if err.errno == errno.EINTR:
                continue
            raise
        if not chunk:
            return "eof"
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if on_line(line.decode("utf-8", "replace")):
                return "done"


def start(config: Config, *, ready_timeout: float = READY_TIMEOUT, out=None) -> int:
    """`start`: daemonize and wait for readiness. Returns the launcher's exit code.

    In the daemon process this function returns too (the supervisor's exit code),
    so the caller's normal exit path runs there; the middle child never returns.
    """
    out = out or sys.stdout
    running = pidfile.probe(config.pidfile)
    if running.running:
        raise AlreadyRunning(f"already running (pid {running.pid})")
    privileges.plan(config)  # refuse root / unknown user here, before any fork

    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing buffered may be written twice by the forks
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    first = os.fork()
    if first == 0:  # middle child: new session, fork the daemon, leave
        try:
            os.close(read_fd)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
        except BaseException:
            os._exit(1)
        return _daemon_body(config, write_fd)

    os.close(write_fd)
    try:
        _, status = os.waitpid(first, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise StartError("could not fork the daemon")
        state: dict = {"pid": None, "result": None}

        def on_line(line: str) -> bool:
            word, _, rest = line.partition(" ")
            if word == "pid":
                state["pid"] = int(rest) if rest.isdigit() else None
                return False
            if word == "warn":
                print(f"collectord: warning: {rest}", file=sys.stderr)
                return False
            if word == "ready":
                state["result"] = (0, None)
                return True
            if word == "error":
                code, _, message = rest.partition(" ")
                state["result"] = (int(code) if code.isdigit() else 1, message)
                return True
            return False

        outcome = _read_lines(read_fd, ready_timeout, on_line)
    finally:
        os.close(read_fd)

    where = f"see {config.logfile}" if config.logfile and config.logfile != "-" else "see its log"
    if state["result"] is not None:
        code, message = state["result"]
        if code == 0:
            print(f"collectord started (pid {state['pid']})", file=out)
            return 0
        err = StartError(message)
        err.exit_code = code
        raise err
    if outcome == "timeout":
        raise StartError(f"daemon (pid {state['pid']}) not ready after {ready_timeout:g} s; {where}")
    raise StartError(f"daemon exited before it was ready; {where}")
