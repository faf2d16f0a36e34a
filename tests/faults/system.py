"""The whole system under test: the real supervisor (`python -m collectord -c CONF start
--foreground`) with all five collectors, polysim, and PostgreSQL behind a Proxy.

System(tmp, dsn, sim, ...) writes a config with every delay scaled down, `start()`
runs the supervisor and waits until every child is RUNNING, and a watcher thread
records every pid that was ever a child of one of our supervisors (from /proc),
so `orphans()` can say whether anything we started is still alive after a stop or a
kill -9 of the supervisor. Only pids recorded here are ever signalled.

`reap_orphans=True` (the soak) makes this process a child subreaper, as init or
systemd is for a real daemon: children orphaned by a kill -9 of the supervisor are
re-parented here instead of to the machine's PID 1 (which in this sandbox reaps
late), and the watcher reaps them, so a zombie counted by the soak is one the
supervisor left, not one the sandbox's init did. Only recorded pids are reaped,
never a subprocess.Popen child of ours.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

TRADES_FAST = dict(
    ping_interval="0.5", pong_timeout="1.0", stall_timeout="2.0", connect_timeout="3", read_timeout="3",
    backoff_initial="0.1", backoff_max="1.0", stable_after="2", refresh_interval="0.5", adopt_interval="1",
    coverage_interval="0.3", backfill_delay="3", backfill_margin="1", backfill_settle="0.5", connect_stagger="0.05",
    flush_age="0.1", backfill_rate="0",
)
# HTTP deadline (3 s) below the watchdog (5 s in the fault runs), as 60 s is below 120 s by default.
POLL_FAST = "rate = 0\ntimeout = 2\nconnect_timeout = 1\nretries = 1\ndeadline = 3\n"


def wait_for(pred, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc/<pid>/stat, None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def proc_children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class System:
    def __init__(self, tmp: Path, dsn: str, sim, *, shards: int = 2, watchdog: float = 5.0,
                 backoff_initial: float = 0.5, backoff_max: float = 2.0, max_restarts: int = 1000,
                 reset_after: float = 600.0, extra: str = "", trades: dict | None = None,
                 polling: bool = True, health_interval: float = 0, reap_orphans: bool = False):
        self.tmp = Path(tmp)
        self.reap_orphans = reap_orphans
        self.dsn = dsn
        self.sim = sim
        self.conf = self.tmp / "collectord.conf"
        self.log_path = self.tmp / "supervisor.log"
        self.status_path = self.tmp / "run" / "status.json"
        self.data_dir = self.tmp / "data"
        self.spool_dir = self.data_dir / "spool"
        opts = dict(TRADES_FAST, **(trades or {}))
        trade_opts = "".join(f"{k} = {v}\n" for k, v in opts.items())
        poll = "" if polling else "enabled = no\n"
        self.conf.write_text(
            "[collectord]\n"
            f"pidfile = {self.tmp}/run/collectord.pid\nlogfile = {self.tmp}/collectord.log\n"
            f"data_dir = {self.data_dir}\ndsn = {dsn}\nallow_root = yes\ngraceful_timeout = 10\n"
            f"startsecs = 0.5\nwatchdog_timeout = {watchdog}\nhealth_interval = {health_interval}\n"
            f"[restart]\nbackoff_initial = {backoff_initial}\nbackoff_max = {backoff_max}\n"
            f"max_restarts = {max_restarts}\nreset_after = {reset_after}\n"
            f"[polymarket]\ngamma_url = {sim.gamma_url}\nclob_url = {sim.clob_url}\n"
            f"data_url = {sim.data_url}\nws_url = {sim.ws_url}\n"
            "[selection]\nmin_volume_24h = 0\nmax_markets = 0\n"
            f"[collector:markets]\ninterval = 1\nrecent_pages = 3\n{POLL_FAST}"
            f"[collector:prices]\n{poll}interval = 1\n{POLL_FAST}"
            f"[collector:orderbooks]\n{poll}interval = 2\n{POLL_FAST}"
            f"[collector:resolutions]\n{poll}interval = 2\n{POLL_FAST}"
            f"[collector:trades]\nshards = {shards}\n{trade_opts}"
            f"{extra}"
        )
        self.proc: subprocess.Popen | None = None
        self.supervisors: list[int] = []
        self.seen: dict[int, str] = {}  # pid -> what it was (child of which supervisor)
        self.starts = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._log = None

    # -- lifecycle ------------------------------------------------------------------
    def env(self) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("COLLECTORD_CONFIG", None)
        return env

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "collectord", "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env(), cwd=str(self.tmp))

    def start(self, wait: float = 60.0, expect: set[str] | None = None) -> None:
        """Run the supervisor in the foreground (its log on stderr -> supervisor.log)."""
        self._log = open(self.log_path, "a")
        if self.reap_orphans and not self.supervisors:
            from collectord.supervisor import PR_SET_CHILD_SUBREAPER, prctl

            prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.proc = subprocess.Popen([sys.executable, "-m", "collectord", "-c", str(self.conf), "start",
                                      "--foreground"], stdout=self._log, stderr=self._log, env=self.env(),
                                     cwd=str(self.tmp))
        self.supervisors.append(self.proc.pid)
        self.starts += 1
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="pid-watcher", daemon=True)
            self._watcher.start()
        expect = expect or self.expected_names()
        ok = wait_for(lambda: self.proc.poll() is not None or expect <= self.running_names(), wait, 0.2)
        if self.proc.poll() is not None or not ok:
            raise AssertionError(f"supervisor did not bring up {sorted(expect)}: exit {self.proc.poll()}; "
                                 f"log tail:\n{self.log_tail()}")

    def expected_names(self) -> set[str]:
        names = {"markets", "prices", "orderbooks", "resolutions"}
        text = self.conf.read_text()
        shards = int(re.search(r"\[collector:trades\][^\[]*?shards = (\d+)", text).group(1))
        names |= {"trades"} if shards == 1 else {f"trades.{i}" for i in range(shards)}
        if re.search(r"\[collector:prices\]\nenabled = no", text):
            names -= {"prices", "orderbooks", "resolutions"}
        return names

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the supervisor and wait for it; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill_supervisor(self) -> int:
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return pid

    def close(self) -> None:
        """Stop everything we started (supervisor, then any recorded pid still alive)."""
        try:
            self.stop()
        finally:
            self._stop.set()
            if self._watcher is not None:
                self._watcher.join(5)
            for pid in self.orphans():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self._log is not None:
                self._log.close()

    # -- observation --------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.scan()

    def scan(self) -> None:
        for sup in self.supervisors:
            for pid in proc_children(sup):
                self.seen.setdefault(pid, f"child of supervisor {sup}")
        if self.reap_orphans:
            self.reap()

    def reap(self) -> None:
        """Reap recorded pids re-parented to us (we are their subreaper) once they are zombies."""
        me = os.getpid()
        for pid in list(self.seen):
            if pid in self.supervisors:
                continue
            st = proc_stat(pid)
            if st is not None and st[0] == "Z" and st[1] == me:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def status(self) -> dict | None:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return None

    def children(self) -> dict[str, dict]:
        doc = self.status() or {}
        return {c["name"]: c for c in doc.get("children", [])}

    def running_names(self) -> set[str]:
        return {n for n, c in self.children().items() if c["state"] == "RUNNING"}

    def pid_of(self, name: str) -> int | None:
        """The live pid of child `name` (status.json, checked against /proc: ppid = our supervisor)."""
        c = self.children().get(name)
        pid = c and c.get("pid")
        if not pid or self.proc is None:
            return None
        st = proc_stat(pid)
        if st is None or st[1] != self.proc.pid or st[0] in ("Z", "X"):
            return None
        return pid

    def orphans(self) -> list[int]:
        """Recorded pids (ours) still alive and not zombies, other than the current supervisor's children."""
        self.scan()
        current = set(proc_children(self.proc.pid)) if self.proc and self.proc.poll() is None else set()
        out = []
        for pid in list(self.seen):
            st = proc_stat(pid)
            if st is not None and st[0] not in ("Z", "X") and pid not in current:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"collectord" in cmd or b"python" in cmd:
                    out.append(pid)
        return out

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def spawn_count(self) -> int:
        return len(re.findall(r": spawned pid \d+", self.log_text()))

    def restarts(self) -> int:
        """Spawns beyond the first of each child in each supervisor run."""
        text = self.log_text()
        return len(re.findall(r"spawn #(\d+)", text)) - len(re.findall(r"spawn #1\b", text))
