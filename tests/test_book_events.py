"""Book events from recorded market-channel messages to book_events rows (pure), the REST
hash the rebuild checks against (recomputed on the recorded WS book), hostile and
truncated events (never an exception, never a partial row), and the rows' way through
the Writer and its spool into PostgreSQL, then back out as a rebuilt book."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers import bookevents
from workers.messages import parse
from workers.storage import Writer, migrate
from workers.storage.replay import BookState, book_at

DATA = Path(__file__).resolve().parent / "data"
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
LINES = (DATA / "ws_market_messages.jsonl").read_text().splitlines()


def rows_of(text: str, wanted=None):
    out = parse(text, books=True)
    return bookevents.rows(out.book_events, out.ticks, bookevents.Stamps(), NOW, wanted)


def test_recorded_book_price_change_and_tick_become_rows():
    (book,), bad = rows_of(LINES[0])
    assert bad == 0
    token, ts, kind, hash_, bids, asks, tick, last, received = book
    msg = json.loads(LINES[0])
    assert (token, kind, tick, last) == (msg["asset_id"], "b", "0.001", "0.004")
    assert ts == "2026-08-14T17:27:12.337+00:00" and hash_ == "\\x" + msg["hash"]
    # best first: the exchange sends bids ascending and asks descending
    assert bids == "{{0.004,100},{0.001,2200.8}}" and asks == "{{0.009,25},{0.999,50}}"
    changes, bad = rows_of(LINES[2])
    pc = json.loads(LINES[2])
    assert bad == 0 and [r[0] for r in changes] == [c["asset_id"] for c in pc["price_changes"]]
    assert changes[0][4:6] == ["{{0.06,374.34}}", None] and changes[1][4:6] == [None, "{{0.94,0}}"]
    assert changes[1][3] == "\\x" + pc["price_changes"][1]["hash"]
    only, _ = rows_of(LINES[2], wanted={pc["price_changes"][1]["asset_id"]})
    assert [r[0] for r in only] == [pc["price_changes"][1]["asset_id"]]
    (tick_row,), _ = rows_of(LINES[45])
    assert tick_row[2] == "t" and tick_row[6] == "0.001"
    # received_at strictly increases, so same-millisecond events keep their order
    stamps = bookevents.Stamps()
    assert stamps.next(NOW) < stamps.next(NOW) < stamps.next(NOW - timedelta(seconds=1))


def test_books_off_keeps_no_events_and_the_same_result():
    for line in LINES:
        a, b = parse(line), parse(line, books=True)
        assert a.book_events == [] and (a.trades, a.books, a.events, a.skipped) == (b.trades, b.books, b.events,
                                                                                 b.skipped)


def test_the_recorded_ws_book_hash_is_its_rest_summary_hash():
    """The full-depth WS book (nautilus capture) verifies as the REST summary of that book,
    min_order_size "5" and neg_risk false in (neither is on the WS message): the form
    BookState.rest_hash computes, from the row as stored."""
    msg = json.loads(LINES[1])
    (row,), _ = rows_of(LINES[1])
    levels = [[(lv["price"], lv["size"]) for lv in side] for side in (msg["bids"], msg["asks"])]
    state = BookState(*levels)
    assert state.rest_hash(msg["market"], msg["asset_id"], msg["timestamp"], "5", msg["tick_size"], False,
                           msg["last_trade_price"]) == msg["hash"] == row[3][2:]
    assert state.rest_hash(msg["market"], msg["asset_id"], msg["timestamp"], "5", msg["tick_size"], True,
                           msg["last_trade_price"]) != msg["hash"]
    # and the REST fixtures verify the same way
    for name in ("clob_book_559651_yes.json", "clob_book_empty_ask.json"):
        b = json.loads((DATA / name).read_text())
        state = BookState([(x["price"], x["size"]) for x in b["bids"]], [(x["price"], x["size"]) for x in b["asks"]])
        assert state.rest_hash(b["market"], b["asset_id"], b["timestamp"], b["min_order_size"], b["tick_size"],
                               b["neg_risk"], b["last_trade_price"]) == b["hash"], name


HOSTILE_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(allow_nan=True),
                           st.text(max_size=12), st.just("0.5"), st.just("-1"), st.just("1.5"), st.just("1e3"),
                           st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                 max_size=2))


def _mutations():
    book, pc = json.loads(LINES[0]), json.loads(LINES[2])
    paths = [(book, ("bids", 0, "price")), (book, ("bids", 1, "size")), (book, ("asks",)), (book, ("bids", 0)),
             (book, ("asset_id",)), (book, ("timestamp",)), (book, ("hash",)), (book, ("tick_size",)),
             (pc, ("price_changes", 0, "size")), (pc, ("price_changes", 1, "price")), (pc, ("price_changes", 0, "side")),
             (pc, ("price_changes", 1, "asset_id")), (pc, ("price_changes",)), (pc, ("market",))]
    return st.sampled_from(paths)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations(), HOSTILE_VALUES, st.integers(0, 400))
def test_hostile_and_truncated_events_never_raise_nor_write_a_partial_row(target, value, cut):
    """A value replaced by anything, or the frame cut anywhere: parse and rows never raise;
    an event is either refused whole or every row it yields is complete and valid."""
    msg, path = target
    msg = json.loads(json.dumps(msg))
    node = msg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    text = json.dumps(msg)
    for frame in (text, text[:cut], "[" + text + "," + text[:cut]):
        rows, bad = rows_of(frame)
        for row in rows:
            assert len(row) == len(bookevents.BOOK_EVENT_COLUMNS) and row[0].isdigit() and row[3].startswith("\\x")
            for side in (row[4], row[5]):
                if side is not None:
                    pairs = side.strip("{}").split("},{") if side != "{}" else []
                    for pair in pairs:
                        price, size = pair.split(",")
                        assert 0 <= float(price) <= 1 and float(size) >= 0
            if row[2] == "b":
                assert row[4] is not None and row[5] is not None


def test_loose_struct_and_dict_paths_build_the_same_rows():
    """The fast path hands loose structs with undecoded sides, the general path dicts (an
    unknown field sends a message there): the same rows either way."""
    for line in (LINES[0], LINES[1], LINES[2]):
        fast, _ = rows_of(line)
        general, _ = rows_of('{"polysim_unknown_field":1,' + line[1:])
        assert [r[:-1] for r in fast] == [r[:-1] for r in general] and fast
        assert any(e.__class__ is not dict for e in parse(line, books=True).book_events)
    assert all(isinstance(e, dict) for e in parse('{"x":1,' + LINES[0][1:], books=True).book_events)
    assert msgspec.json.decode(b"[]") == []


@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


def test_rows_spooled_while_the_database_is_down_replay_once_and_rebuild(db, tmp_path):
    """Book rows written with PostgreSQL unreachable go to the spool; the next Writer replays
    them; the same rows again add nothing; the book rebuilt from them is the recorded one."""
    spool = tmp_path / "spool"
    book, pc = json.loads(LINES[0]), json.loads(LINES[2])
    token = book["asset_id"]
    change = {"market": book["market"], "timestamp": str(int(book["timestamp"]) + 5), "event_type": "price_change",
              "price_changes": [{"asset_id": token, "price": "0.004", "size": "0", "side": "BUY",
                                 "hash": pc["price_changes"][0]["hash"]},
                                {"asset_id": token, "price": "0.003", "size": "7", "side": "BUY", "hash": "f" * 40}]}
    frames = [LINES[0], json.dumps(change)]
    down = Writer("host=127.0.0.1 port=1 dbname=nowhere connect_timeout=1", spool, name="b", max_rows=10**6,
                  max_age=3600, connect_timeout=1).open()
    for frame in frames:
        down.add_rows("book_events", rows_of(frame)[0])
    down.flush()
    down.close()
    assert list((spool / "b").glob("*.seg"))
    up = Writer(db, spool, name="b").open()
    for frame in frames:  # the same events delivered again (another socket, a restart)
        up.add_rows("book_events", rows_of(frame)[0])
    up.close()
    conn = psycopg2.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT kind, count(*) FROM book_events GROUP BY kind ORDER BY kind")
            assert cur.fetchall() == [("b", 1), ("p", 1)]
        conn.rollback()
        at = datetime.fromtimestamp((int(book["timestamp"]) + 5) / 1000, timezone.utc)
        got = book_at(conn, token, at)
        assert got.bids == [("0.003", "7"), ("0.001", "2200.8")] and got.asks == [("0.009", "25"), ("0.999", "50")]
        assert got.events == 1 and got.hash == "f" * 40 and got.gap is not None  # no coverage: not vouched for
        before = book_at(conn, token, at - timedelta(milliseconds=1))
        assert before.bids == [("0.004", "100"), ("0.001", "2200.8")] and before.events == 0
    finally:
        conn.close()


def test_a_refused_event_leaves_a_marker_and_the_rebuild_says_so(db, tmp_path):
    """A price_change with a level that is not one is refused whole, but leaves an 'x' row
    for the tokens it names (else the wanted tokens of its market); a rebuild across it
    reports the book as possibly wrong, one before it does not."""
    book = json.loads(LINES[0])
    token, market, ts = book["asset_id"], book["market"], int(book["timestamp"])

    def change(ms, size, asset=token):
        return json.dumps({"market": market, "timestamp": str(ms), "event_type": "price_change",
                           "price_changes": [{"asset_id": asset, "price": "0.004", "size": size, "side": "BUY",
                                              "hash": "e" * 40}]})

    rows, bad = rows_of(change(ts + 10, "-1"))
    assert bad == 1 and [(r[0], r[2], r[4], r[5]) for r in rows] == [(token, "x", None, None)]
    rows, bad = rows_of(change(ts + 10, "5", asset="not-a-token"), wanted={token: market, "7": "0xother"})
    assert bad == 1 and [(r[0], r[2]) for r in rows] == [(token, "x")]
    assert rows_of(change(ts + 10, "-1"), wanted={"7": "0xother"}) == ([], 1)  # not ours: nothing
    w = Writer(db, tmp_path / "spool", name="x").open()
    for frame in (LINES[0], change(ts + 10, "-1"), change(ts + 20, "5")):
        w.add_rows("book_events", rows_of(frame)[0])
    w.close()
    conn = psycopg2.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO feed_coverage (token_id, covered_until) VALUES (%s, now())", (token,))
        conn.commit()
        at = datetime.fromtimestamp((ts + 20) / 1000, timezone.utc)
        after = book_at(conn, token, at)
        assert after.gap["reason"] == "refused book event" and after.events == 1
        assert after.bids[0] == ("0.004", "5")
        before = book_at(conn, token, at - timedelta(milliseconds=15))
        assert before.gap is None and before.events == 0
    finally:
        conn.close()
