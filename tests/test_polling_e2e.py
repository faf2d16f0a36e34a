"""The four polling collectors end to end: real supervisor, real polysim, real PostgreSQL.

test_four_collectors_under_the_supervisor runs `collectord -c CONF start
--foreground` in a subprocess (the daemon's own code path, forked children,
SIGTERM) against polysim with markets opening, trading, closing and resolving,
for about 15 s with intervals scaled down, then checks the tables against what
polysim serves. The other tests drive one collector in-process (step() by hand)
for behaviour that needs a controlled exchange: unchanged books, faults mid-cycle,
SIGTERM mid-cycle, corrections of a resolution.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import pytest

from workers.storage import migrate
from tests.conftest import query

ROOT = Path(__file__).resolve().parent.parent
UTC = timezone.utc


def wait_for(pred, timeout, every=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)




def gamma_all(sim, closed):
    """Every market polysim lists with closed=<closed>, through keyset paging."""
    out, cursor = [], None
    for _ in range(1000):
        q = f"/gamma/markets/keyset?limit=100&closed={'true' if closed else 'false'}"
        page = sim.get(q + (f"&after_cursor={cursor}" if cursor else ""))
        out.extend(page["markets"])
        cursor = page.get("next_cursor")
        if not cursor:
            return out
    raise AssertionError("keyset paging did not end")


def expected_resolution(m):
    """What a resolved polysim market says, decoded here independently of the parser."""
    if m.get("umaResolutionStatus") != "resolved":
        return None
    prices = [float(x) for x in json.loads(m["outcomePrices"])]
    tokens = json.loads(m["clobTokenIds"])
    if prices.count(1.0) == 1 and prices.count(0.0) == len(prices) - 1:
        return "resolved", tokens[prices.index(1.0)]
    assert len(set(prices)) == 1, m["outcomePrices"]
    return "void", None


def conf_text(tmp, dsn, sim, selection, collectors):
    return (
        "[collectord]\n"
        f"pidfile = {tmp}/run/collectord.pid\nlogfile = {tmp}/log/collectord.log\ndata_dir = {tmp}/data\n"
        f"dsn = {dsn}\nallow_root = yes\ngraceful_timeout = 10\nstartsecs = 0.5\nhealth_interval = 0\n"
        "[restart]\nbackoff_initial = 0.5\nbackoff_max = 1\n"
        f"[polymarket]\ngamma_url = {sim.gamma_url}\nclob_url = {sim.clob_url}\n"
        f"data_url = {sim.data_url}\nws_url = {sim.ws_url}\n"
        f"[selection]\n{selection}\n"
        "[collector:trades]\nenabled = no\n"
        f"{collectors}"
    )


@pytest.mark.slow
def test_four_collectors_under_the_supervisor(tmp_path, pg_dsn, polysim):
    sim = polysim(markets=30, seed=5, trade_rate=3.0, closed_markets=8, resolve_rate=0.4, resolve_delay=1.0,
                  new_market_rate=0.3, clob_delay=1.0)
    conf = tmp_path / "collectord.conf"
    conf.write_text(conf_text(
        tmp_path, pg_dsn, sim, "max_markets = 10",
        "[collector:markets]\ninterval = 1\n"
        "[collector:prices]\ninterval = 1\n"
        "[collector:orderbooks]\ninterval = 1.5\nskip_unchanged = no\n"
        "[collector:resolutions]\ninterval = 1\n",
    ))
    status_path = tmp_path / "run" / "status.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("COLLECTORD_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "collectord", "-c", str(conf), "start", "--foreground"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        def children():
            try:
                return json.loads(status_path.read_text())["children"]
            except (OSError, ValueError, KeyError):
                return None

        def all_running():
            kids = children()
            return kids and sorted(c["name"] for c in kids if c["state"] == "RUNNING") == [
                "markets", "orderbooks", "prices", "resolutions"]

        assert wait_for(all_running, 30), children()
        assert wait_for(lambda: query(pg_dsn, "SELECT count(*) FROM followed_tokens")[0][0] == 20, 20)
        run_from = datetime.now(UTC)
        time.sleep(12)
        kids = {c["name"]: c for c in children()}
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        stopped = datetime.now(UTC)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(5)
    log = "".join(stderr)
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    # status: every collector reported rows, a recent success and no errors
    for name in ("markets", "prices", "orderbooks", "resolutions"):
        c = kids[name]["counters"]
        assert c["rows_written"] > 0 and c["last_success"] is not None, (name, c)
        assert c["errors"] == 0, (name, c)
        assert kids[name]["restarts"] == 0

    # markets: every market polysim lists (open and closed) is stored, with its tokens
    open_now, closed_now = gamma_all(sim, False), gamma_all(sim, True)
    stored = dict(query(pg_dsn, "SELECT market_id, closed FROM markets"))
    settled = stopped - timedelta(seconds=6)  # changes older than this must have been seen
    for m in open_now + closed_now:
        if datetime.fromisoformat(m["updatedAt"]) < settled:
            assert m["id"] in stored, m["id"]
            assert stored[m["id"]] == m["closed"], (m["id"], m["closed"])
    tokens = query(pg_dsn, "SELECT market_id, count(*), array_agg(outcome_index ORDER BY outcome_index) "
                           "FROM tokens GROUP BY 1")
    assert len(tokens) == len(stored) and all(n == 2 and idx == [0, 1] for _, n, idx in tokens)
    assert query(pg_dsn, "SELECT count(*) FROM markets WHERE raw IS NULL")[0][0] == 0

    # followed: 10 markets (max_markets), both tokens of each, all markets known
    followed = query(pg_dsn, "SELECT f.market_id, count(*), bool_and(t.token_id IS NOT NULL) FROM followed_tokens f "
                             "LEFT JOIN tokens t ON t.token_id = f.token_id GROUP BY 1")
    assert len(followed) == 10 and all(n == 2 and known for _, n, known in followed)

    # price snapshots every ~1 s per followed token, never stacked
    rows = query(pg_dsn, "SELECT token_id, array_agg(ts ORDER BY ts) FROM price_snapshots WHERE ts >= %s "
                         "GROUP BY 1", (run_from,))
    assert len(rows) >= 20
    gaps = [(b - a).total_seconds() for _, ts in rows for a, b in zip(ts, ts[1:])]
    assert 0.8 <= statistics.median(gaps) <= 1.6, statistics.median(gaps)
    assert min(gaps) >= 0.5  # a slow cycle delays the next; it never stacks two
    counts = [len(ts) for _, ts in rows]
    assert max(counts) >= 7  # ~12 s at 1 s intervals
    # BUY is the bid and SELL the ask: one /prices answer, so never crossed or locked (polysim keeps a spread)
    assert query(pg_dsn, "SELECT count(*) FROM price_snapshots WHERE best_bid >= best_ask")[0][0] == 0
    # the midpoint comes from another request, so the book may move in between: most, not all, agree
    both, agree = query(pg_dsn, "SELECT count(*), count(*) FILTER (WHERE mid = (best_bid + best_ask) / 2) "
                                "FROM price_snapshots WHERE best_bid IS NOT NULL AND best_ask IS NOT NULL")[0]
    assert both > 0 and agree >= 0.8 * both, (both, agree)
    assert query(pg_dsn, "SELECT count(*) FROM price_snapshots WHERE mid IS NULL AND best_bid IS NOT NULL "
                         "AND best_ask IS NOT NULL")[0][0] == 0

    # book snapshots: one POST /books per 1.5 s cycle, never stacked. A book that did
    # not change keeps its (ts, hash) key and lands once, so the cycle times are the
    # distinct received_at values over all tokens (one chunk = one request here).
    rows = query(pg_dsn, "SELECT DISTINCT received_at FROM orderbook_snapshots WHERE received_at >= %s "
                         "ORDER BY 1", (run_from,))
    times = [r[0] for r in rows]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert len(times) >= 5
    assert 1.2 <= statistics.median(gaps) <= 2.4, statistics.median(gaps)
    assert min(gaps) >= 0.75
    assert query(pg_dsn, "SELECT count(DISTINCT token_id) FROM orderbook_snapshots")[0][0] >= 20
    assert kids["orderbooks"]["counters"]["last_cycle"]["coverage"] >= 0.9  # a new market may 404 briefly
    bad = query(pg_dsn, "SELECT count(*) FROM orderbook_snapshots WHERE "
                        "(bid_levels > 0 AND best_bid <> (bids->0->>0)::numeric) OR "
                        "(ask_levels > 0 AND best_ask <> (asks->0->>0)::numeric) OR "
                        "(bid_levels > 1 AND (bids->0->>0)::numeric <= (bids->1->>0)::numeric) OR "
                        "(ask_levels > 1 AND (asks->0->>0)::numeric >= (asks->1->>0)::numeric) OR "
                        "jsonb_array_length(bids) <> bid_levels OR jsonb_array_length(asks) <> ask_levels")
    assert bad[0][0] == 0

    # no duplicates: one row per natural key
    for table, key in (("price_snapshots", "token_id, ts"), ("orderbook_snapshots", "token_id, ts, hash"),
                       ("resolutions", "market_id"), ("tokens", "token_id")):
        n, distinct = query(pg_dsn, f"SELECT count(*), count(DISTINCT ({key})) FROM {table}")[0]
        assert n == distinct, table

    # resolutions: what polysim says, for every market settled before the stop
    ours = {mid: (status, winner) for mid, status, winner in
            query(pg_dsn, "SELECT market_id, status, winning_token_id FROM resolutions")}
    expected = {m["id"]: expected_resolution(m) for m in closed_now}
    resolved_before = [m for m in closed_now if expected[m["id"]] is not None
                       and datetime.fromisoformat(m["umaEndDate"]) < stopped - timedelta(seconds=6)]
    assert len(resolved_before) >= 8  # the history plus markets that resolved during the run
    for m in resolved_before:
        assert ours.get(m["id"]) == expected[m["id"]], m["id"]
    for mid, verdict in ours.items():
        assert expected.get(mid) == verdict, mid  # nothing written that polysim does not say


def _collector(cls, sim, pg_dsn, tmp_path, name, **options):
    return cls(name=name, dsn=pg_dsn, data_dir=str(tmp_path), selection={}, gamma_url=sim.gamma_url,
               clob_url=sim.clob_url, data_url=sim.data_url, ws_url=sim.ws_url,
               **{k: str(v) for k, v in options.items()})


@pytest.fixture
def quiet_sim(polysim):
    """An exchange whose books do not move: no trades, no book changes, no resolutions."""
    return polysim(markets=12, seed=9, trade_rate=0.0, book_rate=0.0, closed_markets=4)


def test_orderbooks_skip_unchanged_books_but_count_them(tmp_path, pg_dsn, quiet_sim):
    from workers.markets import MarketsCollector
    from workers.orderbooks import OrderbooksCollector

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets")
    books = _collector(OrderbooksCollector, quiet_sim, pg_dsn, tmp_path, "orderbooks", batch=5)
    for w in (markets, books):
        w.init_process()
    try:
        markets.step()
        followed = query(pg_dsn, "SELECT count(*) FROM followed_tokens")[0][0]
        assert followed == 24
        books.step()
        first = books.last_cycle
        assert first["tokens"] == 24 and first["received"] == 24 and first["written"] == 24
        assert first["requests"] == 5 and first["batches"] == 5 and first["coverage"] == 1.0
        books.step()
        second = books.last_cycle
        assert second["received"] == 24 and second["unchanged"] == 24 and second["written"] == 0
        books.writer.flush()
        assert query(pg_dsn, "SELECT count(*) FROM orderbook_snapshots")[0][0] == 24
        status = books.status()
        assert status["last_cycle"]["unchanged"] == 24 and status["rows_written"] >= 24
        assert len(json.dumps(status)) < 3000  # fits the supervisor pipe's atomic write
    finally:
        for w in (markets, books):
            w.shutdown()


def test_prices_survive_faults_and_count_them(tmp_path, pg_dsn, quiet_sim):
    from workers.markets import MarketsCollector
    from workers.prices import PricesCollector

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets")
    prices = _collector(PricesCollector, quiet_sim, pg_dsn, tmp_path, "prices", batch=6, retries=2, timeout=1)
    for w in (markets, prices):
        w.init_process()
    try:
        markets.step()
        prices.client.backoff = (0.01, 0.02)
        # every CLOB answer malformed: both attempts of every chunk fail -> counted, no rows, no crash
        quiet_sim.faults(surface="clob", kind="malformed")
        prices.step()
        cycle = prices.last_cycle
        assert cycle["failed_batches"] == 4 and cycle["rows"] == 0 and prices.counters["errors"] == 4
        quiet_sim.faults(clear=True)
        # one 500 and one 429 are absorbed by the client's retries
        quiet_sim.faults(surface="clob", kind="5xx", count=1)
        quiet_sim.faults(surface="clob", kind="429", count=1, retry_after=1)
        prices.step()
        cycle = prices.last_cycle
        assert cycle["failed_batches"] == 0 and cycle["rows"] == 24 and cycle["requests"] == 12 + 2
        # no explicit flush: a cycle ends with its rows in PostgreSQL
        rows = query(pg_dsn, "SELECT count(*), count(DISTINCT ts), count(condition_id) FROM price_snapshots")[0]
        assert rows == (24, 1, 24)
    finally:
        for w in (markets, prices):
            w.shutdown()


def test_sigterm_mid_cycle_stops_within_one_request(tmp_path, pg_dsn, quiet_sim):
    from workers.markets import MarketsCollector
    from workers.orderbooks import OrderbooksCollector

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets")
    markets.init_process()
    markets.step()
    markets.shutdown()
    books = _collector(OrderbooksCollector, quiet_sim, pg_dsn, tmp_path, "orderbooks", batch=2, interval=60)
    quiet_sim.faults(surface="clob", kind="slow", delay=0.5)  # each of the 12 requests takes 0.5 s
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child runs the collector the way the supervisor does
        code = 1
        try:
            os.close(r)
            signal.signal(signal.SIGTERM, lambda *_: books.stop())
            books.attach_supervisor(w)
            books.run()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        def received_rows():
            return query(pg_dsn, "SELECT count(*) FROM orderbook_snapshots")[0][0]
        assert wait_for(lambda: received_rows() >= 2, 20)  # mid-cycle: some chunks written
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        took = time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert os.waitstatus_to_exitcode(status) == 0
    assert took < 3.0, took  # one slow request at most, not the 6 s cycle
    written = received_rows()
    assert 2 <= written < 24  # the chunks done before SIGTERM were flushed, the rest never fetched
    messages = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        messages += chunk
    os.close(r)
    last = [json.loads(line)["status"] for line in messages.splitlines() if b'"status"' in line][-1]
    assert last["last_cycle"].get("interrupted") is True and last["rows_written"] == written


def test_resolution_written_once_and_corrected(tmp_path, pg_dsn, quiet_sim):
    """A correction on the exchange (a different winner) rewrites the row; an equal answer does not."""
    from workers.markets import MarketsCollector
    from workers.resolutions import ResolutionsCollector

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets")
    res = _collector(ResolutionsCollector, quiet_sim, pg_dsn, tmp_path, "resolutions")
    for w in (markets, res):
        w.init_process()
    try:
        markets.step()
        res.step()
        res.writer.flush()
        first = query(pg_dsn, "SELECT market_id, status, winning_token_id, updated_at FROM resolutions "
                              "ORDER BY market_id")
        assert len(first) == 4 and res.last_cycle["written"] == 4
        res.step()
        res.writer.flush()
        assert res.last_cycle["written"] == 0 and res.last_cycle["checked"] == 4
        states = res.last_cycle["states"]
        assert res.last_cycle["unanswered"] == 0 and sum(states.values()) == 4
        assert set(states) <= {"resolved", "void"}  # polysim's history is settled
        assert query(pg_dsn, "SELECT market_id, status, winning_token_id, updated_at FROM resolutions "
                             "ORDER BY market_id") == first
        # Simulate our own stale row (as if the exchange had said otherwise before):
        mid, status, winner, _ = next(row for row in first if row[1] == "resolved")
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("UPDATE resolutions SET winning_token_id = 'x', winning_outcome = 'wrong' "
                        "WHERE market_id = %s", (mid,))
        conn.close()
        res.step()
        res.writer.flush()
        assert res.last_cycle["corrected"] == 1 and res.last_cycle["written"] == 1
        assert query(pg_dsn, "SELECT status, winning_token_id FROM resolutions WHERE market_id = %s",
                     (mid,)) == [(status, winner)]
    finally:
        for w in (markets, res):
            w.shutdown()


def test_resolutions_split_a_request_gamma_refuses_for_its_url(tmp_path, pg_dsn, quiet_sim):
    """A 414 (URL too long: ids go in the query) on the first request: its halves are asked and
    every closed market still gets its verdict in that cycle."""
    from workers.markets import MarketsCollector
    from workers.resolutions import ResolutionsCollector

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets")
    res = _collector(ResolutionsCollector, quiet_sim, pg_dsn, tmp_path, "resolutions", batch=4)
    for w in (markets, res):
        w.init_process()
    try:
        markets.step()
        quiet_sim.faults(surface="gamma", kind="5xx", status=414, count=1, path="/gamma/markets")
        res.step()
        cycle = res.last_cycle
        assert cycle["split"] == 1 and cycle["failed_batches"] == cycle["rejected"] == 0, cycle
        assert cycle["checked"] == 4 and cycle["written"] == 4 and cycle["unanswered"] == 0, cycle
        assert cycle["requests"] == 3 and res.counters["last_success"] is not None
    finally:
        for w in (markets, res):
            w.shutdown()


def test_database_down_is_counted_not_a_crash(tmp_path, pg_dsn, quiet_sim):
    """No database: a cycle that needs a query fails cleanly (counted); a known followed set keeps being used."""
    import socket

    from workers.markets import MarketsCollector
    from workers.prices import PricesCollector
    from workers.storage import Database

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"host=127.0.0.1 port={s.getsockname()[1]} dbname=x user=u connect_timeout=2"
    migrate(pg_dsn)
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets")
    prices = _collector(PricesCollector, quiet_sim, pg_dsn, tmp_path, "prices")
    # Without a lease: a leased collector that never reached the database stands by
    # instead of polling (tests/test_lease.py); this is about the query failing.
    orphan = _collector(PricesCollector, quiet_sim, dead, tmp_path / "orphan", "prices", lease="no")
    for w in (markets, prices, orphan):
        w.init_process()
    try:
        markets.step()
        prices.step()
        assert prices.last_cycle["rows"] == 24
        prices.db = Database(dead)  # the followed-set query now fails; the last set read is used
        prices.step()
        assert prices.last_cycle["rows"] == 24 and prices.counters["errors"] == 0
        orphan.step()  # never saw a followed set: nothing to poll, the failure is counted
        assert orphan.last_cycle["database_error"] == "OperationalError"
        assert orphan.counters["errors"] == 1 and "database" in orphan.counters["last_error"]
        prices.writer.flush()
        assert query(pg_dsn, "SELECT count(DISTINCT ts), count(*) FROM price_snapshots")[0] == (2, 48)
    finally:
        for w in (markets, prices, orphan):
            w.shutdown()


def test_followed_set_replace_is_exact_keeps_since_and_shards(pg_dsn):
    from workers.storage import Database
    from workers.storage.followed import followed_tokens, replace_followed, shard_of

    migrate(pg_dsn)
    db = Database(pg_dsn)
    t0 = datetime(2026, 11, 28, 12, tzinfo=UTC)
    big = "9" * 78
    rows = [{"token_id": t, "market_id": "m1", "condition_id": "0x1", "outcome": o}
            for t, o in ((big, "Yes"), ("12", "No"))]
    try:
        assert replace_followed(db, rows, t0) == (2, 0)
        later = t0 + timedelta(hours=1)
        rows2 = [rows[0], {"token_id": "13", "market_id": "m2", "condition_id": "0x2", "outcome": "Yes"}]
        assert replace_followed(db, rows2, later) == (1, 1)
        assert dict(query(pg_dsn, "SELECT token_id, since FROM followed_tokens")) == {big: t0, "13": later}
        assert replace_followed(db, rows2, later) == (0, 0)
        everything = followed_tokens(db)
        assert [t.token_id for t in everything] == sorted([big, "13"])
        assert everything[0]._asdict() == {"token_id": "13", "market_id": "m2", "condition_id": "0x2",
                                           "outcome": "Yes"}
        parts = [followed_tokens(db, shard=i, shards=3) for i in range(3)]
        assert sorted(t.token_id for part in parts for t in part) == sorted([big, "13"])
        assert all(shard_of(t.token_id, 3) == i for i, part in enumerate(parts) for t in part)
        assert shard_of(big, 3) == int(big) % 3 and shard_of("13", 1) == 0
        assert replace_followed(db, [], later) == (0, 2)
        assert followed_tokens(db) == []
    finally:
        db.close()


@pytest.mark.parametrize("cls_path,key,value", [
    ("workers.prices:PricesCollector", "batch", "0"),
    ("workers.orderbooks:OrderbooksCollector", "skip_unchanged", "maybe"),
    ("workers.markets:MarketsCollector", "page_size", "0"),
    ("workers.resolutions:ResolutionsCollector", "deadline", "0"),
    ("workers.resolutions:ResolutionsCollector", "interval", "soon"),
    ("workers.markets:MarketsCollector", "no_such_option", "1"),
])
def test_bad_options_fail_at_construction_naming_the_key(cls_path, key, value):
    import importlib

    from workers.base import OptionError

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(OptionError) as info:
        cls(name="x", **{key: value})
    assert info.value.key == key
    ok = cls(name="x", interval="2")  # defaults are valid; nothing is opened before the fork
    assert ok.client is None and ok.writer is None and ok.db is None


def test_unsettled_markets_newest_closures_first_and_a_rotation_over_the_rest(pg_dsn):
    from workers.storage import Database
    from workers.storage.followed import unsettled_markets

    migrate(pg_dsn)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        for i in range(10):  # m0..m9 closed, m9 most recently; m10 open
            cur.execute("INSERT INTO markets (market_id, condition_id, closed, closed_time) VALUES (%s, %s, %s, %s)",
                        (f"m{i}", f"0x{i}", True, t0 + timedelta(hours=i)))
        cur.execute("INSERT INTO markets (market_id, condition_id, closed) VALUES ('m10', '0xa', false)")
        # settled long ago (not rechecked), settled recently (rechecked), disputed (not final)
        cur.execute("INSERT INTO resolutions (market_id, status, first_seen_at) VALUES "
                    "('m1', 'resolved', %s), ('m2', 'void', %s), ('m3', 'disputed', %s)",
                    (t0, t0 + timedelta(days=20), t0))
    conn.close()
    db = Database(pg_dsn)
    recheck = t0 + timedelta(days=10)
    try:
        recent, rotation = unsettled_markets(db, "", 4, recheck)
        assert recent == ["m9", "m8"]  # newest closures first
        assert rotation == ["m0", "m2"]  # by market_id; m1 is settled for good
        _, rotation = unsettled_markets(db, rotation[-1], 4, recheck)
        assert rotation == ["m3", "m4"]
        _, rotation = unsettled_markets(db, "m8", 4, recheck)
        assert rotation == ["m9"]  # the last page: the caller wraps around
        everything = set(unsettled_markets(db, "", 100, recheck)[1])
        assert everything == {f"m{i}" for i in range(10)} - {"m1"}
    finally:
        db.close()


def test_markets_full_scan_falls_back_to_offset_paging_when_keyset_is_gone(tmp_path, pg_dsn, quiet_sim, caplog):
    """/markets/keyset answering 404 (an exchange without it, or a gateway that lost the
    route): the full scan switches to offset paging over /markets ordered by id and still
    stores every market, open and closed, once."""
    from workers.markets import MarketsCollector

    migrate(pg_dsn)
    expected = {m["id"] for m in gamma_all(quiet_sim, False) + gamma_all(quiet_sim, True)}
    quiet_sim.faults(surface="gamma", kind="5xx", status=404, path="/gamma/markets/keyset")
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets", page_size=5, full_scan_pages=2)
    markets.init_process()
    try:
        with caplog.at_level("WARNING", logger="workers.markets"):
            for _ in range(20):
                markets.step()
                if markets._scans_done:
                    break
        assert markets._scans_done == 1
        assert any("keyset paging unavailable" in r.getMessage() for r in caplog.records)
        fault = quiet_sim.get("/_sim/faults")
        fired = [f["fired"] for f in (fault if isinstance(fault, list) else fault.get("faults", []))]
        assert fired == [1]  # asked once: the rest of this scan (both phases) stays on offset paging
        stored = {r[0] for r in query(pg_dsn, "SELECT market_id FROM markets")}
        assert stored == expected
        assert query(pg_dsn, "SELECT count(*) FROM markets")[0][0] == len(expected)
    finally:
        markets.shutdown()


@pytest.fixture
def strict_sim(polysim):
    """quiet_sim's exchange, refusing (400) a batch request that names more than 5 ids."""
    return polysim(markets=12, seed=9, trade_rate=0.0, book_rate=0.0, closed_markets=4, max_batch_ids=5)


def _size_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is too large for the exchange" in r.getMessage()]


def test_orderbooks_split_a_batch_the_exchange_refuses_and_keep_the_size_that_worked(tmp_path, pg_dsn, strict_sim,
                                                                                    caplog):
    from workers.markets import MarketsCollector
    from workers.orderbooks import OrderbooksCollector

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, strict_sim, pg_dsn, tmp_path, "markets")
    books = _collector(OrderbooksCollector, strict_sim, pg_dsn, tmp_path, "orderbooks", batch=24)
    for w in (markets, books):
        w.init_process()
    try:
        markets.step()
        with caplog.at_level(logging.WARNING, logger="workers.polling"):
            books.step()
        cycle = books.last_cycle
        # 24 refused -> 12 refused -> 6 refused -> 3 and 3 answered: the rest of the cycle asks 3 at a time
        assert cycle["received"] == 24 and cycle["written"] == 24 and cycle["coverage"] == 1.0, cycle
        assert cycle["split"] == 3 and cycle["rejected"] == 0 and cycle["failed_batches"] == 0, cycle
        assert cycle["batches"] == 3 + 24 // 3 and cycle["requests"] == cycle["batches"], cycle
        assert books.counters["errors"] == 0 and books.counters["last_success"] is not None
        assert query(pg_dsn, "SELECT count(DISTINCT token_id) FROM orderbook_snapshots")[0][0] == 24
        warnings = _size_warnings(caplog)
        assert len(warnings) == 1 and "batch = 24 is too large" in warnings[0], warnings
        assert "batches of 3 ids worked" in warnings[0] and "HTTP 400" in warnings[0], warnings
    finally:
        for w in (markets, books):
            w.shutdown()


def test_prices_split_a_batch_the_exchange_refuses(tmp_path, pg_dsn, strict_sim, caplog):
    from workers.markets import MarketsCollector
    from workers.prices import PricesCollector

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, strict_sim, pg_dsn, tmp_path, "markets")
    prices = _collector(PricesCollector, strict_sim, pg_dsn, tmp_path, "prices", batch=24)
    for w in (markets, prices):
        w.init_process()
    try:
        markets.step()
        with caplog.at_level(logging.WARNING, logger="workers.polling"):
            prices.step()
        cycle = prices.last_cycle
        # POST /prices names each token twice (BUY, SELL): 24 -> 12 -> 6 -> 3 refused, then 2 and 1 answered
        assert cycle["rows"] == 24 and cycle["missing"] == 0 and cycle["malformed"] == 0, cycle
        assert cycle["split"] == 4 and cycle["rejected"] == 0 and cycle["failed_batches"] == 0, cycle
        # a refused chunk cost its POST /prices; an answered one its three requests
        done = cycle["batches"] - cycle["split"]
        assert cycle["requests"] == cycle["split"] + 3 * done, cycle
        assert done == 2 + 1 + (24 - 3) // 2, cycle  # the rest of the cycle asks 2 at a time
        assert prices.counters["errors"] == 0 and prices.counters["last_success"] is not None
        assert query(pg_dsn, "SELECT count(DISTINCT token_id), count(DISTINCT ts) FROM price_snapshots")[0] == (24, 1)
        warnings = _size_warnings(caplog)
        assert len(warnings) == 1 and "batch = 24 is too large" in warnings[0], warnings
        assert "batches of 2 ids worked" in warnings[0], warnings
    finally:
        for w in (markets, prices):
            w.shutdown()


def test_an_exchange_refusing_every_batch_costs_a_bounded_number_of_requests(tmp_path, pg_dsn, quiet_sim, caplog):
    import math

    from workers.markets import MarketsCollector
    from workers.orderbooks import OrderbooksCollector
    from workers.polling import MAX_REJECTED_IDS

    migrate(pg_dsn)
    markets = _collector(MarketsCollector, quiet_sim, pg_dsn, tmp_path, "markets")
    books = _collector(OrderbooksCollector, quiet_sim, pg_dsn, tmp_path, "orderbooks", batch=8)
    for w in (markets, books):
        w.init_process()
    try:
        markets.step()
        quiet_sim.faults(surface="clob", kind="5xx", status=400, path="/clob/books")  # every POST /books: 400
        with caplog.at_level(logging.WARNING, logger="workers.polling"):
            books.step()
        cycle = books.last_cycle
        # 3 chunks of 8; splitting stops after MAX_REJECTED_IDS single ids: one path down to them, not ~2n
        bound = math.ceil(24 / 8) + 2 * (math.ceil(math.log2(8)) + 1)
        assert cycle["requests"] <= bound < 2 * 24, cycle
        assert cycle["rejected"] == MAX_REJECTED_IDS and cycle["failed_batches"] >= 3 - 1, cycle
        assert cycle["received"] == 0 and cycle["written"] == 0 and cycle["batches"] == cycle["requests"], cycle
        assert books.counters["last_success"] is None  # nothing answered: not a success
        assert books.counters["errors"] == cycle["rejected"] + cycle["failed_batches"]
        assert "HTTP 400" in books.counters["last_error"]
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1 and "does the exchange refuse every batch" in refused[0], refused
        assert not _size_warnings(caplog)  # no split had both halves answered: the size was never blamed
        quiet_sim.faults(clear=True)
        books.step()
        cycle = books.last_cycle
        assert cycle["received"] == 24 and cycle["split"] == cycle["rejected"] == cycle["failed_batches"] == 0
        assert cycle["requests"] == cycle["batches"] == 3 and books.counters["last_success"] is not None
    finally:
        for w in (markets, books):
            w.shutdown()
