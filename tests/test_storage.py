"""Storage against the real PostgreSQL: migrations, every table's upsert, exactness."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg2
import pytest

from workers.storage import TABLES, Writer, migrate
from workers.storage.migrate import discover
from workers.storage.spool import Spool
from tests.conftest import query as fetch

TOKEN = "71321045679252212594626385532706912750332728571942532289631379312455583992563"  # 77 digits
TOKEN78 = "1" + "0" * 76 + "7"  # 78 digits: beyond int64 and float64
assert len(TOKEN78) == 78
T0 = datetime(2026, 5, 25, 22, 43, 31, 123000, tzinfo=timezone.utc)




@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


@pytest.fixture
def writer(db, tmp_path):
    w = Writer(db, tmp_path / "spool", name="test", max_rows=100000, max_age=60).open()
    yield w
    w.close()


# -- migrations ---------------------------------------------------------------------
def test_migrate_from_empty_then_rerun_is_noop(pg_dsn):
    versions = [m.version for m in discover()]
    assert versions[0] == 1 and versions == sorted(versions)
    assert migrate(pg_dsn) == versions
    assert migrate(pg_dsn) == []
    rows = fetch(pg_dsn, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert [v for v, _ in rows] == versions
    assert rows[0][1] == "0001_initial"
    tables = {r[0] for r in fetch(pg_dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
    for name in ("markets", "tokens", "followed_tokens", "price_snapshots", "orderbook_snapshots", "trades",
                 "resolutions", "feed_gaps", "schema_migrations"):
        assert name in tables


def test_migrate_race_between_two_processes(pg_dsn):
    """Two forked processes migrate the same empty schema at once: both succeed, each version once."""
    versions = [m.version for m in discover()]
    pipes = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(r)
                done = migrate(pg_dsn)
                os.write(w, (",".join(map(str, done)) + "\n").encode())
            except BaseException as err:  # report, never raise in a forked child
                os.write(w, f"ERR {err!r}\n".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        pipes.append((pid, r))
    results = []
    for pid, r in pipes:
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            out = f.read().strip()
        assert os.waitstatus_to_exitcode(status) == 0, out
        results.append([int(v) for v in out.split(",") if v])
    applied_now = sorted(results[0] + results[1])
    assert applied_now == versions  # every version applied by exactly one of them
    assert [r[0] for r in fetch(pg_dsn, "SELECT version FROM schema_migrations ORDER BY 1")] == versions


PG_TYPES = {"text": "text", "numeric": "numeric", "int": "integer", "boolean": "boolean",
            "timestamptz": "timestamp with time zone", "jsonb": "jsonb", '"char"': '"char"', "bytea": "bytea",
            "numeric[]": "ARRAY", "date": "date"}


def test_writer_tables_match_the_migrated_schema(db):
    cols = fetch(db, "SELECT table_name, column_name, data_type FROM information_schema.columns"
                     " WHERE table_schema = current_schema()")
    have = {(t, c): d for t, c, d in cols}
    for table in TABLES.values():
        for name, kind in table.columns:
            assert have.get((table.name, name)) == PG_TYPES[kind], (table.name, name)


def test_ids_are_text_and_amounts_numeric(db):
    have = {(t, c): d for t, c, d in fetch(db, "SELECT table_name, column_name, data_type FROM information_schema.columns"
                                                " WHERE table_schema = current_schema()")}
    for (t, c), d in have.items():
        if c in ("market_id", "condition_id", "token_id", "tx_hash", "winning_token_id"):
            assert d == "text", (t, c)
        if c in ("price", "size", "best_bid", "best_ask", "mid", "last_trade_price", "volume_24h"):
            assert d == "numeric", (t, c)


# -- exactness -------------------------------------------------------------------------
def test_numeric_and_78_digit_ids_round_trip_exactly(writer, db):
    prices = ["0.982", "0.0001", "0.999999", "123456789012345678901234567890.123456789"]
    writer.add("trades", [
        {"token_id": TOKEN78, "ts": T0 + timedelta(milliseconds=i), "price": p, "size": Decimal("219.217767"),
         "side": "BUY", "tx_hash": f"0x{i:064x}", "source": "ws", "received_at": T0}
        for i, p in enumerate(prices)
    ])
    writer.add("tokens", [{"token_id": TOKEN78, "market_id": "559651", "outcome": "Yes", "outcome_index": 0}])
    writer.flush()
    rows = fetch(db, "SELECT token_id, price::text, size::text, ts FROM trades ORDER BY ts")
    assert [r[0] for r in rows] == [TOKEN78] * 4
    assert [r[1] for r in rows] == prices
    assert {r[2] for r in rows} == {"219.217767"}
    assert rows[0][3] == T0  # millisecond time kept
    assert fetch(db, "SELECT token_id FROM tokens") == [(TOKEN78,)]


def test_bad_values_fail_at_add_and_buffer_nothing(writer):
    good = {"token_id": TOKEN, "ts": T0, "price": "0.5", "size": "1", "side": "BUY", "source": "ws"}
    with pytest.raises(ValueError, match="unknown column"):
        writer.add("trades", [good, {**good, "bogus": 1}])
    with pytest.raises(ValueError, match="token_id"):
        writer.add("trades", [{**good, "token_id": 1.5e77}])  # a float id would lose digits
    with pytest.raises(ValueError, match="naive"):
        writer.add("trades", [{**good, "ts": datetime(2026, 1, 1)}])
    with pytest.raises(KeyError):
        writer.add("nope", [good])
    assert writer.stats()["buffered"] == 0


# -- trades key -----------------------------------------------------------------------------
def trade(**kw):
    row = {"token_id": TOKEN, "condition_id": "0xc0", "ts": T0, "price": "0.48", "size": "10", "side": "BUY",
           "tx_hash": "0xaa", "ordinal": 0, "source": "ws", "received_at": T0}
    row.update(kw)
    return row


def test_live_trade_and_backfilled_twin_land_once(writer, db):
    live = [trade(), trade(ordinal=1), trade(price="0.49")]  # two identical fills of one tx: ordinals 0 and 1
    writer.add("trades", live)
    writer.flush()
    # Backfill: second-resolution ts, other decimal spellings of the same numbers.
    backfill = [
        trade(ts=T0.replace(microsecond=0), price="0.480", size="10.000000", source="backfill", received_at=None),
        trade(ts=T0.replace(microsecond=0), price="0.48", size="10.0", ordinal=1, source="backfill"),
        trade(ts=T0.replace(microsecond=0), price="0.490", size="10", source="backfill"),
        trade(ts=T0.replace(microsecond=0), price="0.48", size="10", ordinal=2, source="backfill"),  # a third fill: new
    ]
    writer.add("trades", backfill)
    writer.flush()
    rows = fetch(db, "SELECT price, size, ordinal, source FROM trades ORDER BY ordinal, price")
    assert rows == [(Decimal("0.48"), Decimal("10"), 0, "ws"), (Decimal("0.49"), Decimal("10"), 0, "ws"),
                    (Decimal("0.48"), Decimal("10"), 1, "ws"), (Decimal("0.48"), Decimal("10"), 2, "backfill")]


def test_trade_without_tx_hash_keys_on_ms_timestamp(writer, db):
    a = trade(tx_hash=None)
    b = trade(tx_hash=None, ts=T0 + timedelta(milliseconds=1))
    writer.add("trades", [a, b, a])
    writer.flush()
    writer.add("trades", [a, b])
    writer.flush()
    assert fetch(db, "SELECT count(*) FROM trades") == [(2,)]



def test_direct_copy_tables_are_safe_to_copy_into():
    """A table the Writer COPYs straight into must be DO NOTHING, and every column the staging
    path would default must be NOT NULL, so that a NULL fails the COPY and takes the fallback."""
    direct = [t for t in TABLES.values() if t.direct]
    assert {t.name for t in direct} >= {"trades", "orderbook_snapshots", "price_snapshots"}
    for table in direct:
        assert table.conflict == "ON CONFLICT DO NOTHING", table.name
        # the table as the latest migration that (re)creates it defines it (0023 partitions some)
        sql = [m.sql for m in discover() if f"CREATE TABLE {table.name} (" in m.sql][-1]
        body = sql.split(f"CREATE TABLE {table.name} (")[1].split(");")[0]
        for column in table.select:
            line = next(x for x in body.splitlines() if x.strip().startswith(column + " "))
            assert "NOT NULL" in line, (table.name, line)


def test_direct_copy_falls_back_to_staging_and_comes_back(db, tmp_path):
    """New rows go straight in; a batch meeting stored rows or a NULL ordinal takes the staging
    path (stored once, defaulted); the next clean batch goes straight in again; the same under close()."""
    w = Writer(db, tmp_path / "spool", name="direct", background=False, max_rows=10**6, max_age=60).open()
    ts = [T0 + timedelta(seconds=i) for i in range(10)]
    try:
        w.add("trades", [trade(tx_hash=f"0x{i:02x}", ts=ts[i]) for i in range(3)])
        w.flush()
        assert w._direct.get("trades", True) is True
        w.add("trades", [trade(tx_hash=f"0x{i:02x}", ts=ts[i]) for i in range(1, 4)])  # two are stored already
        w.flush()
        assert w._direct["trades"] is False
        w.add("trades", [trade(tx_hash=f"0x{i:02x}", ts=ts[i]) for i in range(4, 6)])
        w.flush()
        assert w._direct["trades"] is True
        w.add("trades", [trade(tx_hash="0x06", ordinal=None)])  # NOT NULL: the staging path defaults it
        w.flush()
        w.add("trades", [trade(tx_hash="0x07"), trade(tx_hash="0x05", ts=ts[5])])  # under close(): a savepoint
        st = w.stats()
    finally:
        w.close()
    assert fetch(db, "SELECT tx_hash, ordinal FROM trades ORDER BY tx_hash") == [
        (f"0x{i:02x}", 0) for i in range(8)]
    assert st["rows_rejected"] == 0 and st["rows_spooled"] == 0


def test_batches_waiting_behind_a_slow_delivery_go_as_one(db, tmp_path):
    """Under load the flusher takes the waiting batches along (fewer commits); DO UPDATE rows of
    different batches still apply in order (a later partial token row does not erase the outcome)."""
    w = Writer(db, tmp_path / "spool", name="join", max_rows=10, max_age=60, max_pending=8).open()
    try:
        with w._io:  # the database is "slow": nothing is delivered while this is held
            for b in range(4):
                w.add("tokens", [{"token_id": TOKEN, "market_id": "m1", "outcome": "Yes" if b == 0 else None}])
                w.add("trades", [trade(tx_hash=f"0x{b:02x}", ordinal=i) for i in range(9)])  # 10 rows: handed over
        w.flush()
        st = w.stats()
    finally:
        w.close()
    assert fetch(db, "SELECT count(*) FROM trades") == [(36,)]
    assert fetch(db, "SELECT outcome FROM tokens") == [("Yes",)]
    assert st["batches"] <= 2 and st["rows_rejected"] == 0 and st["rows_spooled"] == 0, st

# -- every table: a replayed batch adds nothing ---------------------------------------------
def sample_rows():
    return {
        "markets": [{"market_id": "559651", "condition_id": "0xc1", "slug": "s", "question": "Q?", "active": True,
                     "closed": False, "end_date": "2026-06-01T09:00:00Z", "closed_time": "2026-05-25 22:43:31+00",
                     "volume_24h": "1234.5", "outcomes": ["Yes", "No"], "tags": [{"id": 1}],
                     "updated_at": T0, "raw": {"id": "559651", "volume": "1234.5"}}],
        "tokens": [{"token_id": TOKEN, "market_id": "559651", "condition_id": "0xc1", "outcome": "Yes", "outcome_index": 0},
                   {"token_id": TOKEN78, "market_id": "559651", "condition_id": "0xc1", "outcome": "No", "outcome_index": 1}],
        "followed_tokens": [{"token_id": TOKEN, "market_id": "559651", "condition_id": "0xc1", "outcome": "Yes"}],
        "price_snapshots": [{"token_id": TOKEN, "ts": T0 + timedelta(seconds=i), "best_bid": "0.47", "best_ask": "0.49",
                             "mid": "0.48", "last_trade_price": "0.48", "received_at": T0} for i in range(3)],
        "orderbook_snapshots": [{"token_id": TOKEN, "condition_id": "0xc1", "ts": T0, "hash": "h1", "best_bid": "0.47",
                                 "best_ask": "0.49", "spread": "0.02", "bid_depth": "15", "ask_depth": "0",
                                 "bid_levels": 2, "ask_levels": 0, "bids": [["0.47", "10"], ["0.46", "5"]], "asks": [],
                                 "received_at": T0},
                                {"token_id": TOKEN, "condition_id": "0xc1", "ts": T0, "hash": None,
                                 "bids": [], "asks": []}],
        "trades": [trade(ordinal=i) for i in range(3)],
        "resolutions": [{"market_id": "559651", "condition_id": "0xc1", "winning_token_id": TOKEN,
                         "winning_outcome": "Yes", "payouts": ["1", "0"], "status": "resolved", "resolved_at": T0}],
        "feed_gaps": [{"token_id": TOKEN, "started_at": T0, "ended_at": T0 + timedelta(seconds=5),
                       "reason": "disconnect", "shard": "trades.0"}],
        "feed_coverage": [{"token_id": TOKEN, "covered_until": T0, "shard": "0/1", "condition_id": "0xc1"},
                          {"token_id": TOKEN78, "covered_until": T0, "shard": "0/1"}],
        "book_events": [{"token_id": TOKEN, "ts": T0, "kind": "b", "hash": "\\x" + "ab" * 20,
                         "bids": "{{0.47,10},{0.46,5}}", "asks": "{}", "tick_size": "0.01", "received_at": T0},
                        {"token_id": TOKEN, "ts": T0, "kind": "p", "hash": "\\x" + "ab" * 20,
                         "bids": "{{0.46,0}}", "received_at": T0}],
    }


@pytest.mark.parametrize("method", ["copy", "values"])
def test_every_table_replayed_batch_adds_no_duplicates(db, tmp_path, method):
    samples = sample_rows()
    assert set(samples) == set(TABLES)
    w = Writer(db, tmp_path / "spool", name="replay", method=method, max_rows=10**6, max_age=60).open()
    try:
        for _ in range(3):  # the first batch, then the same batch replayed twice
            for table, rows in samples.items():
                w.add(table, rows)
            w.flush()
        st = w.stats()
    finally:
        w.close()
    assert st["rows_rejected"] == 0 and st["rows_spooled"] == 0
    for table, rows in samples.items():
        assert fetch(db, f"SELECT count(*) FROM {table}") == [(len(rows),)], table
    assert fetch(db, "SELECT bids, asks, hash FROM orderbook_snapshots ORDER BY hash DESC")[0] == (
        [["0.47", "10"], ["0.46", "5"]], [], "h1")
    assert fetch(db, "SELECT outcomes, closed_time FROM markets") == [
        (["Yes", "No"], datetime(2026, 5, 25, 22, 43, 31, tzinfo=timezone.utc))]


def test_markets_upsert_updates_on_change_and_keeps_first_seen(writer, db):
    base = {"market_id": "1", "question": "Q?", "updated_at": T0, "raw": {"v": 1}}
    writer.add("markets", [base])
    writer.flush()
    (first_seen, xmin1), = fetch(db, "SELECT first_seen_at, xmin::text FROM markets")
    writer.add("markets", [base])  # unchanged: the row is not rewritten
    writer.flush()
    assert fetch(db, "SELECT xmin::text FROM markets") == [(xmin1,)]
    writer.add("markets", [{**base, "question": "Q2?", "updated_at": T0 + timedelta(minutes=1), "raw": {"v": 2}}])
    writer.flush()
    assert fetch(db, "SELECT question, first_seen_at FROM markets") == [("Q2?", first_seen)]
    # An older payload (a late replay) never overwrites a newer one.
    writer.add("markets", [{**base, "question": "stale", "updated_at": T0 - timedelta(minutes=1), "raw": {"v": 0}}])
    writer.flush()
    assert fetch(db, "SELECT question FROM markets") == [("Q2?",)]
    # Several versions in one batch: the last wins, no "affect row a second time" error.
    writer.add("markets", [{**base, "question": f"v{i}", "updated_at": T0 + timedelta(hours=i), "raw": {"v": 10 + i}}
                           for i in range(1, 4)])
    writer.flush()
    assert fetch(db, "SELECT question FROM markets") == [("v3",)]
    assert writer.stats()["rows_rejected"] == 0


def test_resolution_correction_updates_the_row(writer, db):
    res = {"market_id": "9", "condition_id": "0xc9", "winning_token_id": "111", "winning_outcome": "Yes",
           "payouts": ["1", "0"], "status": "resolved", "resolved_at": T0}
    writer.add("resolutions", [res])
    writer.flush()
    (updated1, first1), = fetch(db, "SELECT updated_at, first_seen_at FROM resolutions")
    writer.add("resolutions", [res])
    writer.flush()
    assert fetch(db, "SELECT updated_at FROM resolutions") == [(updated1,)]
    writer.add("resolutions", [{**res, "winning_token_id": "222", "winning_outcome": "No", "payouts": ["0", "1"]}])
    writer.flush()
    (win, payouts, updated2, first2), = fetch(db, "SELECT winning_token_id, payouts, updated_at, first_seen_at FROM resolutions")
    assert (win, payouts, first2) == ("222", ["0", "1"], first1)
    assert updated2 > updated1


def test_feed_gap_rewrite_fills_in_recovery(writer, db):
    gap = {"token_id": TOKEN, "started_at": T0, "reason": "disconnect", "shard": "trades.0"}
    writer.add("feed_gaps", [gap])
    writer.flush()
    writer.add("feed_gaps", [{"token_id": TOKEN, "started_at": T0, "ended_at": T0 + timedelta(seconds=3),
                              "recovered_at": T0 + timedelta(seconds=9), "recovered_trades": 4}])
    writer.flush()
    assert fetch(db, "SELECT reason, shard, recovered_trades FROM feed_gaps") == [("disconnect", "trades.0", 4)]


def test_coverage_marks_move_forward_only_and_wake_a_released_mark(writer, db):
    def mark(seconds, **extra):
        return dict({"token_id": TOKEN, "covered_until": T0 + timedelta(seconds=seconds), "shard": "0/1"}, **extra)

    writer.add("feed_coverage", [mark(5, condition_id="0xc1")])
    writer.flush()
    writer.add("feed_coverage", [mark(3, shard="1/2")])  # an older mark: no change at all
    writer.flush()
    assert fetch(db, "SELECT covered_until - %s, shard, condition_id FROM feed_coverage", (T0,)) == [
        (timedelta(seconds=5), "0/1", "0xc1")]
    with psycopg2.connect(db) as conn, conn.cursor() as cur:
        cur.execute("UPDATE feed_coverage SET released_at = now()")
    conn.close()
    writer.add("feed_coverage", [mark(9), mark(7)])  # one batch: the last row of a key wins
    writer.flush()
    assert fetch(db, "SELECT covered_until - %s, released_at, condition_id FROM feed_coverage", (T0,)) == [
        (timedelta(seconds=7), None, "0xc1")]


def test_a_coverage_mark_is_never_durable_before_the_trades_it_vouches_for(db, tmp_path):
    """Marks are the last table of a batch; spooled (database down), trades and marks
    replay in the order they were handed over, in one transaction per record batch."""
    spool = tmp_path / "spool"
    down = Writer("host=127.0.0.1 port=1 dbname=nowhere", spool, name="cov", connect_timeout=1,
                  background=False).open()
    down.add("feed_coverage", [{"token_id": TOKEN, "covered_until": T0 + timedelta(seconds=1), "shard": "0/1"}])
    down.add("trades", [trade(ordinal=0)])
    down.flush()
    down.close()
    reader = Spool(spool / "cov")
    reader.open()
    try:
        assert [record.table for seg in reader.segments() for record, _ in reader.read(seg)] == [
            "trades", "feed_coverage"]
    finally:
        reader.close()
    up = Writer(db, spool, name="cov", background=False).open()
    up.close()
    assert fetch(db, "SELECT count(*) FROM trades") == [(1,)]
    assert fetch(db, "SELECT covered_until - %s FROM feed_coverage", (T0,)) == [(timedelta(seconds=1),)]


def test_feed_gap_recovery_counts_only_for_the_end_it_was_fetched_for(writer, db):
    """Two processes write one gap: an adopter recovers [T0, T0+3] while the old owner,
    still closing it, records the end T0+8. Whichever order they land in, the end only
    grows and the gap stays owed until a recovery of the wider window lands."""
    def gap(end, recovered=None, **extra):
        row = {"token_id": TOKEN, "started_at": T0, "ended_at": T0 + timedelta(seconds=end), "reason": "restart",
               "recovered_at": recovered and T0 + timedelta(seconds=recovered), "recovered_trades": recovered and 1}
        return dict(row, **extra)

    def state():
        return fetch(db, "SELECT ended_at - started_at, recovered_at IS NOT NULL, condition_id FROM feed_gaps")[0]

    for first, second in ((gap(3, 9), gap(8)), (gap(8), gap(3, 9))):
        with psycopg2.connect(db) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM feed_gaps")
        conn.close()
        for row in (first, second):
            writer.add("feed_gaps", [row])
            writer.flush()
        assert state() == (timedelta(seconds=8), False, None)
    writer.add("feed_gaps", [gap(8, 20, condition_id="0xc")])
    writer.flush()
    assert state() == (timedelta(seconds=8), True, "0xc")
    writer.add("feed_gaps", [gap(8)])  # a late copy of the close, after the recovery: no change
    writer.flush()
    assert state() == (timedelta(seconds=8), True, "0xc")


def test_migration_0021_gives_open_gaps_of_a_populated_table_their_market(pg_dsn, tmp_path):
    import shutil
    from workers.storage.migrate import migrations_dir

    for path in migrations_dir().glob("*.sql"):
        if int(path.name[:4]) < 21:
            shutil.copy(path, tmp_path / path.name)
    migrate(pg_dsn, directory=tmp_path)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO followed_tokens (token_id, condition_id) VALUES ('1', '0xa')")
        cur.execute("INSERT INTO tokens (token_id, condition_id) VALUES ('2', '0xb'), ('1', '0xz')")
        cur.execute("INSERT INTO feed_gaps (token_id, started_at, ended_at, recovered_at) VALUES"
                    " ('1', now(), now(), NULL), ('2', now(), NULL, NULL), ('3', now(), now(), NULL),"
                    " ('2', now() - interval '1 day', now(), now())")
    conn.close()
    assert 21 in migrate(pg_dsn)
    got = fetch(pg_dsn, "SELECT token_id, condition_id, unrecoverable, recovered_at IS NOT NULL FROM feed_gaps"
                        " ORDER BY token_id, started_at")
    assert got == [("1", "0xa", None, False), ("2", None, None, True), ("2", "0xb", None, False),
                   ("3", None, None, False)]


def test_tokens_partial_row_does_not_erase(writer, db):
    writer.add("tokens", [{"token_id": TOKEN, "market_id": "1", "condition_id": "0xc", "outcome": "Yes", "outcome_index": 0}])
    writer.flush()
    writer.add("tokens", [{"token_id": TOKEN, "market_id": "1"}])
    writer.flush()
    assert fetch(db, "SELECT outcome, outcome_index FROM tokens") == [("Yes", 0)]


def test_data_error_rows_are_quarantined_not_dropped(writer, db, tmp_path):
    rows = [trade(ordinal=0), trade(ordinal=1, price="not-a-number"), trade(ordinal=2, side="HOLD"), trade(ordinal=3)]
    writer.add("trades", rows)
    writer.flush()
    assert fetch(db, "SELECT ordinal FROM trades ORDER BY 1") == [(0,), (3,)]
    st = writer.stats()
    assert st["rows_rejected"] == 2 and st["rows_spooled"] == 0 and st["db_ok"]
    lines = (tmp_path / "spool" / "test" / "rejected.jsonl").read_text().splitlines()
    import json
    rejected = [json.loads(line) for line in lines]
    assert [r["row"]["ordinal"] for r in rejected] == ["1", "2"]
    assert all(r["table"] == "trades" and r["error"] for r in rejected)


# -- text encoding: whatever a string holds comes back identical ------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from workers.storage.rows import CONVERTERS, copy_text, row_converter  # noqa: E402

# PostgreSQL text cannot hold NUL, UTF-8 cannot hold lone surrogates: everything else must survive.
pg_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(pg_text, min_size=1, max_size=8))
def test_any_text_round_trips_through_copy(writer, db, texts):
    texts = texts + ["\\N", "a\tb\nc\rd\\e", "", "\\"]
    writer.add("markets", [{"market_id": str(i), "question": t, "slug": None, "raw": {"q": t}}
                           for i, t in enumerate(texts)])
    writer.flush()
    got = fetch(db, "SELECT question, slug, raw->>'q' FROM markets ORDER BY market_id::int")
    conn = psycopg2.connect(db)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM markets")
    conn.commit()
    conn.close()
    assert got == [(t, None, t) for t in texts]
    assert writer.stats()["rows_rejected"] == 0


values = st.one_of(
    st.none(), pg_text, st.integers(), st.decimals(allow_nan=False, allow_infinity=False),
    st.floats(allow_nan=False), st.booleans(), st.datetimes(timezones=st.just(timezone.utc)), st.datetimes(),
    st.lists(pg_text, max_size=3),
)


@given(st.dictionaries(st.sampled_from([c for c, _ in TABLES["markets"].columns]), values))
def test_compiled_converter_matches_the_column_converters(row):
    cols = TABLES["markets"].columns
    fast = row_converter(cols)
    try:
        expected = [CONVERTERS[kind](row.get(c)) for c, kind in cols]
    except (TypeError, ValueError, AttributeError):
        with pytest.raises((TypeError, ValueError, AttributeError)):
            fast(row)
        return
    assert fast(row) == expected


def test_copy_text_escapes_only_what_needs_it():
    assert copy_text([["a", None, "b\tc"], ["x\\y", "1\n2", "\r"]]) == "a\t\\N\tb\\tc\nx\\\\y\t1\\n2\t\\r\n"


@given(st.lists(st.lists(st.one_of(st.none(), st.text(alphabet="ab\\\t\n\rN", max_size=4)), min_size=3, max_size=3),
                max_size=5))
def test_copy_text_fast_path_matches_escaping_every_row(rows):
    from workers.storage.rows import _escaped_copy_text
    assert copy_text(rows) == _escaped_copy_text(rows)


def test_converter_reuses_a_datetime_text_only_for_the_same_object():
    convert = row_converter(TABLES["trades"].columns)
    at = T0
    later = T0 + timedelta(milliseconds=1)
    other_zone = T0.astimezone(timezone(timedelta(hours=2)))
    at_received = TABLES["trades"].column_names.index("received_at")
    texts = [convert(trade(received_at=value))[at_received] for value in (at, at, later, at, other_zone, "2026-01-01", None)]
    assert texts == [at.isoformat(), at.isoformat(), later.isoformat(), at.isoformat(), other_zone.isoformat(),
                     "2026-01-01", None]
    with pytest.raises(ValueError):
        convert(trade(received_at=datetime(2026, 1, 1)))  # naive: refused, never remembered


# -- flush timing with an injected clock ---------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 0.0  # a clock starting at zero must work too

    def __call__(self):
        return self.t


def test_flush_is_due_by_size_or_age(db, tmp_path):
    clock = Clock()
    w = Writer(db, tmp_path / "spool", name="clock", max_rows=10, max_age=0.5, background=False, clock=clock).open()
    try:
        assert not w.due()
        w.add("trades", [trade(ordinal=0)])
        assert not w.due() and not w.maybe_flush()
        clock.t += 0.49
        assert not w.due()
        clock.t += 0.02  # the oldest row is now older than max_age
        assert w.due() and w.maybe_flush()
        assert w.stats()["rows_written"] == 1 and w.stats()["buffered"] == 0
        w.add("trades", [trade(ordinal=i) for i in range(1, 10)])  # 9 rows, fresh
        assert not w.due()
        w.add("trades", [trade(ordinal=10)])  # the 10th: add() itself hands the batch over
        assert w.stats()["rows_written"] == 11 and w.stats()["buffered"] == 0
    finally:
        w.close()
    assert fetch(db, "SELECT count(*) FROM trades") == [(11,)]


def test_background_flusher_delivers_within_max_age(db, tmp_path):
    """The collector only calls maybe_flush(); the thread commits; the loop never waits on the DB."""
    w = Writer(db, tmp_path / "spool", name="bg", max_age=0.05).open()
    try:
        w.add("trades", [trade(ordinal=i) for i in range(5)])
        deadline = time.monotonic() + 20
        while fetch(db, "SELECT count(*) FROM trades") != [(5,)]:
            assert time.monotonic() < deadline, w.stats()
            w.maybe_flush()
            time.sleep(0.02)
    finally:
        w.close()


# -- migration failures ------------------------------------------------------------------------
def test_failing_migration_rolls_back_alone(pg_dsn, tmp_path):
    from workers.storage import MigrationError

    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_t (x int);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE second_t (x int); SELECT no_such_column FROM first_t;")
    with pytest.raises(MigrationError, match="0002_broken"):
        migrate(pg_dsn, directory=tmp_path)
    assert fetch(pg_dsn, "SELECT version FROM schema_migrations") == [(1,)]
    assert fetch(pg_dsn, "SELECT to_regclass('second_t') IS NULL") == [(True,)]  # 0002 left nothing behind
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE second_t (x int);")  # fixed
    assert migrate(pg_dsn, directory=tmp_path) == [2]


@pytest.mark.parametrize("files", [["1_short.sql"], ["0001_a.sql", "0001_b.sql"], ["0001_bad-name.sql"]])
def test_misnamed_or_duplicate_migrations_are_refused(tmp_path, files):
    from workers.storage import MigrationError

    for name in files:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError):
        discover(tmp_path)


def test_closed_writer_refuses_rows_and_closes_once(db, tmp_path):
    w = Writer(db, tmp_path / "spool", name="once").open()
    w.add("trades", [trade()])
    w.close()
    w.close()
    assert w.stats()["rows_written"] == 1
    with pytest.raises(RuntimeError, match="closed"):
        w.add("trades", [trade(ordinal=1)])


@pytest.mark.parametrize("query, index", [
    ("SELECT * FROM trades WHERE token_id = 'x' AND ts >= now() - interval '1 day'", "trades_token_ts_idx"),
    ("SELECT * FROM price_snapshots WHERE token_id = 'x' ORDER BY ts DESC LIMIT 1", "price_snapshots_pkey"),
    ("SELECT * FROM orderbook_snapshots WHERE token_id = 'x' AND ts BETWEEN now() - interval '1 hour' AND now()",
     "orderbook_snapshots_pkey"),
    ("SELECT * FROM markets WHERE condition_id = 'x'", "markets_condition_id_idx"),
    ("SELECT * FROM tokens WHERE condition_id = 'x'", "tokens_condition_id_idx"),
])
def test_the_documented_queries_have_an_index(db, query, index):
    conn = psycopg2.connect(db, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SET enable_seqscan = off")  # empty tables: make the planner show its index choice
            cur.execute("EXPLAIN " + query)
            plan = "\n".join(r[0] for r in cur.fetchall())
    finally:
        conn.close()
    assert index in plan, plan


def test_markets_last_seen_moves_at_most_hourly_when_nothing_changed(writer, db):
    base = {"market_id": "7", "question": "Q?", "updated_at": T0, "raw": {"v": 1}, "last_seen_at": T0}
    writer.add("markets", [base])
    writer.flush()
    writer.add("markets", [{**base, "last_seen_at": T0 + timedelta(minutes=30)}])  # same payload, 30 min later
    writer.flush()
    assert fetch(db, "SELECT last_seen_at FROM markets") == [(T0,)]  # not rewritten
    writer.add("markets", [{**base, "question": "stale?", "updated_at": T0 - timedelta(days=1), "raw": {"v": 0},
                            "last_seen_at": T0 + timedelta(hours=2)}])  # an old payload, seen 2 h later
    writer.flush()
    assert fetch(db, "SELECT question, last_seen_at FROM markets") == [("Q?", T0 + timedelta(hours=2))]


def test_parsed_rows_land_exactly_as_dict_rows_would(writer, db):
    """Writer.add_rows (the trade listener's rows, already text) stores the same as add()
    with the same values as dicts, meets a live twin once, and refuses a short row whole."""
    from workers.messages import TRADE_COLUMNS, parse, row_dict
    from workers.trades import Ordinals
    from tests.conftest import DATA

    frames = [line for line in (DATA / "ws_market_messages.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for frame in frames for row in parse(frame).trades]
    Ordinals().number(rows, T0.isoformat())
    assert writer.add_rows("trades", rows) == len(rows) == 41
    writer.flush()
    as_dicts = [dict(row_dict(r), ordinal=int(r[7]), received_at=T0) for r in rows]
    writer.add("trades", as_dicts)  # the same trades again, the dict way: all conflicts
    writer.flush()
    stored = fetch(db, f"SELECT {', '.join(TRADE_COLUMNS)} FROM trades ORDER BY tx_hash, ordinal")
    assert len(stored) == 41
    by_key = {(r["tx_hash"], r["ordinal"]): r for r in as_dicts}
    for values in stored:
        got = dict(zip(TRADE_COLUMNS, values))
        want = by_key[(got["tx_hash"], got["ordinal"])]
        assert got["ts"] == want["ts"] and got["received_at"] == T0
        assert got["price"] == Decimal(want["price"]) and got["size"] == Decimal(want["size"])
        assert (got["token_id"], got["condition_id"], got["side"], got["source"]) == (
            want["token_id"], want["condition_id"], want["side"], "ws")
    with pytest.raises(ValueError, match="exactly 12 values"):
        writer.add_rows("trades", [rows[0], rows[1][:10]])
    assert writer.stats()["buffered"] == 0
