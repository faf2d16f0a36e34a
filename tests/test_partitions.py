"""Partitioned storage against a real PostgreSQL: the 0023 migration of a populated
database, partitions made on demand and ahead, retention by whole partitions, and the
trades key across a day boundary."""

from __future__ import annotations

import re
import shutil
import threading
from datetime import date, datetime, timedelta, timezone

import psycopg2
import pytest

from collectord.config import parse as parse_config
from collectord.errors import ConfigError
from tests.conftest import query
from workers.base import OptionError
from workers.prices import PricesCollector
from workers.storage import Writer, migrate
from workers.storage.migrate import discover, migrations_dir
from workers.storage.partitions import (PARTITIONED, RetentionError, create, drop_expired, existing, maintain,
                                        parse_retention)
from workers.trades import TradesCollector

UTC = timezone.utc
TOKEN = "7" * 78
D = date(2026, 3, 14)
MIDNIGHT = datetime(2026, 3, 15, tzinfo=UTC)  # the end of day D


@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


@pytest.fixture
def writer(db, tmp_path):
    w = Writer(db, tmp_path / "spool", name="t", background=False).open()
    yield w
    w.close()


def trade(ts: datetime, tx: str = "0xab", source: str = "ws", **extra) -> dict:
    return dict({"token_id": TOKEN, "condition_id": "0xcd", "ts": ts, "price": "0.5", "size": "10", "side": "BUY",
                 "tx_hash": tx, "ordinal": 0, "source": source}, **extra)


def partitions(dsn: str, table: str) -> dict[date, bool]:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            return existing(cur, table)
    finally:
        conn.close()


# -- retention values ----------------------------------------------------------------------
def test_retention_parses_days_and_weeks_and_refuses_the_rest():
    assert parse_retention("90d") == timedelta(days=90)
    assert parse_retention(" 13W ") == timedelta(weeks=13)
    assert parse_retention("") is None and parse_retention(None) is None
    for bad in ("90", "0d", "1y", "-3d", "90 days", "1.5d"):
        with pytest.raises(RetentionError):
            parse_retention(bad)


def test_a_bad_retention_is_a_config_error_naming_file_section_key():
    cfg = parse_config("[collector:trades]\nretention = 90d\n[collector:orderbooks]\nretention = 2w\n", "c.conf")
    assert cfg.collector("trades").retention == timedelta(days=90)
    assert cfg.collector("orderbooks").options["retention"] == "14d"  # what the collector is handed
    assert cfg.collector("prices").retention is None and "retention" not in cfg.collector("prices").options
    with pytest.raises(ConfigError) as err:
        parse_config("[collector:prices]\nretention = 90 days\n", "c.conf")
    assert err.value.exit_code == 78
    assert str(err.value).startswith("c.conf, [collector:prices], retention: ") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"\[collector:markets\], retention: .*not partitioned"):
        parse_config("[collector:markets]\nretention = 90d\n", "c.conf")


def test_collectors_refuse_a_bad_retention_option_by_key():
    with pytest.raises(OptionError) as err:
        PricesCollector(name="prices", retention="forever")
    assert err.value.key == "retention"
    with pytest.raises(OptionError):
        TradesCollector(name="trades", ws_url="ws://x", data_url="http://x", retention="0d")
    assert PricesCollector(name="prices", retention="30d").retention == timedelta(days=30)


# -- the migration of a populated database ----------------------------------------------------
OLD_TRADES = ("token_id, condition_id, ts, price, size, side, tx_hash, ordinal, fee_rate_bps, source, received_at")


def fingerprint(dsn: str, table: str, columns: str) -> tuple[int, str]:
    return query(dsn, f"SELECT count(*), md5(coalesce(string_agg(r::text, '|' ORDER BY r::text), ''))"
                      f" FROM (SELECT {columns} FROM {table}) r")[0]


def test_migration_converts_a_populated_database_without_losing_or_duplicating_a_row(pg_dsn, tmp_path):
    old = tmp_path / "migrations"
    old.mkdir()
    for m in discover():
        if m.version < 23:
            shutil.copy(migrations_dir() / f"{m.name}.sql", old / f"{m.name}.sql")
    migrate(pg_dsn, directory=old)
    conn = psycopg2.connect(pg_dsn, connect_timeout=10)
    with conn, conn.cursor() as cur:
        cur.execute("SET TimeZone = 'America/New_York'")  # day boundaries must be UTC whatever the session says
        # 6,000 trades over four days (ms and whole seconds, with and without tx hash, exact repeats),
        # a trade a millisecond each side of midnight, prices and books at the same instants.
        cur.execute(f"""
            INSERT INTO trades ({OLD_TRADES})
            SELECT 'tok' || (i % 7), '0xc' || (i % 3),
                   timestamptz '2026-03-12 00:00:00+00' + (i * interval '57.6 s') + (i % 2) * interval '0.123 s',
                   0.01 * (1 + i % 99), 1 + i % 50, CASE WHEN i % 3 = 0 THEN 'SELL' ELSE 'BUY' END,
                   CASE WHEN i % 11 = 0 THEN NULL ELSE '0x' || to_hex(i / 2) END, i % 2, 0,
                   CASE WHEN i % 5 = 0 THEN 'backfill' ELSE 'ws' END, now()
              FROM generate_series(0, 5999) AS i""")
        cur.execute(f"""INSERT INTO trades ({OLD_TRADES}) VALUES
            ('tokm', NULL, '2026-03-14 23:59:59.999+00', 0.5, 1, 'BUY', '0xm1', 0, NULL, 'ws', NULL),
            ('tokm', NULL, '2026-03-15 00:00:00+00', 0.5, 1, 'BUY', '0xm2', 0, NULL, 'backfill', NULL)""")
        cur.execute("""INSERT INTO price_snapshots (token_id, ts, best_bid, best_ask, mid)
            SELECT 'tok' || (i % 7), timestamptz '2026-03-12 00:00:00+00' + (i * interval '115.2 s'), 0.4, 0.6, 0.5
              FROM generate_series(0, 2999) AS i""")
        cur.execute("""INSERT INTO orderbook_snapshots (token_id, ts, hash, best_bid, best_ask, bids, asks)
            SELECT 'tok' || (i % 7), timestamptz '2026-03-12 00:00:00+00' + (i * interval '345.6 s'), md5(i::text),
                   0.4, 0.6, '[["0.4","10"],["0.39","5"]]', '[["0.6","7"]]'
              FROM generate_series(0, 999) AS i""")
        # book events (0022, partitioned by 0025): checkpoints and level updates over the same days
        cur.execute("""INSERT INTO book_events (token_id, ts, kind, hash, bids, asks, received_at)
            SELECT 'tok' || (i % 7), timestamptz '2026-03-12 00:00:00+00' + (i * interval '172.8 s'),
                   CASE WHEN i % 4 = 0 THEN 'b' ELSE 'p' END, decode(md5(i::text), 'hex'),
                   '{{0.4,10},{0.39,5}}', CASE WHEN i % 4 = 0 THEN '{{0.6,7}}'::numeric[] END, now()
              FROM generate_series(0, 1999) AS i""")
    conn.close()
    books = "token_id, condition_id, ts, hash, best_bid, best_ask, spread, bid_depth, ask_depth, bid_levels, " \
            "ask_levels, bids, asks, received_at"
    before = {"trades": fingerprint(pg_dsn, "trades", OLD_TRADES),
              "price_snapshots": fingerprint(pg_dsn, "price_snapshots", "*"),
              "orderbook_snapshots": fingerprint(pg_dsn, "orderbook_snapshots", books),
              "book_events": fingerprint(pg_dsn, "book_events", "*")}
    assert before["trades"][0] == 6002 and before["book_events"][0] == 2000

    assert migrate(pg_dsn)[0] == 23  # and any later ones

    after = {"trades": fingerprint(pg_dsn, "trades", OLD_TRADES),
             "price_snapshots": fingerprint(pg_dsn, "price_snapshots", "*"),
             "orderbook_snapshots": fingerprint(pg_dsn, "orderbook_snapshots", books),
             "book_events": fingerprint(pg_dsn, "book_events", "*")}
    assert after == before  # every row, once, every value unchanged
    today = datetime.now(UTC).date()
    for table in PARTITIONED:
        assert query(pg_dsn, "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (table,)) == [("p",)]
        days = set(partitions(pg_dsn, table))
        assert {date(2026, 3, d) for d in range(12, 16)} | {today + timedelta(days=i) for i in range(4)} <= days
        # every row sits in the partition of its UTC day
        assert query(pg_dsn, f"SELECT count(*) FROM {table}"
                             f" WHERE tableoid::regclass::text <> '{table}_p' || to_char(ts AT TIME ZONE 'UTC', 'YYYYMMDD')"
                     ) == [(0,)]
    assert query(pg_dsn, "SELECT count(*) FROM trades WHERE trade_day <> (ts AT TIME ZONE 'UTC')::date") == [(0,)]
    assert query(pg_dsn, "SELECT tx_hash, trade_day FROM trades WHERE token_id = 'tokm' ORDER BY 1") == [
        ("0xm1", date(2026, 3, 14)), ("0xm2", date(2026, 3, 15))]
    assert not query(pg_dsn, "SELECT relname FROM pg_class WHERE relname LIKE '%%_unpartitioned'")
    plan = "\n".join(r[0] for r in query(pg_dsn, "EXPLAIN SELECT * FROM trades WHERE ts >= '2026-03-13 01:00+00'"
                                                 " AND ts < '2026-03-13 02:00+00'"))
    assert set(re.findall(r"trades_p\d{8}", plan)) == {"trades_p20260313"}, plan  # the migrated days' CHECKs
    # The keys still hold: every stored trade written again through the Writer adds nothing.
    rows = query(pg_dsn, f"SELECT {OLD_TRADES} FROM trades")
    w = Writer(pg_dsn, tmp_path / "spool", name="again", background=False).open()
    names = OLD_TRADES.split(", ")
    w.add("trades", [dict(zip(names, r)) for r in rows])
    w.flush()
    w.close()
    assert w.stats()["rows_inserted"] == 0 and w.stats()["rows_written"] == len(rows)
    assert fingerprint(pg_dsn, "trades", OLD_TRADES) == before["trades"]


# -- partitions on demand and ahead ------------------------------------------------------------
def test_rows_far_in_the_past_or_future_get_their_own_partition(writer, db):
    far = [trade(datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC), "0x1"), trade(datetime(2099, 12, 31, 12, tzinfo=UTC), "0x2")]
    writer.add("trades", far)
    writer.add("price_snapshots", [{"token_id": TOKEN, "ts": datetime(2098, 6, 1, 23, 30, tzinfo=timezone(
        timedelta(hours=-5)))}])  # 2098-06-02 in UTC
    writer.add("book_events", [{"token_id": TOKEN, "ts": datetime(2097, 2, 3, tzinfo=UTC), "kind": "b",
                                "hash": "\\x" + "ab" * 20, "bids": "{{0.5,1}}", "asks": "{}",
                                "received_at": datetime(2097, 2, 3, tzinfo=UTC)}])
    writer.flush()
    assert writer.stats()["rows_rejected"] == 0 and writer.stats()["rows_written"] == 4
    assert date(2097, 2, 3) in partitions(db, "book_events")
    assert {date(1999, 1, 2), date(2099, 12, 31)} <= set(partitions(db, "trades"))
    assert date(2098, 6, 2) in partitions(db, "price_snapshots")
    assert query(db, "SELECT tableoid::regclass::text FROM trades ORDER BY ts") == [("trades_p19990102",),
                                                                                    ("trades_p20991231",)]
    # the child's indexes carry the parent's names
    assert {r[0] for r in query(db, "SELECT indexname FROM pg_indexes WHERE tablename = 'trades_p20991231'")} == {
        "trades_key_p20991231", "trades_key_no_tx_p20991231", "trades_token_ts_idx_p20991231",
        "trades_ts_brin_p20991231"}


def test_a_partition_dropped_behind_a_writers_back_is_made_again(writer, db):
    old = datetime(2020, 1, 1, 12, tzinfo=UTC)
    writer.add("trades", [trade(old, "0x1")])
    writer.flush()
    conn = psycopg2.connect(db, connect_timeout=10)
    conn.autocommit = True
    assert drop_expired(conn, "trades", timedelta(days=30)) == [date(2020, 1, 1)]
    conn.close()
    writer.add("trades", [trade(old, "0x2")])  # the writer still believes the partition exists
    writer.flush()
    assert writer.stats()["rows_rejected"] == 0
    assert query(db, "SELECT tx_hash FROM trades") == [("0x2",)]


def test_a_constant_ts_range_on_trades_reads_only_its_days(writer, db):
    """trades partition on trade_day, yet `WHERE token_id = ... AND ts BETWEEN ...` (the
    documented query) reads only the partitions of those days: each one's CHECK on ts."""
    writer.add("trades", [trade(datetime(2026, 3, d, 12, tzinfo=UTC), f"0x{d}") for d in range(10, 16)])
    writer.flush()
    conn = psycopg2.connect(db, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'Asia/Tokyo'")
        cur.execute("EXPLAIN SELECT * FROM trades WHERE token_id = %s"
                    " AND ts >= '2026-03-12 06:00+00' AND ts < '2026-03-13 06:00+00'", (TOKEN,))
        plan = "\n".join(r[0] for r in cur.fetchall())
        cur.execute("SELECT tx_hash FROM trades WHERE ts >= '2026-03-12 06:00+00' AND ts < '2026-03-13 18:00+00'"
                    " ORDER BY 1")
        assert cur.fetchall() == [("0x12",), ("0x13",)]
        with pytest.raises(psycopg2.errors.CheckViolation):  # a trade_day that is not its ts's day
            cur.execute("INSERT INTO trades (token_id, ts, price, size, side, source, trade_day)"
                        " VALUES ('1', '2026-03-12 12:00+00', 1, 1, 'BUY', 'ws', '2026-03-13')")
    conn.close()
    touched = set(re.findall(r"trades_p\d{8}", plan))
    assert touched == {"trades_p20260312", "trades_p20260313"}, plan


def test_creators_racing_for_the_same_days_make_each_partition_once(db):
    days = [date(2030, 1, d) for d in range(1, 8)]
    errors: list[BaseException] = []

    def make():
        conn = psycopg2.connect(db, connect_timeout=10)
        try:
            create(conn, "orderbook_snapshots", days)
        except BaseException as err:  # pragma: no cover - the assertion below reports it
            errors.append(err)
        finally:
            conn.close()

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert set(days) <= set(partitions(db, "orderbook_snapshots"))


def test_maintenance_makes_days_ahead_and_drops_only_whole_expired_days(writer, db):
    now = datetime.now(UTC)
    today = now.date()
    stamps = [now - timedelta(days=k) for k in (0, 1, 2, 3, 10)]
    writer.add("trades", [trade(ts, f"0x{k}") for k, ts in enumerate(stamps)])
    writer.add("price_snapshots", [{"token_id": TOKEN, "ts": ts} for ts in stamps])
    writer.flush()
    done = maintain(db, {"trades": timedelta(days=2), "price_snapshots": None})
    # kept: today, the two days before (their rows are younger than 2 days, or partly);
    # dropped: the days that ended more than two days ago
    assert sorted(done["trades"]["dropped"]) == [today - timedelta(days=10), today - timedelta(days=3)]
    assert done["price_snapshots"]["dropped"] == []
    have = set(partitions(db, "trades"))
    assert {today + timedelta(days=i) for i in range(4)} <= have
    assert today - timedelta(days=3) not in have and today - timedelta(days=2) in have
    assert query(db, "SELECT count(*) FROM trades") == [(3,)]
    assert query(db, "SELECT count(*) FROM price_snapshots") == [(5,)]  # no retention: all kept
    assert not query(db, "SELECT relname FROM pg_class WHERE relname = %s",
                     (f"trades_p{today - timedelta(days=3):%Y%m%d}",))  # dropped, not left detached
    assert maintain(db, {"trades": timedelta(days=2)})["trades"] == {"created": [], "dropped": []}


def test_retention_finishes_what_an_interrupted_pass_left(writer, db):
    old = datetime(2021, 6, 1, tzinfo=UTC)
    writer.add("orderbook_snapshots", [{"token_id": TOKEN, "ts": old + timedelta(days=k), "hash": "h"}
                                       for k in range(2)])
    writer.flush()
    conn = psycopg2.connect(db, connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:  # a pass that detached a partition and died before its DROP
        cur.execute("ALTER TABLE orderbook_snapshots DETACH PARTITION orderbook_snapshots_p20210601")
    assert drop_expired(conn, "orderbook_snapshots", timedelta(days=7)) == [date(2021, 6, 1), date(2021, 6, 2)]
    conn.close()
    assert not query(db, "SELECT relname FROM pg_class WHERE relname LIKE 'orderbook_snapshots_p202106%%'")


def test_a_row_for_a_day_left_detached_reattaches_it(writer, db):
    old = datetime(2022, 2, 2, 2, tzinfo=UTC)
    writer.add("trades", [trade(old, "0x1")])
    writer.flush()
    with psycopg2.connect(db, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE trades DETACH PARTITION trades_p20220202")  # a pass died before its DROP
    conn.close()
    writer.partitions.forget()
    writer.add("trades", [trade(old, "0x2")])
    writer.flush()
    assert writer.stats()["rows_rejected"] == 0
    assert query(db, "SELECT tx_hash FROM trades ORDER BY 1") == [("0x1",), ("0x2",)]


def test_retention_is_never_a_delete(writer, db):
    """Retention leaves the rows of kept partitions untouched: no dead tuples anywhere."""
    now = datetime.now(UTC)
    writer.add("trades", [trade(now - timedelta(days=k), f"0x{k}") for k in range(6)])
    writer.flush()
    maintain(db, {"trades": timedelta(days=3)})
    dead = query(db, "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables WHERE relname LIKE 'trades%%'")
    assert dead == [(0,)]
    assert query(db, "SELECT count(*) FROM trades")[0][0] == 4  # today and the 3 days before it


# -- the trades key across a day boundary ------------------------------------------------------
def test_live_millisecond_and_backfilled_second_share_a_day_and_land_once(writer, db):
    """The assumption (polysim, polymarket-api §4.3): the Data API second truncates the
    live millisecond. Then both compute the same trade_day, even a millisecond before
    midnight, and the key meets its twin in one partition."""
    live = trade(MIDNIGHT - timedelta(milliseconds=1), "0xe1")
    twin = trade(MIDNIGHT - timedelta(seconds=1), "0xe1", source="backfill")
    writer.add("trades", [live])
    writer.flush()
    writer.add("trades", [twin])
    writer.flush()
    assert query(db, "SELECT source, trade_day FROM trades") == [("ws", D)]


@pytest.mark.parametrize("first", ["live", "backfill"])
@pytest.mark.parametrize("matched, stamped", [
    (timedelta(milliseconds=-300), timedelta(0)),  # the Data API rounds to the nearest second
    (timedelta(seconds=-45), timedelta(seconds=40)),  # it stamps the block time, 85 s after the match
], ids=["rounded", "settled"])
def test_a_twin_stamped_across_midnight_is_not_stored_twice(writer, db, first, matched, stamped):
    """Should the Data API's second not truncate the live millisecond, a trade near
    midnight gets another day from each source; the guard finds the twin in the
    neighbouring partition."""
    live = trade(MIDNIGHT + matched, "0xe2")
    twin = trade(MIDNIGHT + stamped, "0xe2", source="backfill")
    other = trade(MIDNIGHT + timedelta(seconds=2), "0xe3", source="backfill")  # a different trade: kept
    batches = [[live], [twin, other]] if first == "live" else [[twin, other], [live]]
    for batch in batches:
        writer.add("trades", batch)
        writer.flush()
    rows = query(db, "SELECT tx_hash, source FROM trades ORDER BY tx_hash")
    assert [r[0] for r in rows] == ["0xe2", "0xe3"]
    assert rows[0][1] == ("ws" if first == "live" else "backfill")  # the first writer's row stays


def test_only_trades_within_two_minutes_of_midnight_are_guarded():
    """The guard costs only the rows near midnight: other batches keep the direct COPY."""
    from workers.storage.rows import row_converter
    from workers.storage.tables import TABLES, trade_near_midnight

    convert = row_converter(TABLES["trades"].columns)

    def near(ts) -> bool:
        return trade_near_midnight(convert(trade(ts)))

    assert near(MIDNIGHT - timedelta(seconds=120)) and near(MIDNIGHT + timedelta(seconds=119, milliseconds=999))
    assert not near(MIDNIGHT - timedelta(seconds=121)) and not near(MIDNIGHT + timedelta(seconds=120))
    assert not near(datetime(2026, 3, 14, 12, tzinfo=UTC))
    # another offset: 01:00:30+01:00 is 00:00:30 UTC
    assert near(datetime(2026, 3, 15, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))))
    assert not near(datetime(2026, 3, 15, 0, 2, 30, tzinfo=timezone(timedelta(hours=1))))
