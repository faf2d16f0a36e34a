"""Two collectord instances ("hosts") against one PostgreSQL schema and one polysim.

Host(tmp, name, dsn, sim) writes a config of its own (PID file, data_dir, log under
tmp/name), with every delay scaled down as in tests/faults/system.py; `start()` runs
the real daemon (`python -m collectord -c CONF start`, which returns once its
collectors are spawned), `stop()` runs `collectord stop`, `kill9()` kills the whole
instance at once as a host dying would: the supervisor is frozen first (SIGSTOP, so it
neither restarts nor signals anyone), then every child and the supervisor get SIGKILL
(a child never gets the SIGTERM PR_SET_PDEATHSIG would send it: nothing is flushed).
Only pids read from this host's own PID file and /proc children of that pid are
signalled.

run(...) is the two-host scenario that tests/test_two_hosts.py asserts on and
`python -m bench twohost` prints: A starts (it takes every polling lease), B starts
(standby), kill -9 of A for `down` seconds (B takes over), A again (standby now), a
graceful stop + start of B (an upgrade: A takes over), settle, stop both, then the
figures: trades against polysim's ledger (tests/faults/accounting.py), the takeovers
measured two ways (status.json role changes, and the rows themselves: the gap between
the last price snapshot cycle of the old holder and the first of the new one), and the
doubled-snapshot check (see `snapshot_figures`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tests.conftest import query
from tests.faults import accounting
from tests.faults.system import POLL_FAST, ROOT, TRADES_FAST, proc_children, proc_stat, wait_for

POLLING = ("markets", "prices", "orderbooks", "resolutions")
UTC = timezone.utc


class Host:
    """One collectord instance: its own config, data_dir, PID file and log; the shared DSN."""

    def __init__(self, tmp: Path, name: str, dsn: str, sim, *, shards: int = 2, prices_interval: float = 1.0,
                 books_interval: float = 2.0, lease_retry: float = 3.0, watchdog: float = 10.0,
                 lease: bool = True):
        self.name = name
        self.dir = Path(tmp) / name
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "collectord.conf"
        self.pidfile = self.dir / "run" / "collectord.pid"
        self.status_path = self.dir / "run" / "status.json"
        self.prices_interval = prices_interval
        self.books_interval = books_interval
        lease = f"lease_retry = {lease_retry}\n" + ("" if lease else "lease = no\n")
        trade_opts = "".join(f"{k} = {v}\n" for k, v in TRADES_FAST.items())
        self.conf.write_text(
            "[collectord]\n"
            f"pidfile = {self.pidfile}\nlogfile = {self.dir}/collectord.log\n"
            f"data_dir = {self.dir}/data\ndsn = {dsn}\nallow_root = yes\ngraceful_timeout = 10\n"
            f"startsecs = 0.5\nwatchdog_timeout = {watchdog}\nhealth_interval = 0\n"
            "[restart]\nbackoff_initial = 0.5\nbackoff_max = 2\nmax_restarts = 1000\n"
            f"[polymarket]\ngamma_url = {sim.gamma_url}\nclob_url = {sim.clob_url}\n"
            f"data_url = {sim.data_url}\nws_url = {sim.ws_url}\n"
            "[selection]\nmin_volume_24h = 0\nmax_markets = 0\n"
            f"[collector:markets]\ninterval = 2\nrecent_pages = 3\n{POLL_FAST}{lease}"
            f"[collector:prices]\ninterval = {prices_interval}\n{POLL_FAST}{lease}"
            f"[collector:orderbooks]\ninterval = {books_interval}\n{POLL_FAST}{lease}"
            f"[collector:resolutions]\ninterval = 2\n{POLL_FAST}{lease}"
            f"[collector:trades]\nshards = {shards}\n{trade_opts}"
        )
        self.shards = shards
        self.pids_seen: set[int] = set()

    # -- commands ---------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("COLLECTORD_CONFIG", None)
        return subprocess.run([sys.executable, "-m", "collectord", "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=str(self.dir))

    def names(self) -> set[str]:
        return set(POLLING) | ({"trades"} if self.shards == 1 else {f"trades.{i}" for i in range(self.shards)})

    def start(self, wait: float = 60.0) -> None:
        """`collectord start` (daemonizes), then wait until every child is RUNNING."""
        done = self.cli("start")
        if done.returncode != 0:
            raise AssertionError(f"{self.name}: start exited {done.returncode}: {done.stdout}{done.stderr}"
                                 f"\n{self.log_tail()}")
        if not wait_for(lambda: self.names() <= self.running(), wait, 0.2):
            raise AssertionError(f"{self.name}: children not RUNNING: {self.children()}\n{self.log_tail()}")
        self.remember()

    def stop(self, timeout: float = 40.0) -> int:
        """`collectord stop` (SIGTERM, collectors flush, PID file removed)."""
        return self.cli("stop", "--timeout", str(timeout), timeout=timeout + 20).returncode

    def supervisor_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remember(self) -> None:
        sup = self.supervisor_pid()
        if sup:
            self.pids_seen.add(sup)
            self.pids_seen.update(proc_children(sup))

    def kill9(self) -> float:
        """kill -9 of the whole instance at once; returns the wall time of the kill."""
        sup = self.supervisor_pid()
        assert sup and proc_stat(sup), f"{self.name}: no supervisor to kill"
        os.kill(sup, signal.SIGSTOP)  # frozen: it restarts nothing and signals no one from here on
        children = proc_children(sup)
        at = time.time()
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        os.kill(sup, signal.SIGKILL)
        gone = lambda: all(proc_stat(p) is None or proc_stat(p)[0] in ("Z", "X") for p in children + [sup])
        assert wait_for(gone, 10, 0.05), f"{self.name}: processes survived kill -9"
        return at

    def close(self) -> None:
        """Teardown: stop if running, then SIGKILL any pid of ours still alive."""
        sup = self.supervisor_pid()
        if sup and proc_stat(sup) and proc_stat(sup)[0] not in ("Z", "X"):
            self.stop()
        for pid in self.pids_seen:
            st = proc_stat(pid)
            if st is not None and st[0] not in ("Z", "X"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- observation ----------------------------------------------------------------------
    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def children(self) -> dict[str, dict]:
        return {c["name"]: c for c in self.status().get("children", [])}

    def running(self) -> set[str]:
        return {n for n, c in self.children().items() if c.get("state") == "RUNNING"}

    def roles(self) -> dict[str, str | None]:
        """Polling collector -> "active"/"standby" as its last heartbeat reported (None: not yet)."""
        kids = self.children()
        return {n: (kids.get(n, {}).get("counters") or {}).get("role") for n in POLLING}

    def log_text(self) -> str:
        try:
            return (self.dir / "collectord.log").read_text(errors="replace")
        except OSError:
            return ""

    def restarts(self) -> int:
        """Spawns beyond each supervisor start's first, per child (a watchdog kill of a standby would count)."""
        text = self.log_text()
        return len(re.findall(r"spawn #(\d+)", text)) - len(re.findall(r"spawn #1\b", text))

    def watchdog_kills(self) -> int:
        return len(re.findall(r"silent for [\d.]+s \(watchdog_timeout", self.log_text()))

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.dir / "collectord.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_roles(host: Host, role: str, timeout: float) -> dict[str, float] | None:
    """Wait until every polling collector of host reports `role`; name -> wall time it was first seen."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, r in host.roles().items():
            if r == role and name not in seen:
                seen[name] = time.time()
        if len(seen) == len(POLLING):
            return seen
        time.sleep(0.1)
    return None


# -- the figures from the rows ------------------------------------------------------------------
def cycles(dsn: str) -> list[float]:
    """The prices collector's cycles: every distinct snapshot time (a cycle stamps all its rows with its start)."""
    return [r[0] for r in query(dsn, "SELECT DISTINCT extract(epoch FROM ts)::float8 FROM price_snapshots ORDER BY 1")]


def takeover_from_rows(series: list[float], at: float) -> float | None:
    """Seconds between the last prices cycle at or before `at` and the first after it (None: no cycle after)."""
    before = [t for t in series if t <= at]
    after = [t for t in series if t > at]
    if not before or not after:
        return None
    return round(after[0] - before[-1], 2)


def snapshot_figures(dsn: str, prices_interval: float, books_interval: float) -> dict:
    """Doubled snapshots, measured from the rows (the definition the test asserts on).

    One instance polling stamps consecutive prices cycles at least `interval` apart
    (workers/base.py aligns a late step to the interval grid, never earlier), so two
    instances polling at once show as cycles closer than interval/2: whatever their
    phase, one of the two spacings between interleaved cycles is at most interval/2.
    A takeover may add one such spacing (the new holder starts at once, however
    recently the old one began its last cycle). Per token the same holds for rows:
      prices_close_cycles  distinct snapshot times closer than interval/2 to the previous
      prices_close_pairs   max over tokens of such spacings between a token's rows
      books_close_pairs    max over tokens of orderbook rows closer than interval/2 (by received_at)
    """
    series = cycles(dsn)
    close_cycles = sum(1 for a, b in zip(series, series[1:]) if b - a < prices_interval / 2)
    (prices_close,), = query(dsn, (
        "SELECT coalesce(max(n), 0) FROM (SELECT token_id, count(*) FILTER (WHERE d < %s) AS n FROM ("
        " SELECT token_id, extract(epoch FROM ts - lag(ts) OVER (PARTITION BY token_id ORDER BY ts)) AS d"
        " FROM price_snapshots) x GROUP BY token_id) y"), (prices_interval / 2,))
    (books_close,), = query(dsn, (
        "SELECT coalesce(max(n), 0) FROM (SELECT token_id, count(*) FILTER (WHERE d < %s) AS n FROM ("
        " SELECT token_id, extract(epoch FROM received_at - lag(received_at) OVER (PARTITION BY token_id"
        " ORDER BY received_at)) AS d FROM orderbook_snapshots) x GROUP BY token_id) y"), (books_interval / 2,))
    (rows, tokens), = query(dsn, "SELECT count(*), count(DISTINCT token_id) FROM price_snapshots")
    (book_rows,), = query(dsn, "SELECT count(*) FROM orderbook_snapshots")
    return {"prices_cycles": len(series), "prices_snapshots": rows, "prices_tokens": tokens,
            "prices_close_cycles": close_cycles, "prices_close_pairs": int(prices_close),
            "books_snapshots": book_rows, "books_close_pairs": int(books_close)}


def owed(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM feed_gaps WHERE recovered_at IS NULL AND unrecoverable IS NULL")[0][0]


def run(tmp: Path, dsn: str, sim, *, down: float = 40.0, warm: float = 8.0, between: float = 5.0,
        shards: int = 2, settle: float = 40.0, lease: bool = True, ledger=None, prices_interval: float = 1.0,
        log=print) -> dict:
    """The two-host scenario (see the module docstring); returns its figures.

    lease=False (bench only) runs both instances without leases, to show what the
    doubled-snapshot figures look like when both poll. ledger: a callable giving the
    ledger entries (default sim.ledger; the bench pages through long runs' ledgers)."""
    a, b = (Host(tmp, n, dsn, sim, shards=shards, lease=lease, prices_interval=prices_interval,
                 books_interval=2 * prices_interval) for n in ("A", "B"))
    events: list[tuple[str, float]] = []
    try:
        a.start()
        assert not lease or wait_roles(a, "active", 20), f"A did not take every lease: {a.roles()}\n{a.log_tail()}"
        b.start()
        assert not lease or wait_roles(b, "standby", 20), f"B is not standing by: {b.roles()}\n{b.log_tail()}"
        if lease:  # what an operator sees: `collectord status` of each instance
            for host, role in ((a, "active"), (b, "standby")):
                shown = host.cli("status").stdout
                for name in POLLING:
                    assert re.search(rf"^{name}\s+RUNNING \({role}\)", shown, re.M), (host.name, shown)
        log(f"A active, B standby; warming up {warm:.0f} s")
        assert wait_for(lambda: query(dsn, "SELECT count(*) FROM trades")[0][0] > 0, 30), "no trades stored"
        time.sleep(warm)

        killed = a.kill9()
        events.append(("kill -9 A", killed))
        log(f"kill -9 of A (supervisor and {a.shards + len(POLLING)} collectors); down {down:.0f} s")
        took = wait_roles(b, "active", 30) if lease else {n: killed for n in POLLING}
        assert took, f"B did not take over within 30 s: {b.roles()}\n{b.log_tail()}"
        status_kill = {n: round(t - killed, 2) for n, t in took.items()}
        time.sleep(max(0.0, killed + down - time.time()))
        a.start()
        assert not lease or wait_roles(a, "standby", 20), f"A restarted is not standing by: {a.roles()}"
        time.sleep(between)

        stopped = time.time()
        events.append(("stop B", stopped))
        assert b.stop() == 0, b.log_tail()
        took = wait_roles(a, "active", 30) if lease else {n: stopped for n in POLLING}
        assert took, f"A did not take over within 30 s of B's stop: {a.roles()}\n{a.log_tail()}"
        status_stop = {n: round(t - stopped, 2) for n, t in took.items()}
        log(f"B stopped gracefully, A active; B again")
        b.start()
        assert not lease or wait_roles(b, "standby", 20), f"B restarted is not standing by: {b.roles()}"
        time.sleep(between)

        # Settle: every gap (A's restart, B's restart) backfilled; then stop both.
        wait_for(lambda: owed(dsn) == 0, settle, 0.5)
        cutoff = accounting.now_ms() - 1000
        assert a.stop() == 0 and b.stop() == 0
    finally:
        a.close()
        b.close()
    series = cycles(dsn)
    figures = accounting.collect(ledger() if ledger else sim.ledger(), dsn, cutoff_ms=cutoff,
                                 restarts=a.restarts() + b.restarts())
    figures["watchdog_kills"] = a.watchdog_kills() + b.watchdog_kills()
    figures.update(snapshot_figures(dsn, a.prices_interval, a.books_interval))
    figures.update({
        "down_s": down,
        "takeover_kill_rows_s": takeover_from_rows(series, killed),
        "takeover_stop_rows_s": takeover_from_rows(series, stopped),
        "takeover_kill_status_max_s": max(status_kill.values()),
        "takeover_stop_status_max_s": max(status_stop.values()),
        "takeover_kill_status": status_kill,
        "takeover_stop_status": status_stop,
        "takeovers": len(events),
        "lease": lease,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    return figures
