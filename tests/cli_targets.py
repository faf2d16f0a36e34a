"""Small collector classes the CLI/daemon tests point `target =` at.

Sleeper is a plain class (no Worker): run() blocks until stop(). Ticker is a
workers.base.Worker with a trivial step(), so it heartbeats and reports counters.
Below them: helpers the CLI/daemon tests share (Env: a temporary installation).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from workers.base import Worker


class Sleeper:
    """A user's plain collector: run() until stop()."""

    def __init__(self, **kwargs):
        self.name = kwargs.get("name", "sleeper")
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.2):
            pass

    def stop(self) -> None:
        self._stop.set()


class Ticker(Worker):
    """A built-in-style collector: one step every `interval` that counts a row."""

    OPTIONS = {"interval": (float, 0.2)}

    def step(self) -> None:
        self.success(rows=1)


class Crasher:
    """Exits 1 at once, every time (for status: BACKOFF/last_exit)."""

    def __init__(self, **kwargs):
        pass

    def run(self) -> None:
        raise SystemExit(1)

    def stop(self) -> None:
        pass


class Picky:
    """Rejects its options at construction: a config error (exit 78)."""

    def __init__(self, *, mode: str = "ok", **kwargs):
        if mode != "ok":
            err = ValueError(f"mode must be 'ok', got {mode!r}")
            err.key = "mode"
            raise err

    def run(self) -> None:
        time.sleep(0.1)

    def stop(self) -> None:
        pass


class Stubborn(Sleeper):
    """Ignores stop(): only SIGKILL ends it (stop --timeout tests)."""

    def stop(self) -> None:
        pass


# -- helpers for the CLI/daemon tests (not collectors) ------------------------------

ROOT = Path(__file__).resolve().parent.parent

# Built-ins off: the daemon tests run only the small classes above.
BUILTINS_OFF = "".join(
    f"[collector:{name}]\nenabled = no\n" for name in ("markets", "prices", "orderbooks", "resolutions", "trades")
)


def wait_for(pred, timeout=10.0, every=0.02):
    """Poll pred() until it returns a truthy value or timeout; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is pid, from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(name))
    return sorted(out)


def alive(pid: int) -> bool:
    """Exists in /proc and is not a zombie (kill(pid, 0) says yes to zombies)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except OSError:
        return False
    return raw[raw.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


class Env:
    """A temporary collectord installation: config file, dirs, and a CLI runner.

    Every daemon it starts is stopped (or SIGKILLed) by close().
    """

    def __init__(self, base: Path, dsn: str, *, collectors: str = "", main: str = "", restart: str = ""):
        self.base = Path(base)
        self.pidfile = self.base / "run" / "collectord.pid"
        self.status_path = self.base / "run" / "status.json"
        self.logfile = self.base / "log" / "collectord.log"
        self.data_dir = self.base / "data"
        self.conf = self.base / "collectord.conf"
        self.dsn = dsn
        self.write(collectors=collectors, main=main, restart=restart)

    def write(self, *, collectors: str = "", main: str = "", restart: str = "", dsn: str | None = None) -> None:
        collectors = collectors or (
            "[collector:sleep]\ntarget = tests.cli_targets:Sleeper\n"
            "[collector:tick]\ntarget = tests.cli_targets:Ticker\ninterval = 0.2\n"
        )
        if "allow_root" not in main and "user" not in main:
            main += "\nallow_root = yes\n"
        self.conf.write_text(
            "[collectord]\n"
            f"pidfile = {self.pidfile}\nlogfile = {self.logfile}\ndata_dir = {self.data_dir}\n"
            f"dsn = {self.dsn if dsn is None else dsn}\ngraceful_timeout = 5\nstartsecs = 0.5\nhealth_interval = 0\n"
            f"{main}\n[restart]\nbackoff_initial = 0.5\nbackoff_max = 1\n{restart}\n"
            f"{BUILTINS_OFF}{collectors}"
        )
        os.chmod(self.conf, 0o640)  # it holds a password (docs/operations.md); 0644 makes start/check warn

    def env(self) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("COLLECTORD_CONFIG", None)
        return env

    def cli(self, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "collectord", "-c", str(self.conf), *args],
            capture_output=True, text=True, timeout=timeout, env=self.env(), cwd=str(ROOT), **kwargs,
        )

    def file_pid(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def log(self) -> str:
        try:
            return self.logfile.read_text()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        from collectord import pidfile

        try:
            probe = pidfile.probe(str(self.pidfile))
        except Exception:
            return
        if probe.running:
            r = self.cli("stop", "--timeout", "10")
            if r.returncode != 0 and probe.holder and alive(probe.holder):
                kids = children_of(probe.holder)
                for pid in [probe.holder, *kids]:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
