"""The whole system under faults, with polysim's ledger as ground truth.

test_faults_nothing_lost_nothing_doubled runs the real supervisor (`start
--foreground`) with all five collectors (two trade shards) and a sixth collector
that exits 78, against polysim at a few hundred trades/s, into PostgreSQL behind
a loopback proxy, and injects in turn: kill -9 of collectors (trade shards and a
polling one), SIGSTOP (the watchdog must kill it), exchange faults of every kind
polysim has, pg_terminate_backend of the collectors' connections, a database
outage with a kill -9 during it (the dead process's spool replays in its
successor), rows written first by someone else (conflicting keys), and kill -9
of the supervisor followed by a fresh start (no orphan; the restart gap is
backfilled). Then it waits for the system to settle, stops it, and checks:
missing = 0, duplicated = 0 for the followed tokens, orphans = 0, rows rejected = 0.
The accounting table is printed (pytest -s) and written to accounting.txt in the
test's tmp dir.
"""

from __future__ import annotations

import json
import random
import re
import time

from tests.faults import accounting
from tests.faults import scenario as S
from tests.faults.system import System, proc_stat, wait_for

WATCHDOG = 5.0


def report(tmp_path, figures, journal, title):
    text = accounting.table(figures, title)
    path = accounting.write(figures, tmp_path / "accounting.txt", title)
    with open(path, "a") as fh:
        fh.write(json.dumps({"faults": journal.counts(), "journal": journal.events}) + "\n")
    print("\n" + text)
    print(f"faults injected: {journal.counts()}")
    print(f"accounting written to {path}")


def test_faults_nothing_lost_nothing_doubled(tmp_path, proxied_dsn, pg_proxy, polysim):
    dsn, direct = proxied_dsn
    rng = random.Random(9)
    journal = S.Journal()
    sim = polysim(markets=15, seed=7, trade_rate=250.0)
    system = System(tmp_path, dsn, sim, shards=2, watchdog=WATCHDOG,
                    extra="[collector:broken]\ntarget = tests.faults.targets:ExitConfig\n")
    orphans_after_kill: list[int] = []
    spool = accounting.SpoolWatcher(system.spool_dir).start()
    try:
        system.start()
        followed = wait_for(lambda: S.query(direct, "SELECT count(*) FROM followed_tokens")[0][0] >= 30, 30)
        assert followed, system.log_tail()
        assert wait_for(lambda: S.query(direct, "SELECT count(*) FROM trades")[0][0] > 200, 30)

        # A collector exiting 78: FATAL at once, spawned once, the others untouched.
        assert wait_for(lambda: system.children().get("broken", {}).get("state") == "FATAL", 15), \
            system.children().get("broken")
        broken = system.children()["broken"]
        assert broken["last_exit"] == "exit 78" and broken["restarts"] == 0, broken
        journal.add("exit 78", "broken -> FATAL")

        # Process faults.
        for _ in range(3):
            S.kill_child(system, journal, rng, ["trades.0", "trades.1"], wait_restart=True)
            time.sleep(rng.uniform(0.3, 1.5))
        S.kill_child(system, journal, rng, ["prices", "orderbooks", "markets", "resolutions"], wait_restart=True)
        killed_after = S.stop_child(system, journal, "trades.1", WATCHDOG)
        # The watchdog counts from the last heartbeat before the SIGSTOP (children beat every
        # watchdog_timeout/4 at most), so the kill comes W - W/4 .. W after the stop, plus latency.
        assert WATCHDOG - WATCHDOG / 4 - 0.5 <= killed_after <= WATCHDOG + 1.5, killed_after
        assert re.search(r"trades\.1: pid \d+ silent for [\d.]+s \(watchdog_timeout", system.log_text())

        # Exchange faults, two or three at a time.
        specs = list(S.EXCHANGE_FAULTS)
        rng.shuffle(specs)
        for i in range(0, len(specs), 3):
            for spec in specs[i:i + 3]:
                S.exchange_fault(sim, journal, spec)
            time.sleep(1.5)
        time.sleep(2)
        sim.faults(clear=True)

        # Database faults.
        assert S.terminate_backends(direct, pg_proxy, journal) > 0
        time.sleep(1.5)
        S.outage(pg_proxy, journal, 6.0, during=lambda: (
            time.sleep(2), S.kill_child(system, journal, rng, ["trades.0", "trades.1"], wait_restart=True)))
        S.conflicting_rows(sim, direct, journal)
        time.sleep(2)

        # kill -9 the supervisor: every child must follow it; a fresh start resumes.
        sup = system.kill_supervisor()
        journal.add("kill -9 supervisor", f"pid {sup}")
        gone = wait_for(lambda: not system.orphans(), 5, 0.05)
        orphans_after_kill = system.orphans()
        assert gone, f"orphans after kill -9 of the supervisor: {orphans_after_kill}"
        time.sleep(2)  # trades published while nothing listens: the next start must backfill them
        system.start()
        journal.add("fresh start")

        settled = S.quiesce(system, direct, timeout=60)
        cutoff = accounting.now_ms() - 1500
        time.sleep(2)
        assert settled, f"not settled: {system.children()}\n{system.log_tail()}"
        open_before_stop = S.query(direct, "SELECT count(*) FROM feed_gaps WHERE recovered_at IS NULL")[0][0]
        exchange_markets = sim.health()["markets"]
    finally:
        code = system.stop()
        orphans = system.orphans()
        system.close()
        spool.stop()
    figures = accounting.collect(sim.ledger(), direct, cutoff_ms=cutoff, restarts=system.restarts(),
                                 spool=spool, spool_dir=system.spool_dir, extra={
                                     "orphans": len(orphans) + len(orphans_after_kill),
                                     "supervisor_exit": code, "supervisor_starts": system.starts,
                                     "watchdog_kill_s": round(killed_after, 2)})
    report(tmp_path, figures, journal, "faults: process + exchange + database + supervisor kill -9")
    log = system.log_text()
    assert code == 0, system.log_tail()
    assert not orphans, orphans
    assert figures["published_followed"] > 1000, figures
    assert figures["missing"] == 0, figures
    assert figures["duplicated"] == 0, figures
    assert figures["rows_rejected"] == 0, figures
    assert open_before_stop == 0
    # The polling collectors came through the same faults with whole, sane tables.
    polled = S.query(direct, "SELECT (SELECT count(*) FROM markets), (SELECT count(*) FROM price_snapshots),"
                             " (SELECT count(*) FROM orderbook_snapshots),"
                             " (SELECT count(*) FROM price_snapshots WHERE best_bid NOT BETWEEN 0 AND 1"
                             "    OR best_ask NOT BETWEEN 0 AND 1 OR mid NOT BETWEEN 0 AND 1),"
                             " (SELECT count(*) FROM orderbook_snapshots WHERE bid_levels <> jsonb_array_length(bids)"
                             "    OR ask_levels <> jsonb_array_length(asks))")[0]
    assert polled[0] == exchange_markets and polled[1] > 0 and polled[2] > 0, polled
    assert polled[3] == 0 and polled[4] == 0, polled
    # Bad input and outages are logged in one line and counted: no traceback anywhere.
    assert not _tracebacks(log), _tracebacks(log)[:3]


def _tracebacks(log: str) -> list[str]:
    lines = log.splitlines()
    return [" | ".join(lines[max(0, i - 1):i + 12]) for i, line in enumerate(lines) if line.startswith("Traceback")]
