"""The trade listener against polysim, with polysim's ledger as ground truth.

Each scenario runs a real TradesCollector in a forked process (signals, sockets
and PostgreSQL connections all real), with timings scaled down through options,
then waits (polling with a deadline) until every ledger trade of the followed
tokens is in `trades`, and checks: missing = 0, duplicated = 0.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections import Counter
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest

from workers.messages import canon_decimal
from workers.storage import migrate
from workers.trades import TradesCollector

FAST = dict(
    ping_interval="0.5", pong_timeout="1.0", stall_timeout="2.0", connect_timeout="3", read_timeout="3",
    backoff_initial="0.1", backoff_max="1.0", stable_after="2", refresh_interval="0.5", adopt_interval="1",
    coverage_interval="0.3", backfill_delay="0.3", backfill_margin="2", backfill_settle="0", connect_stagger="0.05",
    flush_age="0.1", backfill_rate="0",
)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def follow(sim, dsn: str, markets: int | None = None, since: datetime | None = None) -> dict[str, str]:
    """Put polysim's open markets (the first `markets`) into followed_tokens; token -> condition."""
    rows = sim.get("/gamma/markets?closed=false&limit=100")
    rows = rows[:markets] if markets else rows
    since = since or datetime.now(timezone.utc) - timedelta(hours=1)
    out = {}
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for m in rows:
            for i, (token, outcome) in enumerate(zip(json.loads(m["clobTokenIds"]), json.loads(m["outcomes"]))):
                cur.execute("INSERT INTO followed_tokens (token_id, market_id, condition_id, outcome, since)"
                            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                            (token, m["id"], m["conditionId"], outcome, since))
                out[token] = m["conditionId"]
    conn.close()
    return out


def unfollow(dsn: str, tokens) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM followed_tokens WHERE token_id = ANY(%s)", (list(tokens),))
    conn.close()


def start(sim, dsn: str, tmp_path, **options) -> int:
    """Construct before the fork, run in a forked child (SIGTERM -> stop()); returns its pid."""
    opts = dict(FAST)
    opts.update({k: str(v) for k, v in options.items()})
    shard, shards = int(opts.pop("shard", 0)), int(opts.pop("shards", 1))
    status_fd = int(opts.pop("status_fd", -1))
    status_every = float(opts.pop("status_every", 5.0))  # heartbeats with counters, as under the supervisor
    collector = TradesCollector(name=f"trades.{shard}", dsn=dsn, data_dir=str(tmp_path), ws_url=sim.ws_url,
                                data_url=sim.data_url, gamma_url=sim.gamma_url, clob_url=sim.clob_url,
                                shard=shard, shards=shards, **opts)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            signal.signal(signal.SIGTERM, lambda *_: collector.stop())
            if status_fd >= 0:
                collector.attach_supervisor(status_fd, status_every)
            collector.run()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def stop(pid: int, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("collector did not stop in time")


def key(token, tx, price, size, side):
    return (token, tx, canon_decimal(str(price)), canon_decimal(str(size)), side)


def ledger_counts(sim, tokens) -> Counter:
    return Counter(key(t["asset_id"], t["transaction_hash"], t["price"], t["size"], t["side"])
                   for t in sim.ledger() if t["asset_id"] in tokens)


def db_counts(dsn: str, tokens) -> Counter:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT token_id, tx_hash, price, size, side FROM trades WHERE token_id = ANY(%s)",
                    (list(tokens),))
        rows = cur.fetchall()
    conn.close()
    return Counter(key(*r) for r in rows)


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    conn.close()
    return rows


def assert_exactly_once(sim, dsn: str, tokens, timeout: float = 20.0) -> Counter:
    """Every ledger trade (so far) of tokens is in trades exactly once; returns the ledger counts."""
    expected = ledger_counts(sim, tokens)
    assert expected, "polysim published no trades for the followed tokens"
    txs = {k[1] for k in expected}
    state = {}

    def complete():
        got = db_counts(dsn, tokens)
        got = Counter({k: n for k, n in got.items() if k[1] in txs})
        state["missing"] = expected - got
        state["duplicated"] = got - expected
        return not state["missing"] and not state["duplicated"]

    try:
        wait_for(complete, timeout, 0.3, "every ledger trade exactly once")
    except AssertionError:
        raise AssertionError(f"missing={sum(state['missing'].values())} "
                             f"duplicated={sum(state['duplicated'].values())} of {sum(expected.values())}")
    return expected


def live_trades(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM trades WHERE source = 'ws'")[0][0]


def gap_rows(dsn: str) -> list[tuple]:
    return query(dsn, "SELECT token_id, started_at, ended_at, reason, recovered_at, recovered_trades FROM feed_gaps")


@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


def test_steady_run_every_trade_once_and_market_events_once(polysim, db, tmp_path):
    sim = polysim(markets=12, seed=3, trade_rate=40.0, multi_fill=0.5, new_market_rate=1.0, resolve_rate=0.5,
                  resolve_delay=0.5)
    tokens = follow(sim, db)
    # 8 assets a socket: several sockets in one process, each getting every announcement.
    pid = start(sim, db, tmp_path, assets_per_socket=8)
    try:
        wait_for(lambda: live_trades(db) > 50, 20, what="live trades")
        time.sleep(1.0)
        expected = assert_exactly_once(sim, db, tokens)
        assert sum(n for n in expected.values() if n > 1) > 0, "no exact repeats: ordinals untested"
        # The start gap (followed since an hour ago) was backfilled and recorded.
        gaps = wait_for(lambda: (g := gap_rows(db)) and all(r[4] is not None for r in g) and g, 15,
                        what="start gaps recovered")
        assert {g[0] for g in gaps} == set(tokens) and all(g[3] == "start" for g in gaps)
        # Resolutions announced on the sockets agree with Gamma (stored once: the key).
        resolved = wait_for(lambda: query(db, "SELECT market_id, winning_token_id FROM market_events"
                                              " WHERE kind = 'market_resolved'"), 15, what="a market_resolved")
        for market_id, winner in resolved:
            (market,) = sim.get(f"/gamma/markets?id={market_id}&closed=true")
            prices = dict(zip(json.loads(market["clobTokenIds"]), json.loads(market["outcomePrices"])))
            assert (prices[winner] == "1") if winner else set(prices.values()) == {"0.5"}
        # SIGTERM: flush, close the sockets and leave promptly.
        began = time.monotonic()
        assert stop(pid) == 0
        assert time.monotonic() - began < 5.0
        pid = None
    finally:
        if pid is not None:
            stop(pid)


class StatusPipe:
    """The supervisor's end of the status pipe: the last {"status": ...} the child sent."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.buf = b""
        self.last: dict = {}

    def read(self) -> dict:
        try:
            while chunk := os.read(self.r, 65536):
                self.buf += chunk
        except BlockingIOError:
            pass
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "status" in msg:
                self.last = msg["status"]
        return self.last


@pytest.mark.parametrize("fault,options,reason", [
    (dict(surface="ws", kind="drop"), {}, "disconnect"),
    # Pings rarer than the stall timeout: the silence itself must be noticed.
    (dict(surface="ws", kind="stall", seconds=3), dict(ping_interval=5, pong_timeout=5, stall_timeout=1.5), "stall"),
    (dict(surface="ws", kind="pong_withheld", duration=2.5), {}, "pong"),
], ids=["drop", "stall", "pong_withheld"])
def test_socket_faults_lose_nothing(polysim, db, tmp_path, fault, options, reason):
    sim = polysim(markets=8, seed=5, trade_rate=40.0, multi_fill=0.5)
    tokens = follow(sim, db)
    status = StatusPipe()
    pid = start(sim, db, tmp_path, assets_per_socket=6, status_fd=status.w, **options)
    os.close(status.w)
    try:
        wait_for(lambda: live_trades(db) > 20, 20, what="live trades")
        wait_for(lambda: status.read().get("sockets_connected") == 3, 10, what="3 sockets connected")
        sim.faults(**fault)
        # The fault opens gaps of its kind, which are closed and recovered.
        wait_for(lambda: any(g[3] == reason for g in gap_rows(db)), 15, what=f"a {reason} gap")
        before = live_trades(db)
        wait_for(lambda: live_trades(db) > before + 20, 20, what="live trades after reconnect")
        sim.faults(clear=True)
        assert_exactly_once(sim, db, tokens)
        wait_for(lambda: all(g[4] is not None for g in gap_rows(db)), 15, what="every gap recovered")
        # Status arrives every few seconds: wait for one that has seen the fault through.
        counters = wait_for(lambda: (s := status.read()).get("reconnects", 0) >= 3 and s.get("gaps_open") == 0
                            and s.get("sockets_connected") == 3 and s, 20,
                            what="status: reconnected, all connected, no gap open")
        assert counters["gaps_recovered"] >= 2 * len(tokens), json.dumps(counters)  # start gaps + fault gaps
        assert counters["trades_received"] > 40 and counters["rows_written"] > 0
        assert [row[1] for row in counters["socket_status"]] == [1, 1, 1]
        assert all(row[2] is not None and row[2] < 5 for row in counters["socket_status"])
    finally:
        assert stop(pid) == 0
        os.close(status.r)


def test_garbage_and_huge_frames_are_skipped_and_nothing_is_lost(polysim, db, tmp_path):
    sim = polysim(markets=6, seed=29, trade_rate=40.0, multi_fill=0.5)
    tokens = follow(sim, db)
    status = StatusPipe()
    pid = start(sim, db, tmp_path, status_fd=status.w)
    os.close(status.w)
    try:
        wait_for(lambda: live_trades(db) > 20, 20, what="live trades")
        sim.faults(surface="ws", kind="malformed", duration=3)
        sim.faults(surface="ws", kind="unknown_events", duration=3)
        sim.faults(surface="ws", kind="huge_frame", bytes=8 * 1024 * 1024)
        counters = wait_for(lambda: (s := status.read()).get("skipped", 0) > 0 and s.get("messages", 0) > 0 and s,
                            15, what="skipped garbage counted")
        time.sleep(3)
        sim.faults(clear=True)
        assert_exactly_once(sim, db, tokens)
        counters = status.read()
        assert counters["errors"] == 0 and counters["reconnects"] == 0  # garbage is skipped, not fatal
        assert not [g for g in gap_rows(db) if g[3] != "start"]
    finally:
        assert stop(pid) == 0
        os.close(status.r)


def test_kill9_mid_run_then_restart_loses_nothing(polysim, db, tmp_path):
    sim = polysim(markets=8, seed=7, trade_rate=60.0, multi_fill=0.5)
    tokens = follow(sim, db)
    pid = start(sim, db, tmp_path)
    wait_for(lambda: live_trades(db) > 50, 20, what="live trades")
    wait_for(lambda: query(db, "SELECT count(*) FROM feed_coverage")[0][0] == len(tokens), 10, what="coverage")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    killed_at = time.time()
    time.sleep(1.5)  # trades published while no listener runs
    pid = start(sim, db, tmp_path)
    try:
        wait_for(lambda: any(g[3] == "restart" and g[4] is not None for g in gap_rows(db)), 20,
                 what="a recovered restart gap")
        restart_gaps = [g for g in gap_rows(db) if g[3] == "restart"]
        assert all(g[1].timestamp() <= killed_at for g in restart_gaps)
        assert sum(g[5] for g in restart_gaps) > 0  # the gap did hold trades, and they were found
        assert_exactly_once(sim, db, tokens)
    finally:
        assert stop(pid) == 0


def test_a_listener_behind_the_exchange_vouches_only_for_what_it_read(polysim, db, tmp_path):
    """Exchange timestamps 10 s behind our clock: to the listener, as if it lagged 10 s
    behind the feed. Its coverage mark must follow the exchange time of what it read,
    not the time it read it (a kill -9 would lose what a lagging loop had not read yet);
    a kill -9 and a restart then lose nothing."""
    sim = polysim(markets=8, seed=7, trade_rate=60.0, epoch_ms=int(time.time() * 1000) - 10_000)
    tokens = follow(sim, db)
    pid = start(sim, db, tmp_path)
    try:
        wait_for(lambda: live_trades(db) > 50, 20, what="live trades")
        wait_for(lambda: query(db, "SELECT count(*) FROM feed_coverage")[0][0] == len(tokens), 10,
                 what="coverage")
        newest, covered = query(db, "SELECT (SELECT max(ts) FROM trades),"
                                    " (SELECT max(covered_until) FROM feed_coverage)")[0]
        assert covered <= newest + timedelta(seconds=1), (covered, newest)  # receipt time: 10 s ahead
        # The start gaps (from `since`) recovered first, so only the restart gap can cover
        # what is published, 10 s old, while no listener runs.
        wait_for(lambda: all(g[4] is not None for g in gap_rows(db)), 20, what="start gaps recovered")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    time.sleep(1.5)
    pid = start(sim, db, tmp_path)
    try:
        wait_for(lambda: any(g[3] == "restart" and g[4] is not None for g in gap_rows(db)), 20,
                 what="a recovered restart gap")
        assert_exactly_once(sim, db, tokens)
    finally:
        assert stop(pid) == 0


def test_followed_set_changes_while_running(polysim, db, tmp_path):
    sim = polysim(markets=10, seed=9, trade_rate=40.0, multi_fill=0.5)
    first = follow(sim, db, markets=4)
    pid = start(sim, db, tmp_path, assets_per_socket=5)
    try:
        wait_for(lambda: live_trades(db) > 20, 20, what="live trades")
        everything = follow(sim, db)  # six more markets while running
        dropped = sorted(first)[:2]
        unfollow(db, dropped)
        kept = {t for t in everything if t not in dropped}
        wait_for(lambda: query(db, "SELECT count(DISTINCT token_id) FROM trades WHERE source = 'ws'"
                               " AND token_id = ANY(%s)", (sorted(set(everything) - set(first)),))[0][0] >= 4,
                 20, what="live trades of newly followed tokens")
        assert_exactly_once(sim, db, kept)
    finally:
        assert stop(pid) == 0


def test_two_shards_split_the_tokens_and_store_every_trade_once(polysim, db, tmp_path):
    sim = polysim(markets=10, seed=19, trade_rate=40.0, multi_fill=0.5, new_market_rate=1.0)
    tokens = follow(sim, db)
    pipes = [StatusPipe(), StatusPipe()]
    pids = [start(sim, db, tmp_path, shard=i, shards=2, status_fd=pipes[i].w) for i in range(2)]
    for p in pipes:
        os.close(p.w)
    try:
        counts = wait_for(lambda: [p.read().get("tokens") for p in pipes] if all(
            p.read().get("sockets_connected") for p in pipes) else None, 20, what="both shards connected")
        assert sum(counts) == len(tokens) and all(0 < n < len(tokens) for n in counts)
        wait_for(lambda: live_trades(db) > 40, 20, what="live trades")
        assert_exactly_once(sim, db, tokens)
        # Each shard's coverage marks name only its own tokens.
        shards = dict(query(db, "SELECT shard, count(*) FROM feed_coverage GROUP BY shard"))
        assert set(shards) == {"0/2", "1/2"} and sum(shards.values()) == len(tokens)
        # Announcements reach both shards' sockets; stored once each, naming real markets.
        wait_for(lambda: query(db, "SELECT count(*) FROM market_events WHERE kind = 'new_market'")[0][0] > 0, 10,
                 what="market events")
        for market_id, condition_id, token_ids in query(
                db, "SELECT market_id, condition_id, token_ids FROM market_events WHERE kind = 'new_market'"):
            (market,) = sim.get(f"/gamma/markets?id={market_id}")
            assert market["conditionId"] == condition_id and json.loads(market["clobTokenIds"]) == token_ids
    finally:
        assert [stop(pid) for pid in pids] == [0, 0]
        for p in pipes:
            os.close(p.r)


def test_market_events_the_database_refuses_are_dropped_alone(db):
    from workers.messages import parse
    from workers.storage import gaps as store
    from workers.storage.db import Database
    from tests.conftest import DATA

    _, new, resolved = [line for line in (DATA / "ws_market_custom_feature_examples_docs.jsonl").read_text().splitlines()
                        if line.strip()]
    good = parse(new).markets[0]
    nul = dict(parse(resolved).markets[0], winning_outcome="Ye\x00s")
    surrogate = dict(good, kind="market_resolved", market_id="42", raw={"question": "\ud800"})
    with Database(db) as handle:
        now = datetime.now(timezone.utc)
        assert store.record_market_events(handle, [nul, surrogate, good], now) == 1
        assert store.record_market_events(handle, [good], now) == 0  # the second copy is a no-op
    assert query(db, "SELECT kind, market_id FROM market_events") == [("new_market", "1031769")]
