"""Collector classes for the supervisor scenario tests, and a runner.

Every target appends one JSON line per event to the file named by its `record`
option: {"ev": "start"|"exit"|"term", "name", "pid", "t": CLOCK_MONOTONIC}.
CLOCK_MONOTONIC is system-wide, so the test process compares these times with
its own time.monotonic().

Runner: `python -m tests.sup_targets CONFIG [--dsn DSN]` loads CONFIG and runs
Supervisor(config, dsn=..., migrate=False, foreground=True).run() in this
process, exiting with its code.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from workers.base import Worker


def record(path: str | None, ev: str, name: str, **extra) -> None:
    if not path:
        return
    line = json.dumps({"ev": ev, "name": name, "pid": os.getpid(), "t": time.monotonic(), **extra}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class _Waiter:
    """Cooperative sleeping without threads: stop() writes to a pipe the loop selects on."""

    def __init__(self) -> None:
        self._stop = False
        self._w = -1

    def stop(self) -> None:
        self._stop = True
        if self._w >= 0:
            try:
                os.write(self._w, b"x")
            except OSError:
                pass

    def sleep_until_stopped(self, limit: float | None = None) -> None:
        r, self._w = os.pipe()
        deadline = None if limit is None else time.monotonic() + limit
        while not self._stop:
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            select.select([r], [], [], left)


class Sleeper(_Waiter):
    """A plain user class (no heartbeats): sleeps until SIGTERM, then returns (exit 0)."""

    def __init__(self, name: str = "", record: str = "", **kwargs):
        super().__init__()
        self.name, self.record, self.kwargs = name, record, kwargs

    def stop(self) -> None:
        record(self.record, "term", self.name)
        super().stop()

    def run(self) -> None:
        record(self.record, "start", self.name, kwargs=sorted(self.kwargs))
        self.sleep_until_stopped()
        record(self.record, "exit", self.name, code=0)


class Named:
    """A plain class whose __init__ names its parameters (no **kwargs)."""

    def __init__(self, name, record, interval="1"):
        self.name, self.record, self.interval = name, record, interval
        self.waiter = _Waiter()

    def stop(self):
        self.waiter.stop()

    def run(self):
        record(self.record, "start", self.name, interval=self.interval)
        self.waiter.sleep_until_stopped()


class Crasher:
    """Raises at once (exit 1), or after `after` seconds."""

    def __init__(self, name: str = "", record: str = "", after: str = "0", **kwargs):
        self.name, self.record, self.after = name, record, float(after)
        self.waiter = _Waiter()

    def stop(self):
        self.waiter.stop()

    def run(self):
        record(self.record, "start", self.name)
        if self.after > 0:
            self.waiter.sleep_until_stopped(self.after)
        record(self.record, "exit", self.name, code=1)
        raise RuntimeError("crasher: deliberate failure")


class Exiter:
    """SystemExit(code) at once (78 -> FATAL, 0 -> EXITED)."""

    def __init__(self, name: str = "", record: str = "", code: str = "78", **kwargs):
        self.name, self.record, self.code = name, record, int(code)

    def stop(self):
        pass

    def run(self):
        record(self.record, "start", self.name)
        record(self.record, "exit", self.name, code=self.code)
        raise SystemExit(self.code)


class Ignorer:
    """Ignores SIGTERM: stop() only records it."""

    def __init__(self, name: str = "", record: str = "", **kwargs):
        self.name, self.record = name, record

    def stop(self):
        record(self.record, "term", self.name)

    def run(self):
        record(self.record, "start", self.name)
        while True:
            time.sleep(3600)


class Forker(Sleeper):
    """Forks a grandchild (mode plain or setsid) that sleeps; records its pid; then sleeps."""

    def __init__(self, name: str = "", record: str = "", mode: str = "plain", ignore_term: str = "no", **kwargs):
        super().__init__(name=name, record=record)
        self.mode, self.ignore_term = mode, ignore_term == "yes"

    def run(self) -> None:
        pid = os.fork()
        if pid == 0:
            if self.mode == "setsid":
                os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.ignore_term else signal.SIG_DFL)
            record(self.record, "grandchild", self.name, mode=self.mode)
            while True:
                time.sleep(3600)
        super().run()


class Beater(Worker):
    """A Worker that heartbeats; with hang_after > 0 its loop hangs (stops beating) after that long."""

    OPTIONS = {"interval": (float, 0.2), "hang_after": (float, 0.0), "record": (str, ""), "rows": (int, 0)}

    def init_process(self) -> None:
        self._t0 = time.monotonic()
        record(self.options["record"], "start", self.name)

    def step(self) -> None:
        self.success(self.options["rows"])
        hang = self.options["hang_after"]
        if hang and time.monotonic() - self._t0 >= hang:
            record(self.options["record"], "hang", self.name)
            while True:  # the loop hangs: no more heartbeats
                time.sleep(3600)

    def shutdown(self) -> None:
        record(self.options["record"], "exit", self.name, code=0)


class InitRaiser:
    """Raises in __init__ (in the supervisor, before the fork)."""

    def __init__(self, **kwargs):
        raise RuntimeError("init_raiser: cannot construct")

    def run(self):
        pass

    def stop(self):
        pass


def main(argv: list[str]) -> int:
    from collectord.config import load
    from collectord.supervisor import Supervisor

    path = argv[0]
    dsn = argv[argv.index("--dsn") + 1] if "--dsn" in argv else "host=127.0.0.1 dbname=test password=secret"
    config = load(path)
    return Supervisor(config, dsn=dsn, migrate=False, foreground="--log" not in argv).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
