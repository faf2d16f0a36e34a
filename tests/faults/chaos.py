"""S25 chaos: kill -9 or SIGSTOP+SIGCONT a random child every 0.5-3 s, and measure from outside.

Chaos(system, rng).run(seconds) drives the faults; a monitor thread samples /proc
every 50 ms: when each child pid was first seen (restart delay = first sight of
the replacement - our kill), how long any of our pids stayed a zombie, and the
supervisor's fd count and RSS once a second. check() compares every restart
delay with what the supervisor announced in its log ("restart #k in Ys") and with
the policy (backoff_initial doubling to backoff_max), within a tolerance.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from tests.faults.system import System, fd_count, proc_children, proc_stat, rss_kb

RESTART_RE = re.compile(r"^(\S+ \S+) .*?collectord\.supervisor: (\S+): pid (\d+) (.+?) after ([\d.]+)s: "
                        r"restart #(\d+) in ([\d.]+)s", re.M)
SPAWN_RE = re.compile(r"^(\S+ \S+) .*?collectord\.supervisor: (\S+): spawned pid (\d+) .*spawn #(\d+)", re.M)


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t seconds, value) in value units per minute (0 for < 2 samples)."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    if den == 0:
        return 0.0
    return 60.0 * sum((t - mt) * (v - mv) for t, v in samples) / den


@dataclass
class Kill:
    name: str
    pid: int
    at: float  # wall clock


@dataclass
class Chaos:
    system: System
    rng: random.Random
    min_gap: float = 0.5
    max_gap: float = 3.0
    stop_share: float = 0.4
    max_pause: float = 1.0
    kills: list[Kill] = field(default_factory=list)
    stops: int = 0
    first_seen: dict[int, float] = field(default_factory=dict)
    zombie_since: dict[int, float] = field(default_factory=dict)
    zombie_max: dict[int, float] = field(default_factory=dict)
    sup_samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, fds, rss kB)
    supervisor_died: bool = False

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="chaos-monitor", daemon=True)

    # -- monitor -------------------------------------------------------------------------
    def _monitor(self) -> None:
        last_sup = 0.0
        while not self._stop.wait(0.05):
            now = time.time()
            sup = self.system.proc.pid if self.system.proc else None
            if sup is None:
                continue
            for pid in proc_children(sup):
                self.first_seen.setdefault(pid, now)
                self.system.seen.setdefault(pid, f"child of supervisor {sup}")
            for pid in list(self.first_seen):
                st = proc_stat(pid)
                if st is not None and st[0] == "Z":
                    since = self.zombie_since.setdefault(pid, now)
                    self.zombie_max[pid] = max(self.zombie_max.get(pid, 0.0), now - since)
            if now - last_sup >= 1.0:
                last_sup = now
                fds, rss = fd_count(sup), rss_kb(sup)
                if fds is not None and rss is not None:
                    self.sup_samples.append((now, fds, rss))

    # -- faults -------------------------------------------------------------------------
    def run(self, seconds: float, tick=None) -> None:
        """Faults for `seconds`; tick() (if given) is called between faults."""
        self._thread.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(self.rng.uniform(self.min_gap, self.max_gap))
            if self.system.proc.poll() is not None:
                self.supervisor_died = True
                break
            live = {}
            for name in self.system.children():
                pid = self.system.pid_of(name)
                if pid:
                    live[name] = pid
            if not live:
                continue
            name = self.rng.choice(sorted(live))
            pid = live[name]
            if self.rng.random() < self.stop_share:
                try:
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(self.rng.uniform(0.1, self.max_pause))
                    os.kill(pid, signal.SIGCONT)
                    self.stops += 1
                except ProcessLookupError:
                    pass
            else:
                try:
                    at = time.time()
                    os.kill(pid, signal.SIGKILL)
                    self.kills.append(Kill(name, pid, at))
                except ProcessLookupError:
                    pass
            if tick is not None:
                tick()

    def finish(self) -> None:
        time.sleep(3.0)  # the last kills' replacements (backoff_max) get seen
        self._stop.set()
        self._thread.join(5)

    # -- checks -------------------------------------------------------------------------
    def restart_delays(self, log: str, initial: float, maximum: float) -> list[dict]:
        """One entry per kill: announced delay, policy delay, measured delay (None if not seen)."""
        announced = {int(m.group(3)): (m.group(2), int(m.group(6)), float(m.group(7)))
                     for m in RESTART_RE.finditer(log)}
        spawns: dict[str, list[int]] = {}
        for m in SPAWN_RE.finditer(log):
            spawns.setdefault(m.group(2), []).append(int(m.group(3)))
        out = []
        for kill in self.kills:
            entry = {"name": kill.name, "pid": kill.pid, "announced": None, "policy": None, "measured": None}
            if kill.pid in announced:
                _, k, delay = announced[kill.pid]
                entry["announced"] = delay
                entry["restart"] = k
                entry["policy"] = min(initial * 2 ** (k - 1), maximum)
            pids = spawns.get(kill.name, [])
            if kill.pid in pids:
                i = pids.index(kill.pid)
                if i + 1 < len(pids) and pids[i + 1] in self.first_seen:
                    entry["measured"] = round(self.first_seen[pids[i + 1]] - kill.at, 3)
            out.append(entry)
        return out

    def supervisor_figures(self, warmup: float = 5.0) -> dict:
        if not self.sup_samples:
            return {}
        t0 = self.sup_samples[0][0]
        steady = [s for s in self.sup_samples if s[0] - t0 >= warmup] or self.sup_samples
        return {
            "sup_fds_first": steady[0][1], "sup_fds_last": steady[-1][1],
            "sup_fds_max": max(s[1] for s in steady),
            "sup_rss_kb_first": steady[0][2], "sup_rss_kb_last": steady[-1][2],
            "sup_rss_kb_per_min": round(slope_per_minute([(s[0], s[2]) for s in steady]), 1),
            "sup_fds_per_min": round(slope_per_minute([(s[0], s[1]) for s in steady]), 2),
        }


def log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
