"""Collector classes for the supervisor scenario tests, a runner, and the test harness.

Every target appends one JSON line per event to the file named by its `record`
option: {"ev": "start"|"exit"|"term", "name", "pid", "t": CLOCK_MONOTONIC}.
CLOCK_MONOTONIC is system-wide, so the test process compares these times with
its own time.monotonic().

Runner: `python -m tests.sup_targets CONFIG [--dsn DSN]` loads CONFIG and runs
Supervisor(config, dsn=..., migrate=False, close_in_child=(PID file fd,)).run()
in this process, exiting with its code. Like the CLI, it holds the PID file
locked while the supervisor runs.

SupervisorRun (the harness) writes an INI (built-in collectors disabled, the
test's own collectors from this module), starts the runner and observes it from
outside: the targets' event records, /proc, the log and status.json. Teardown
SIGKILLs only pids this run recorded, and only while their command line is
still collectord's.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

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


class SlowInit(Sleeper):
    """Takes init_delay seconds to construct (in the supervisor, before the fork)."""

    def __init__(self, name: str = "", record: str = "", init_delay: str = "0.3", **kwargs):
        time.sleep(float(init_delay))
        super().__init__(name=name, record=record)


class InitRaiser:
    """Raises in __init__ (in the supervisor, before the fork)."""

    def __init__(self, **kwargs):
        raise RuntimeError("init_raiser: cannot construct")

    def run(self):
        pass

    def stop(self):
        pass


# -- harness (test process side) ----------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def wait_for(pred: Callable[[], object], timeout: float, interval: float = 0.01, what: str = "condition"):
    """Poll pred until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def proc_stat(pid: int) -> dict | None:
    """state, ppid, pgid, starttime, utime+stime (ticks) from /proc/PID/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()
    return {
        "state": rest[0],
        "ppid": int(rest[1]),
        "pgid": int(rest[2]),
        "sid": int(rest[3]),
        "cpu_ticks": int(rest[11]) + int(rest[12]),
        "starttime": int(rest[19]),
    }


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    st = proc_stat(pid)
    return st is not None and st["state"] not in ("Z", "X")


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def children_of(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    except OSError:
        pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class SupervisorRun:
    """One supervisor process and the files it and its children write."""

    def __init__(self, tmp: Path, collectors: dict[str, dict], main: dict | None = None, restart: dict | None = None):
        self.tmp = tmp
        self.record_path = tmp / "events.jsonl"
        self.ini = tmp / "collectord.conf"
        self.log_path = tmp / "collectord.log"
        self.pidfile = tmp / "run" / "collectord.pid"
        self.status_path = tmp / "run" / "status.json"
        self.proc: subprocess.Popen | None = None
        self.recorded: set[int] = set()
        self.write_config(collectors, main, restart)

    def write_config(self, collectors: dict[str, dict], main: dict | None = None, restart: dict | None = None) -> None:
        main_values = {
            "pidfile": str(self.pidfile),
            "logfile": str(self.log_path),
            "loglevel": "INFO",
            "graceful_timeout": "3",
            "startsecs": "0.3",
            "health_interval": "3600",
            "watchdog_timeout": "120",
        }
        main_values.update({k: str(v) for k, v in (main or {}).items()})
        restart_values = {"backoff_initial": "0.2", "backoff_max": "1.6", "max_restarts": "5", "reset_after": "600"}
        restart_values.update({k: str(v) for k, v in (restart or {}).items()})
        lines = ["[collectord]"] + [f"{k} = {v}" for k, v in main_values.items()]
        lines += ["[restart]"] + [f"{k} = {v}" for k, v in restart_values.items()]
        from collectord.config import BUILTIN_TARGETS

        for name in BUILTIN_TARGETS:
            if name not in collectors:
                lines += [f"[collector:{name}]", "enabled = no"]
        for name, opts in collectors.items():
            opts = dict(opts)
            target = opts.pop("target")
            if ":" not in target:
                target = f"tests.sup_targets:{target}"
            lines += [f"[collector:{name}]", f"target = {target}"]
            if "record" not in opts:
                opts["record"] = str(self.record_path)
            lines += [f"{k} = {v}" for k, v in opts.items()]
        tmp = self.ini.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.ini)

    # -- process -------------------------------------------------------------
    def start(self, wait_started: tuple[str, ...] = (), extra_args: tuple[str, ...] = ()) -> "SupervisorRun":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.stderr = open(self.tmp / "stderr.txt", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sup_targets", str(self.ini), "--log", *extra_args],
            cwd=str(ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stderr,
            stderr=self.stderr,
        )
        self.recorded.add(self.proc.pid)
        for name in wait_started:
            self.wait_start(name)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, sig: int) -> float:
        """Send sig to the supervisor; return the monotonic time it was sent."""
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        return t

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_pid(self, pid: int, sig: int = signal.SIGKILL) -> float:
        assert pid in self.recorded, "only pids this test recorded are signalled"
        t = time.monotonic()
        os.kill(pid, sig)
        return t

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.events()
        for pid in self.recorded:
            cmd = cmdline(pid)
            if alive(pid) and ("collectord" in cmd or "sup_targets" in cmd):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if hasattr(self, "stderr"):
            self.stderr.close()

    # -- observations --------------------------------------------------------
    def events(self, ev: str | None = None, name: str | None = None) -> list[dict]:
        try:
            text = self.record_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            self.recorded.add(rec["pid"])
            if (ev is None or rec["ev"] == ev) and (name is None or rec["name"] == name):
                out.append(rec)
        return out

    def starts(self, name: str) -> list[dict]:
        return self.events("start", name)

    def wait_start(self, name: str, count: int = 1, timeout: float = 10.0) -> dict:
        """The count-th start record of `name` (waits for it)."""
        recs = wait_for(lambda: (lambda r: r if len(r) >= count else None)(self.starts(name)), timeout, what=f"{name} start #{count}")
        return recs[count - 1]

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def status(self) -> dict | None:
        from collectord.status import read_status

        return read_status(str(self.status_path))

    def child_status(self, name: str) -> dict | None:
        doc = self.status()
        if not doc:
            return None
        for child in doc["children"]:
            if child["name"] == name:
                return child
        return None

    def wait_state(self, name: str, state: str, timeout: float = 10.0) -> dict:
        return wait_for(
            lambda: (lambda c: c if c and c["state"] == state else None)(self.child_status(name)),
            timeout,
            what=f"{name} {state} in status.json",
        )


def main(argv: list[str]) -> int:
    from collectord.config import load
    from collectord.supervisor import Supervisor

    import fcntl

    path = argv[0]
    dsn = argv[argv.index("--dsn") + 1] if "--dsn" in argv else "host=127.0.0.1 dbname=test password=secret"
    config = load(path)
    # Like the CLI: hold the PID file locked with our pid in it; children must close it.
    os.makedirs(os.path.dirname(config.pidfile), exist_ok=True)
    fd = os.open(config.pidfile, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        sup = Supervisor(config, dsn=dsn, migrate="--migrate" in argv, foreground="--log" not in argv, close_in_child=(fd,))
        return sup.run()
    finally:
        os.unlink(config.pidfile)
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
