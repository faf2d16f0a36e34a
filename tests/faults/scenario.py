"""Fault injection against a running System, shared by tests/faults and bench/soak.py.

Every function records what it did in `Journal` (time, kind, detail) so a run can
print what happened, and signals only pids the System recorded as its children.
Process faults: kill -9 a child, SIGSTOP (until the watchdog kills it, or SIGCONT
after a short pause), kill -9 the supervisor. Database faults: terminate our
backends (pg_terminate_backend on the proxy's upstream ports only), an outage
through the Proxy, rows written first by someone else (conflicting keys).
Exchange faults: polysim's /_sim/faults.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg2

from tests.faults.system import System, proc_stat, wait_for
from tests.conftest import query

UTC = timezone.utc

EXCHANGE_FAULTS = [
    dict(surface="ws", kind="drop"),
    dict(surface="ws", kind="drop", clean=True),
    dict(surface="ws", kind="stall", seconds=3),
    dict(surface="ws", kind="pong_withheld", duration=3),
    dict(surface="ws", kind="unknown_events", duration=4),
    dict(surface="ws", kind="malformed", duration=4),
    dict(surface="ws", kind="huge_frame", bytes=2_000_000, count=1),
    dict(surface="ws", kind="refuse", count=2),
    dict(surface="ws", kind="429", count=2),
    dict(surface="gamma", kind="429", retry_after=1, probability=0.5, duration=4),
    dict(surface="clob", kind="429", retry_after=1, probability=0.5, duration=4),
    dict(surface="data", kind="429", retry_after=1, probability=0.5, duration=4),
    dict(surface="all", kind="5xx", status=503, probability=0.5, duration=3),
    dict(surface="all", kind="slow", delay=1.5, count=6),
    dict(surface="all", kind="truncated", probability=0.3, duration=4),
    dict(surface="all", kind="malformed", probability=0.3, duration=4),
    dict(surface="all", kind="cut", probability=0.3, duration=4),
    dict(surface="all", kind="extra_fields", duration=4),
    dict(surface="all", kind="html403", probability=0.3, duration=3),
    dict(surface="data", kind="refuse", probability=0.5, duration=3),
]


@dataclass
class Journal:
    t0: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def add(self, kind: str, detail: str = "") -> None:
        self.events.append((round(time.monotonic() - self.t0, 2), kind, detail))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, kind, _ in self.events:
            out[kind] = out.get(kind, 0) + 1
        return out


def live_children(system: System) -> dict[str, int]:
    """name -> pid of every child that is alive now (ppid = our supervisor, not a zombie)."""
    out = {}
    for name in system.children():
        pid = system.pid_of(name)
        if pid:
            out[name] = pid
    return out


def kill_child(system: System, journal: Journal, rng: random.Random, names: list[str] | None = None,
               wait_restart: bool = False, timeout: float = 30.0) -> tuple[str, int, float] | None:
    """kill -9 a random live child (of `names`); optionally wait for its replacement."""
    live = live_children(system)
    choices = [n for n in (names or list(live)) if n in live]
    if not choices:
        return None
    name = rng.choice(choices)
    pid = live[name]
    at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    journal.add("kill -9", f"{name} pid {pid}")
    if wait_restart:
        assert wait_for(lambda: system.pid_of(name) not in (None, pid), timeout, 0.05), \
            f"{name} not restarted after kill -9:\n{system.log_tail()}"
    return name, pid, at


def stop_child(system: System, journal: Journal, name: str, watchdog: float, timeout: float = 30.0) -> float:
    """SIGSTOP a child and wait until the watchdog kills and replaces it; returns seconds to the kill."""
    pid = system.pid_of(name)
    assert pid, f"{name} not running"
    at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    journal.add("SIGSTOP", f"{name} pid {pid}")

    def gone():
        st = proc_stat(pid)
        return st is None or st[0] in ("Z", "X")

    assert wait_for(gone, watchdog + timeout, 0.05), f"{name} pid {pid} still stopped after the watchdog"
    killed_after = time.monotonic() - at
    assert wait_for(lambda: system.pid_of(name) not in (None, pid), timeout, 0.05), system.log_tail()
    return killed_after


def stop_cont(system: System, journal: Journal, rng: random.Random, pause: float,
              names: list[str] | None = None) -> str | None:
    """SIGSTOP a random live child (of `names`) for `pause` seconds, then SIGCONT it."""
    live = live_children(system)
    choices = sorted(n for n in (names or list(live)) if n in live)
    if not choices:
        return None
    name = rng.choice(choices)
    pid = live[name]
    os.kill(pid, signal.SIGSTOP)
    journal.add("SIGSTOP+SIGCONT", f"{name} pid {pid} for {pause:.2f}s")
    time.sleep(pause)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    return name


def terminate_backends(direct_dsn: str, proxy, journal: Journal) -> int:
    """pg_terminate_backend on every server connection the proxy holds (ours only)."""
    ports = proxy.upstream_ports()
    if not ports:
        return 0
    conn = psycopg2.connect(direct_dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE client_addr = '127.0.0.1' AND client_port = ANY(%s) AND pid <> pg_backend_pid()",
                        (ports,))
            n = cur.fetchone()[0]
    finally:
        conn.close()
    journal.add("pg_terminate_backend", f"{n} backends")
    return n


def outage(proxy, journal: Journal, seconds: float, during=None) -> None:
    """The database refuses connections for `seconds` (existing ones are cut)."""
    proxy.down()
    journal.add("db down", f"{seconds:.1f}s")
    end = time.monotonic() + seconds
    if during is not None:
        during()
    time.sleep(max(0.0, end - time.monotonic()))
    proxy.up()
    journal.add("db up")


def conflicting_rows(sim, direct_dsn: str, journal: Journal, n: int = 30) -> int:
    """Write the newest published trades ourselves, first if we are quick: the collectors'
    rows for them then meet an existing key (must be neither lost nor doubled)."""
    total = int(sim.health()["trades"])
    rows = sim.ledger(max(0, total - n))[-n:]
    conn = psycopg2.connect(direct_dsn, connect_timeout=10)
    inserted = 0
    try:
        from workers.storage import partitions

        # raw INSERTs: their days' partitions (the Writer and the collectors make their own)
        partitions.create(conn, "trades", {datetime.fromtimestamp(int(t["timestamp"]) / 1000, UTC).date() for t in rows})
        with conn, conn.cursor() as cur:
            for t in rows:
                cur.execute(
                    "INSERT INTO trades (token_id, condition_id, ts, price, size, side, tx_hash, ordinal,"
                    " fee_rate_bps, source, received_at, trade_day) VALUES (%s, %s, %s, %s, %s, %s, %s, 0, %s, 'ws',"
                    " now(), (%s::timestamptz AT TIME ZONE 'UTC')::date)"
                    " ON CONFLICT DO NOTHING",
                    (t["asset_id"], t["market"], datetime.fromtimestamp(int(t["timestamp"]) / 1000, UTC),
                     t["price"], t["size"], t["side"], t["transaction_hash"].lower(), t.get("fee_rate_bps"),
                     datetime.fromtimestamp(int(t["timestamp"]) / 1000, UTC)))
                inserted += cur.rowcount
    finally:
        conn.close()
    journal.add("conflicting rows", f"{inserted} of {len(rows)} written before the collectors")
    return inserted


def exchange_fault(sim, journal: Journal, spec: dict) -> None:
    sim.faults(**spec)
    journal.add("exchange", ",".join(f"{k}={v}" for k, v in spec.items()))




def quiesce(system: System, direct_dsn: str, timeout: float = 60.0) -> bool:
    """Wait until every expected child runs, no gap is owed (each recovered or ended
    unrecoverable) and the spool is empty."""
    expect = system.expected_names()

    def settled():
        if not expect <= system.running_names():
            return False
        open_gaps = query(direct_dsn, "SELECT count(*) FROM feed_gaps WHERE recovered_at IS NULL"
                                      " AND unrecoverable IS NULL")[0][0]
        spooled = sum(p.stat().st_size for p in system.spool_dir.glob("*/*.seg")) if system.spool_dir.exists() else 0
        return open_gaps == 0 and spooled == 0

    return bool(wait_for(settled, timeout, 0.5))
