"""The trades key across a partition boundary, against polysim: a live millisecond and
its Data API second give the same trade_day, so each trade lands once, in one partition.

polysim stamps its Data API rows with `ts_ms // 1000` (polysim/data.py), the assumption
the partition column rests on (migrations/0023_partitions.sql). Its clock is set to run
across a UTC midnight (yesterday's, so every exchange time lies in the past).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

from tests.test_trades import (StatusPipe, assert_exactly_once, db, follow, query, start, stop,  # noqa: F401
                               wait_for)
from workers.backfill import number_repeats, rows_from_data_api
from workers.storage import Writer

UTC = timezone.utc


def test_trades_straddling_midnight_land_once_live_and_backfilled(polysim, db, tmp_path):  # noqa: F811
    midnight = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), UTC) - timedelta(days=1)
    m_ms = int(midnight.timestamp() * 1000)
    sim = polysim(markets=6, seed=23, trade_rate=40.0, multi_fill=0.5, epoch_ms=m_ms - 4000)
    tokens = follow(sim, db, since=midnight - timedelta(minutes=1))
    status = StatusPipe()
    # The start gaps ([since, first subscription]) reach past every exchange time, and are
    # fetched only once the exchange is past midnight: the backfill re-reads, from the Data
    # API, trades of both days that the socket already delivered.
    pid = start(sim, db, tmp_path, backfill_delay=6, status_fd=status.w, status_every=0.5)
    os.close(status.w)
    try:
        wait_for(lambda: any(int(t["timestamp"]) > m_ms + 4000 for t in sim.ledger()), 20, what="the exchange past midnight")
        counters = wait_for(lambda: (s := status.read()).get("gaps_recovered", 0) >= len(tokens) and s, 20,
                            what="the start gaps backfilled")
        newest_ms = max(int(t["timestamp"]) for t in sim.ledger())
        assert_exactly_once(sim, db, tokens)  # every trade of that ledger, and so up to newest_ms
    finally:
        assert stop(pid) == 0
        os.close(status.r)
    assert counters["trades_backfilled"] > 0
    day = midnight.date()
    live = {r[0]: r[1] for r in query(db, "SELECT trade_day, count(*) FROM trades WHERE source = 'ws' GROUP BY 1")}
    assert live.get(day - timedelta(days=1), 0) > 0 and live.get(day, 0) > 0, live  # both sides of midnight
    assert query(db, "SELECT count(*) FROM trades WHERE tableoid::regclass::text"
                     " <> 'trades_p' || to_char(trade_day, 'YYYYMMDD')") == [(0,)]
    # What the backfill would fetch over the whole run, from the Data API, as the backfill
    # turns it into rows: every row meets its stored twin with the same trade_day (its
    # partition), and writing them all adds nothing.
    conditions = sorted(set(tokens.values()))
    payload = sim.get(f"/data/trades?market={','.join(conditions)}&start={m_ms // 1000 - 10}"
                      f"&end={newest_ms // 1000 - 1}&limit=10000")
    rows, bad = rows_from_data_api(payload, set(tokens))
    number_repeats(rows)
    assert bad == 0 and rows
    near = [r for r in rows if abs((r["ts"] - midnight).total_seconds()) <= 1]
    assert {r["trade_day"] for r in near} == {day - timedelta(days=1), day}, "no trade within 1 s of midnight"
    stored = {(t, x, str(p), str(s), sd, o): d for t, x, p, s, sd, o, d in
              query(db, "SELECT token_id, tx_hash, price::text, size::text, side, ordinal, trade_day FROM trades")}
    for r in rows:
        assert stored[(r["token_id"], r["tx_hash"], r["price"], r["size"], r["side"], r["ordinal"])] == r["trade_day"]
    w = Writer(db, tmp_path / "spool-again", name="again", background=False).open()
    w.add("trades", rows)
    w.flush()
    w.close()
    assert w.stats()["rows_written"] == len(rows) and w.stats()["rows_inserted"] == 0
