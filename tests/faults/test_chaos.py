"""S25, scaled down: 45 s of kill -9 / SIGSTOP+SIGCONT of random children every 0.5-3 s.

The real supervisor with all five collectors (two trade shards) against polysim
into PostgreSQL; backoff 0.5 s doubling to 2 s, no restart limit. Passes when the
supervisor stays alive; every kill -9 is restarted after the delay the supervisor
announced (which is the policy's delay for that restart number) +/- 0.5 s, measured
from outside (our kill -> first sight of the new pid in /proc); no pid of ours is a
zombie for more than 1 s; the supervisor's fd count ends where it started (+/- 2) and
its RSS grows less than 3 MB; after a stop: exit 0, no orphan, and the trades
accounting holds (missing = 0, duplicated = 0). The 10-minute version is
`python -m bench soak`.
"""

from __future__ import annotations

import random
import time

from tests.faults import accounting
from tests.faults import scenario as S
from tests.faults.chaos import Chaos
from tests.faults.system import System, wait_for

CHAOS_SECONDS = 45  # keeps the whole suite near 10 minutes on 2 cores
INITIAL, MAXIMUM = 0.5, 2.0


def test_s25_chaos_scaled(tmp_path, proxied_dsn, polysim):
    dsn, direct = proxied_dsn
    sim = polysim(markets=10, seed=13, trade_rate=100.0)
    system = System(tmp_path, dsn, sim, shards=2, watchdog=5.0, backoff_initial=INITIAL, backoff_max=MAXIMUM,
                    max_restarts=100000)
    chaos = Chaos(system, random.Random(25))
    spool = accounting.SpoolWatcher(system.spool_dir).start()
    try:
        system.start()
        assert wait_for(lambda: S.query(direct, "SELECT count(*) FROM trades")[0][0] > 50, 30)
        chaos.run(CHAOS_SECONDS)
        chaos.finish()
        alive = system.proc.poll() is None
        settled = S.quiesce(system, direct, timeout=60)
        cutoff = accounting.now_ms() - 1500
        time.sleep(2)
    finally:
        code = system.stop()
        orphans = system.orphans()
        system.close()
        spool.stop()
    delays = chaos.restart_delays(system.log_text(), INITIAL, MAXIMUM)
    measured = [d for d in delays if d["measured"] is not None]
    off = [d for d in measured if abs(d["measured"] - d["announced"]) > 0.5]
    wrong_policy = [d for d in delays if d["announced"] is not None and abs(d["announced"] - d["policy"]) > 1e-6]
    zombies = {pid: round(t, 2) for pid, t in chaos.zombie_max.items() if t > 1.0}
    sup = chaos.supervisor_figures()
    figures = accounting.collect(sim.ledger(), direct, cutoff_ms=cutoff, restarts=system.restarts(), spool=spool,
                                 spool_dir=system.spool_dir, extra={
                                     "kills": len(chaos.kills), "stop_conts": chaos.stops,
                                     "restarts_measured": len(measured),
                                     "restart_error_max_s": round(max((abs(d["measured"] - d["announced"])
                                                                       for d in measured), default=0), 3),
                                     "zombies_over_1s": len(zombies), "orphans": len(orphans),
                                     "supervisor_exit": code, **sup})
    text = accounting.table(figures, f"S25 chaos ({CHAOS_SECONDS} s)")
    path = accounting.write(figures, tmp_path / "accounting.txt", f"S25 chaos ({CHAOS_SECONDS} s)")
    print("\n" + text + f"\naccounting written to {path}")
    assert alive and not chaos.supervisor_died, system.log_tail()
    assert len(chaos.kills) >= 10, chaos.kills
    assert len(measured) >= 0.9 * len(chaos.kills), delays
    assert not wrong_policy, wrong_policy
    assert not off, off
    assert not zombies, zombies
    assert abs(sup["sup_fds_last"] - sup["sup_fds_first"]) <= 2, sup
    assert sup["sup_rss_kb_last"] - sup["sup_rss_kb_first"] < 3 * 1024, sup
    assert settled, system.log_tail()
    assert code == 0 and not orphans, (code, orphans)
    assert figures["missing"] == 0 and figures["duplicated"] == 0, figures
