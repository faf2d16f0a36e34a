"""Worker: the process body every built-in collector shares.

Lifecycle, in order:
  1. __init__ (in the supervisor, before the fork): store and validate values only.
     No sockets, no database connections, no threads, no fds.
  2. attach_supervisor(fd) (in the child, right after the fork, built-ins only):
     the write end of a pipe the supervisor reads heartbeats and counters from.
  3. run() (in the child): init_process() opens connections; then step() is called
     once per `interval`, aligned to the interval (a slow step delays the next one,
     never stacks them), with a heartbeat before each step and between waits;
     shutdown() flushes and closes when the loop ends.
  4. stop() (from the child's SIGTERM handler): sets a flag and wakes the wait.
     Nothing else: the loop notices and ends after the current step.

A Worker never imports collectord: it is a plain class anyone can run and test.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import time
from typing import Any, Callable, Mapping

from workers.errors import CollectorError

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 5.0  # default seconds between messages; the supervisor may ask for less
PIPE_BUF = 4096  # writes up to this size are atomic on a pipe


class OptionError(ValueError):
    """A collector option has a bad value. `key` names the option."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def convert_options(spec: Mapping[str, tuple[Callable[[str], Any], Any]], given: Mapping[str, Any]) -> dict:
    """Convert string options by spec {key: (type, default)}; unknown keys raise OptionError."""
    out = {key: default for key, (_, default) in spec.items()}
    for key, value in given.items():
        if key not in spec:
            raise OptionError(key, "unknown option")
        kind = spec[key][0]
        if isinstance(value, str) or not isinstance(value, kind):
            try:
                if kind is bool:
                    low = str(value).strip().lower()
                    if low not in ("1", "0", "yes", "no", "true", "false", "on", "off"):
                        raise ValueError(value)
                    value = low in ("1", "yes", "true", "on")
                else:
                    value = kind(value)
            except (TypeError, ValueError):
                raise OptionError(key, f"expected {kind.__name__}, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise OptionError(key, f"must be >= 0, got {value!r}")
        out[key] = value
    return out


class Reporter:
    """Child side of the supervisor pipe: newline-delimited JSON, never blocking.

    One message per `every` seconds at most: {"hb": t, "status": {...}}, the
    heartbeat and the counters together, so an idle supervisor wakes once per
    interval per child. The fd is made non-blocking; a full pipe drops the
    message (the next one carries the same state), so a slow supervisor can
    never stall a collector.
    """

    def __init__(self, fd: int, every: float = HEARTBEAT_EVERY, clock: Callable[[], float] = time.monotonic):
        self.fd = fd
        self.every = every
        self.clock = clock
        os.set_blocking(fd, False)
        self._last = float("-inf")

    def _send(self, message: dict) -> None:
        data = (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()
        if len(data) > PIPE_BUF:  # too many counters for an atomic write: heartbeat alone
            data = (json.dumps({"hb": message["hb"]}) + "\n").encode()
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno != errno.EPIPE:
                raise

    def due(self) -> bool:
        """True when the next send() would go out (so the caller builds counters only then)."""
        return self.clock() - self._last >= self.every

    def send(self, counters: dict, force: bool = False) -> None:
        """Heartbeat + counters, at most once per `every` seconds unless forced."""
        now = self.clock()
        if force or now - self._last >= self.every:
            self._last = now
            self._send({"hb": round(time.time(), 3), "status": counters})


class Worker:
    """Base collector process body. Subclasses set OPTIONS and implement step().

    OPTIONS maps an option name to (type, default); the section's keys arrive as
    strings and are converted here, so a bad value fails at construction (in the
    supervisor, before any fork) with an OptionError naming the key.
    """

    OPTIONS: Mapping[str, tuple[Callable[[str], Any], Any]] = {"interval": (float, 5.0)}
    CONTEXT = ("name", "dsn", "data_dir", "gamma_url", "clob_url", "data_url", "ws_url", "selection")

    def __init__(self, *, name: str = "", dsn: str = "", data_dir: str = "", selection=None, **kwargs):
        self.name = name or type(self).__name__.lower()
        self.dsn = dsn
        self.data_dir = data_dir
        self.selection = dict(selection or {})
        self.urls = {k: kwargs.pop(k) for k in ("gamma_url", "clob_url", "data_url", "ws_url") if k in kwargs}
        self.shard = int(kwargs.pop("shard", 0))
        self.shards = int(kwargs.pop("shards", 1))
        self.options = convert_options(self.OPTIONS, kwargs)
        self.interval = float(self.options.get("interval", 5.0))
        self.counters: dict[str, Any] = {
            "rows_written": 0,
            "errors": 0,
            "last_success": None,
            "last_error": None,
        }
        self.reporter: Reporter | None = None
        self._stopping = False
        self._wake_r = self._wake_w = -1

    # -- supervisor seam ---------------------------------------------------
    def attach_supervisor(self, fd: int, heartbeat_every: float = HEARTBEAT_EVERY) -> None:
        """Called in the child by the supervisor: where heartbeats and counters go, how often."""
        self.reporter = Reporter(fd, every=heartbeat_every)

    def stop(self) -> None:
        """Signal-handler safe: set the flag, wake the interval wait. Nothing else."""
        self._stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- counters -----------------------------------------------------------
    def beat(self) -> None:
        """Heartbeat from the main loop (never from a thread: a hung loop must go silent).

        Cheap when not due: a busy loop calls it every turn, and status() is built only
        when a message goes out.
        """
        if self.reporter is not None and self.reporter.due():
            self.reporter.send(self.status())

    def status(self) -> dict:
        """Counters sent to the supervisor; subclasses may add keys."""
        return dict(self.counters)

    def success(self, rows: int = 0) -> None:
        self.counters["rows_written"] += rows
        self.counters["last_success"] = round(time.time(), 3)

    def failure(self, message: str) -> None:
        self.counters["errors"] += 1
        self.counters["last_error"] = message[:300]

    # -- the loop -----------------------------------------------------------
    def init_process(self) -> None:
        """Open connections (after the fork). Subclasses extend."""

    def step(self) -> None:
        """One cycle of work. Subclasses implement."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Flush and close (SIGTERM or run() ending). Subclasses extend."""

    def wait(self, timeout: float) -> bool:
        """Sleep up to timeout, waking early on stop(); heartbeats while waiting.

        Returns True when stopping.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.beat()
            every = self.reporter.every if self.reporter is not None else HEARTBEAT_EVERY
            readable, _, _ = select.select([self._wake_r], [], [], min(left, every))
            if readable:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
        return self._stopping

    def run(self) -> None:
        """init_process(); step() every interval until stop(); shutdown().

        A step that raises is logged with its traceback and counted, and the loop
        goes on: bad data or a transient outage never crash-loops a collector.
        """
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        if self._stopping:  # stop() before run(): nothing to do
            return
        try:
            self._loop()
        except CollectorError as err:  # raised on purpose: one line, its exit code, no traceback
            if err.exit_code:
                log.error("%s: %s", self.name, err)
            raise SystemExit(err.exit_code) from None

    def _loop(self) -> None:
        """init_process(), the step loop, shutdown() (always, once init_process ran)."""
        self.init_process()
        try:
            next_due = time.monotonic()
            while not self._stopping:
                self.beat()
                try:
                    self.step()
                except Exception as err:  # one bad cycle must not kill the process
                    log.exception("%s: step failed", self.name)
                    self.failure(f"{type(err).__name__}: {err}")
                now = time.monotonic()
                next_due += self.interval
                if next_due < now:  # a slow step delays the next; it never stacks them
                    next_due = now if self.interval == 0 else now + (self.interval - (now - next_due) % self.interval)
                self.wait(next_due - now)
        finally:
            self.shutdown()
            if self.reporter is not None:
                self.reporter.send(self.status(), force=True)
