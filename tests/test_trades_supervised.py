"""The trade listener under the real supervisor: two shards, one killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_trades import FAST, assert_exactly_once, db, follow, gap_rows, live_trades, wait_for  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, sim, dsn: str) -> Path:
    options = "\n".join(f"{k} = {v}" for k, v in FAST.items())
    conf = tmp_path / "collectord.conf"
    conf.write_text(f"""
[collectord]
pidfile = {tmp_path}/run/collectord.pid
logfile = {tmp_path}/collectord.log
data_dir = {tmp_path}/data
dsn = {dsn}
allow_root = yes
startsecs = 0.5
health_interval = 5

[restart]
backoff_initial = 0.5
backoff_max = 1

[polymarket]
gamma_url = {sim.gamma_url}
clob_url = {sim.clob_url}
data_url = {sim.data_url}
ws_url = {sim.ws_url}

[collector:markets]
enabled = no
[collector:prices]
enabled = no
[collector:orderbooks]
enabled = no
[collector:resolutions]
enabled = no

[collector:trades]
shards = 2
{options}
""")
    return conf


def children(status_path: Path) -> dict:
    try:
        doc = json.loads(status_path.read_text())
    except (OSError, ValueError):
        return {}
    return {c["name"]: c for c in doc.get("children", [])}


def test_kill9_of_a_shard_under_the_supervisor_loses_nothing(polysim, db, tmp_path):  # noqa: F811
    sim = polysim(markets=10, seed=23, trade_rate=50.0, multi_fill=0.5)
    tokens = follow(sim, db)
    conf = write_config(tmp_path, sim, db)
    status = tmp_path / "run" / "status.json"
    proc = subprocess.Popen([sys.executable, "-m", "collectord", "-c", str(conf), "start", "--foreground"],
                            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        running = wait_for(lambda: (c := children(status)) and all(
            c.get(n, {}).get("state") == "RUNNING" and c[n].get("pid") for n in ("trades.0", "trades.1")) and c,
            30, what="trades.0 and trades.1 RUNNING")
        wait_for(lambda: live_trades(db) > 50, 20, what="live trades")
        victim = running["trades.0"]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        again = wait_for(lambda: (c := children(status)).get("trades.0", {}).get("state") == "RUNNING"
                         and c["trades.0"].get("pid") not in (None, victim) and c, 30, what="trades.0 restarted")
        assert again["trades.0"]["restarts"] == 1 and again["trades.1"]["pid"] == running["trades.1"]["pid"]
        assert again["trades.0"]["last_exit"] == "signal 9"
        wait_for(lambda: any(g[3] == "restart" and g[4] is not None and g[1].timestamp() <= killed_at
                             for g in gap_rows(db)), 20, what="the restart gap recovered")
        before = live_trades(db)
        wait_for(lambda: live_trades(db) > before + 30, 20, what="live trades after the restart")
        assert_exactly_once(sim, db, tokens)
        # The restarted shard reports its sockets and gaps through the supervisor.
        wait_for(lambda: (k := children(status)["trades.0"]["counters"]).get("sockets_connected", 0) >= 1
                 and k.get("gaps_recovered", 0) >= 1 and k.get("trades_received", 0) > 0, 15,
                 what="trades.0 counters in status.json")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
