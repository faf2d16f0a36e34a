"""A real PostgreSQL restart mid-run (issue 9: "restart PostgreSQL mid-run").

The shared server on 5432 must keep running for everyone, so this test runs its own
embedded PostgreSQL (workers.storage.embedded, a real postmaster on a unix socket)
and restarts THAT: fast shutdown (every session ended, connections refused) while the
whole system runs against polysim, a few seconds down, then started again on the same
data directory. Rows received meanwhile spool and replay; at the end missing = 0,
duplicated = 0, spool empty, no traceback, and the accounting table is printed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.faults import accounting
from tests.faults import scenario as S
from tests.faults.system import System, wait_for
from workers.storage import embedded


@pytest.fixture
def pg_home():
    path = Path(tempfile.mkdtemp(prefix="faults-pg-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_postgresql_restart_mid_run(tmp_path, pg_home, polysim):
    server = embedded.start(pg_home / "pgdata")
    uri = server.uri
    sim = polysim(markets=10, seed=17, trade_rate=150.0)
    system = System(tmp_path, uri, sim, shards=2)
    journal = S.Journal()
    spool = accounting.SpoolWatcher(system.spool_dir).start()
    try:
        system.start()
        assert wait_for(lambda: S.query(uri, "SELECT count(*) FROM trades")[0][0] > 100, 30)
        server.stop()
        journal.add("postgres stopped", "fast shutdown")
        time.sleep(6)
        server = embedded.start(pg_home / "pgdata")
        journal.add("postgres started")
        assert server.uri == uri, (server.uri, uri)
        assert wait_for(lambda: spool.max_total > 0 and spool.pending_bytes() == 0, 60, 0.5), \
            (spool.max_total, spool.pending_bytes())
        settled = S.quiesce(system, uri, timeout=60)
        cutoff = accounting.now_ms() - 1500
        time.sleep(2)
        code = system.stop()
        orphans = system.orphans()
        figures = accounting.collect(sim.ledger(), uri, cutoff_ms=cutoff, restarts=system.restarts(), spool=spool,
                                     spool_dir=system.spool_dir,
                                     extra={"orphans": len(orphans), "supervisor_exit": code})
    finally:
        system.close()
        spool.stop()
        server.stop()
    print("\n" + accounting.table(figures, "PostgreSQL restart mid-run"))
    print(f"accounting written to {accounting.write(figures, tmp_path / 'accounting.txt', 'PostgreSQL restart')}")
    log = system.log_text()
    assert settled, system.log_tail()
    assert code == 0 and not orphans, (code, orphans)
    assert figures["missing"] == 0 and figures["duplicated"] == 0 and figures["rows_rejected"] == 0, figures
    assert figures["spool_bytes_replayed"] > 0, figures  # the outage was real: rows went through the spool
    assert "Traceback" not in log, log[log.find("Traceback") - 300:log.find("Traceback") + 1500]
