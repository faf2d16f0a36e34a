"""No trade owed forever: every open gap is recovered by the shard that owns its market.

Real forked TradesCollectors against polysim and PostgreSQL, with polysim's ledger as
ground truth. Each scenario leaves gaps open on purpose (a long `backfill_delay`, then a
stop), changes what a new process would see (the followed set, the shard count, the
Data API's answers), and checks that a later run recovers every gap and stores each
trade exactly once: the tokens still followed up to now, the tokens that left the
followed set up to the moment the run that followed them stopped. (Markets that close
and resolve while their gaps are open, dropped by the real markets collector:
tests/faults/test_restart_debt.py.)
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from tests.test_trades import (StatusPipe, assert_exactly_once, db_counts, follow, key, live_trades, query, start,
                               stop, unfollow, wait_for)
from workers.storage import gaps as store
from workers.storage import migrate
from workers.storage.db import Database
from workers.trades import shard_of

HOLD = dict(backfill_delay=60)  # gaps are closed and recorded, not yet backfilled
RECOVER = dict(backfill_delay=1)
FAST_STATUS = 0.5  # seconds between status messages (5 under the supervisor)


@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


def open_gaps(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM feed_gaps WHERE recovered_at IS NULL AND unrecoverable IS NULL")[0][0]


def markets_of(tokens: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for token, condition in sorted(tokens.items()):
        out.setdefault(condition, []).append(token)
    return out


def run_then_stop(sim, dsn, tmp_path, shards: int = 1, **options) -> int:
    """Run `shards` listeners until each has stored live trades and recorded its gaps, then
    SIGTERM them all; returns the stop time (epoch ms)."""
    before = live_trades(dsn)
    pids = [start(sim, dsn, tmp_path, shard=i, shards=shards, **options) for i in range(shards)]
    try:
        wait_for(lambda: live_trades(dsn) > before + 30, 20, what="live trades")
        time.sleep(1.0)  # every shard's sockets live and its gap rows flushed
    finally:
        codes = [stop(pid) for pid in pids]
    assert codes == [0] * shards
    return int(time.time() * 1000)


def exactly_once_until(sim, dsn: str, tokens, until_ms: int, timeout: float = 20.0) -> int:
    """Every ledger trade of tokens published by until_ms is stored once; none stored twice."""
    ledger = [t for t in sim.ledger() if t["asset_id"] in tokens]
    expected = Counter(key(t["asset_id"], t["transaction_hash"], t["price"], t["size"], t["side"])
                       for t in ledger if t["published_ms"] <= until_ms)
    published = Counter(key(t["asset_id"], t["transaction_hash"], t["price"], t["size"], t["side"]) for t in ledger)
    assert expected, "polysim published no trades for these tokens"
    state = {}

    def complete():
        got = db_counts(dsn, tokens)
        state["missing"], state["duplicated"] = expected - got, got - published
        return not state["missing"] and not state["duplicated"]

    try:
        wait_for(complete, timeout, 0.3, "every trade up to the stop exactly once")
    except AssertionError:
        raise AssertionError(f"missing={sum(state['missing'].values())} "
                             f"duplicated={sum(state['duplicated'].values())} of {sum(expected.values())}")
    return sum(expected.values())


def test_gaps_of_tokens_that_left_the_followed_set_are_recovered_by_the_next_run(polysim, db, tmp_path):
    """Stopped with gaps open; half the markets leave the followed set; started again
    later: the gaps of the unfollowed tokens are recovered all the same."""
    sim = polysim(markets=8, seed=41, trade_rate=40.0, multi_fill=0.5)
    tokens = follow(sim, db)
    status = StatusPipe()
    pid = start(sim, db, tmp_path, status_fd=status.w, status_every=FAST_STATUS, **HOLD)
    try:
        # What the process owes shows in its status: the start gaps, from `since` (an hour ago).
        counters = wait_for(lambda: (s := status.read()).get("gaps_open") == len(tokens) and s, 15,
                            what="status: the start gaps owed")
        assert 3500 < time.time() - counters["gaps_oldest_open_at"] < 3700
        assert counters["last_success"] > time.time() - 10  # the coverage moved: reported, not null
    finally:
        assert stop(pid) == 0
    stopped_at = int(time.time() * 1000)
    with Database(db) as handle:  # the stopped run's debt, as `collectord status` reads it
        owed, oldest = store.debt(handle)
    assert owed == len(tokens) and 3500 < time.time() - oldest.timestamp() < 3700
    markets = markets_of(tokens)
    gone = {t for c in sorted(markets)[:4] for t in markets[c]}
    unfollow(db, gone)
    time.sleep(1.5)  # trades while nothing runs
    status = StatusPipe()
    pid = start(sim, db, tmp_path, status_fd=status.w, status_every=FAST_STATUS, **RECOVER)
    try:
        wait_for(lambda: open_gaps(db) == 0, 20, what="every gap recovered")
        assert exactly_once_until(sim, db, gone, stopped_at) > 0
        assert_exactly_once(sim, db, set(tokens) - gone)
        counters = wait_for(lambda: (s := status.read()).get("gaps_open") == 0 and s.get("gaps_recovered", 0)
                            >= len(tokens) and s, 15, what="status: all recovered, none owed")
        assert counters["gaps_adopted"] >= len(tokens) and counters["gaps_oldest_open_at"] is None
        assert counters["gaps_unrecoverable"] == 0 and counters["last_success"] > stopped_at / 1000
    finally:
        assert stop(pid) == 0


def test_a_token_unfollowed_while_its_gap_is_open_then_killed(polysim, db, tmp_path):
    """A socket drop opens a gap, the token leaves the followed set, the listener is
    killed before the backfill: the next process (which no longer follows it) recovers it."""
    sim = polysim(markets=6, seed=43, trade_rate=40.0, multi_fill=0.5)
    tokens = follow(sim, db)
    pid = start(sim, db, tmp_path, **HOLD)
    wait_for(lambda: live_trades(db) > 30, 20, what="live trades")
    sim.faults(surface="ws", kind="drop")
    wait_for(lambda: query(db, "SELECT count(*) FROM feed_gaps WHERE reason = 'disconnect'")[0][0] > 0, 10,
             what="a disconnect gap")
    # The market of the token that traded most (every token's socket dropped): one with
    # trades published while followed, so the check below has something to check.
    gone = {t for t, in query(db, "SELECT g.token_id FROM feed_gaps g JOIN trades t USING (token_id)"
                                  " WHERE g.reason = 'disconnect' AND t.source = 'ws'"
                                  " GROUP BY g.token_id ORDER BY count(*) DESC LIMIT 1")}
    gone = {t for t, c in tokens.items() if c in {tokens[g] for g in gone}}  # the whole market
    unfollow(db, gone)
    time.sleep(1.5)  # the listener's refresh closes the gap; the backfill waits (60 s)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    killed_at = int(time.time() * 1000)
    pid = start(sim, db, tmp_path, **RECOVER)
    try:
        wait_for(lambda: open_gaps(db) == 0, 20, what="every gap recovered")
        # Unfollowed 1.5 s before the kill: what it published while followed is stored.
        exactly_once_until(sim, db, gone, killed_at - 1500)
        assert_exactly_once(sim, db, set(tokens) - gone)
    finally:
        assert stop(pid) == 0


def test_shard_count_changes_between_runs_with_gaps_open(polysim, db, tmp_path):
    """1 shard, then 3, then 2, each run stopped with its gaps open, a market leaving the
    followed set between runs: the last run's shards recover everything between them."""
    sim = polysim(markets=9, seed=47, trade_rate=40.0, multi_fill=0.5)
    tokens = follow(sim, db)
    markets = sorted(markets_of(tokens).items())
    first = run_then_stop(sim, db, tmp_path, shards=1, **HOLD)
    gone_first = set(markets[0][1])
    unfollow(db, gone_first)
    second = run_then_stop(sim, db, tmp_path, shards=3, **HOLD)
    gone_second = set(markets[1][1])
    unfollow(db, gone_second)
    assert open_gaps(db) > len(tokens)  # start gaps of run 1, restart gaps of run 2
    # Run 2's shards took on run 1's gaps (the last writer names its shard) and recorded
    # the debt of the market run 1 followed and run 2 no longer did.
    shards = {s for s, in query(db, "SELECT DISTINCT shard FROM feed_gaps")}
    reasons = {r for r, in query(db, "SELECT DISTINCT reason FROM feed_gaps")}
    assert shards == {"0/3", "1/3", "2/3"} and reasons == {"start", "restart", "unfollowed"}, (shards, reasons)
    pipes = [StatusPipe(), StatusPipe()]
    pids = [start(sim, db, tmp_path, shard=i, shards=2, status_fd=pipes[i].w, status_every=FAST_STATUS, **RECOVER)
            for i in range(2)]
    try:
        wait_for(lambda: open_gaps(db) == 0, 25, what="every gap recovered by the two shards")
        exactly_once_until(sim, db, gone_first, first)
        exactly_once_until(sim, db, gone_second, second)
        assert_exactly_once(sim, db, set(tokens) - gone_first - gone_second)
        # Each gap was recovered by the one shard its market hashes to, whoever opened it.
        for token, condition, shard in query(db, "SELECT token_id, condition_id, shard FROM feed_gaps"):
            assert condition == tokens[token] and shard == f"{shard_of(condition, token, 2)}/2", (token, shard)
        adopted = [wait_for(lambda p=p: p.read().get("gaps_adopted"), 10, what="status") for p in pipes]
        assert all(n > 0 for n in adopted)
    finally:
        assert [stop(pid) for pid in pids] == [0, 0]


def test_a_market_the_data_api_refuses_ends_unrecoverable_and_a_retry_later_is_safe(polysim, db, tmp_path):
    """The Data API answers 404 for good: the gaps end with the reason, counted, never retried
    in a loop. An operator who clears the reason later (the Data API is back) gets them
    recovered, each trade once."""
    sim = polysim(markets=1, seed=59, trade_rate=40.0, multi_fill=0.5)
    tokens = follow(sim, db)
    sim.faults(surface="data", kind="5xx", status=404, path="/data/trades")
    status = StatusPipe()
    # One market a request: no split of a refused job first (that path: test_trades_backfill).
    pid = start(sim, db, tmp_path, status_fd=status.w, status_every=FAST_STATUS, backfill_markets=1, **RECOVER)
    try:
        wait_for(lambda: query(db, "SELECT count(*) FROM feed_gaps WHERE unrecoverable IS NOT NULL")[0][0]
                 == len(tokens), 25, what="every start gap unrecoverable")
        reasons = [r for r, in query(db, "SELECT unrecoverable FROM feed_gaps")]
        assert all("refused market" in r and "404" in r for r in reasons) and open_gaps(db) == 0, reasons
        counters = wait_for(lambda: (s := status.read()).get("gaps_unrecoverable") == len(tokens) and s, 15,
                            what="status: unrecoverable counted")
        assert counters["gaps_open"] == 0
        requests = counters["backfill_requests"]
        time.sleep(1.5)
        assert status.read()["backfill_requests"] == requests  # given up: no more requests
        sim.faults(clear=True)
        query(db, "UPDATE feed_gaps SET unrecoverable = NULL RETURNING 1")  # the operator retries them
        wait_for(lambda: query(db, "SELECT count(*) FROM feed_gaps WHERE recovered_at IS NOT NULL")[0][0]
                 == len(tokens), 20, what="the retried gaps recovered")
        assert_exactly_once(sim, db, set(tokens))
    finally:
        assert stop(pid) == 0


def test_a_gap_adopted_while_its_old_owner_is_still_closing_it(polysim, db, tmp_path):
    """A reload to another shard count overlaps old and new processes. A socket drop opens
    gaps in both; the new ones (2 shards) reconnect at once, adopt the old one's gaps while
    they are still open and recover them; the old one (1 shard, slow to reconnect, its
    backfill far off) closes them seconds later. The later end wins and the gap is owed
    again until a fetch of the wider window lands."""
    sim = polysim(markets=6, seed=67, trade_rate=40.0, multi_fill=0.5)
    tokens = follow(sim, db)
    old = start(sim, db, tmp_path, backoff_initial=2.5, backoff_max=2.5, **HOLD)
    new = []
    try:
        wait_for(lambda: live_trades(db) > 20, 20, what="live trades")
        # Their own data_dir: a spool directory belongs to one process of a name (trades.0).
        new = [start(sim, db, tmp_path / "new", shard=i, shards=2, **RECOVER) for i in range(2)]
        wait_for(lambda: query(db, "SELECT count(DISTINCT shard) FROM feed_coverage WHERE shard LIKE '%/2'")[0][0]
                 == 2, 15, what="both new shards live")
        sim.faults(surface="ws", kind="drop")
        time.sleep(4.5)  # the new shards adopt and recover; the old one reconnects after 1.25-2.5 s
        assert stop(old) == 0
        old = None
        wait_for(lambda: open_gaps(db) == 0, 20, what="every gap recovered")
        assert_exactly_once(sim, db, set(tokens))
        # The old process's late ends won, and each was fetched after it was known.
        late = query(db, "SELECT count(*) FROM feed_gaps WHERE reason = 'disconnect'"
                         " AND ended_at - started_at > interval '1 s'")[0][0]
        assert late > 0 and query(db, "SELECT count(*) FROM feed_gaps WHERE recovered_at < ended_at")[0][0] == 0
    finally:
        if old is not None:
            stop(old)
        assert [stop(pid) for pid in new] == [0] * len(new)
