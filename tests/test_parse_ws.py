"""The market-channel parser against the recorded real messages (tests/data, see SOURCES.md)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

from hypothesis import given, settings, strategies as st

from tests.conftest import DATA
from workers.messages import canon_decimal, ms_time, parse, row_dict


def lines(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_last_trade_price_row_exact():
    # Line 5: the netqo capture of 2026-08-14.
    out = parse(lines("ws_market_messages.jsonl")[4])
    assert out.skipped == {} and out.unknown_fields == {}
    assert [row_dict(r) for r in out.trades] == [{
        "token_id": "72710166409980712002774407052535905861151156175854323762835102340552522606004",
        "condition_id": "0x12dc2b61723b2a54fc1947a307389b5f32038e7a29a0e936ad1fe410b969d06a",
        "ts": datetime(2026, 8, 14, 17, 27, 47, 101000, tzinfo=timezone.utc),
        "price": "0.585",
        "size": "2.46",
        "side": "SELL",
        "tx_hash": "0x6c83cdd2cd59f46a116824aecc9d9b05fc58af1a8f9cfdf09033f5cdb77e0dcf",
        "fee_rate_bps": "0",
        "source": "ws",
        "trade_day": "2026-08-14",  # the partition column: the UTC day of ts
    }]
    assert int(row_dict(out.trades[0])["ts"].timestamp() * 1000) == 1786728467101


def test_every_recorded_current_message_parses_to_the_right_rows():
    raw = lines("ws_market_messages.jsonl")
    trades, kinds = [], []
    for text in raw:
        out = parse(text)
        assert not out.skipped, (text[:80], out.skipped, out.errors)
        assert not out.unknown_fields
        trades += [row_dict(r) for r in out.trades]
        kinds += [k for k, n in out.events.items() for _ in range(n)]
    assert kinds.count("book") == 2 and kinds.count("price_change") == 1
    assert kinds.count("best_bid_ask") == 1 and kinds.count("tick_size_change") == 1
    assert len(trades) == 41  # line 5 + the 40-line live pilot
    # Each row carries exactly the message's values, decimal text preserved.
    trade_lines = [t for t in raw if json.loads(t)["event_type"] == "last_trade_price"]
    assert len(trade_lines) == len(trades)
    for text, row in zip(trade_lines, trades):
        msg = json.loads(text)
        assert row["token_id"] == msg["asset_id"] and row["condition_id"] == msg["market"]
        assert Decimal(row["price"]) == Decimal(msg["price"]) and Decimal(row["size"]) == Decimal(msg["size"])
        assert row["side"] == msg["side"] and row["tx_hash"] == msg["transaction_hash"]
        assert round(row["ts"].timestamp() * 1000) == int(msg["timestamp"])
    sizes = {t["size"] for t in trades}
    assert "10.820819" in sizes and "60" in sizes  # six-decimal and integral sizes kept exact


def test_book_and_tick_size_change():
    out = parse(lines("ws_market_messages.jsonl")[0])
    assert out.books[0]["tick_size"] == "0.001" and out.books[0]["hash"] == "924ec9bc1c6dd89f5db9b7b2b68cdab458cc2dc6"
    out = parse(lines("ws_market_messages.jsonl")[45])
    assert out.ticks == [{
        "asset_id": "115474063863764126958837769719736461272619491980773624567012766320777398670353",
        "market": "0xbacdf04bf7f22a670dc4fb408878ec56b76f9934599829455b9371693ba84b8b",
        "tick_size": "0.001",
        "ts": ms_time("1739068041853"),
    }]
    pretty = (DATA / "ws_book_snapshot_2026-08-13_nautilus.json").read_text()
    assert parse(pretty).events == {"book": 1}


def test_legacy_2024_shapes():
    book, trade = lines("ws_market_messages_2024.jsonl")
    assert parse(book).events == {"book": 1} and parse(book).books[0]["tick_size"] is None
    row = row_dict(parse(trade).trades[0])
    assert row["tx_hash"] is None and row["price"] == "0.491"
    assert row["ts"] == ms_time(1724564136087)
    legacy = {"event_type": "price_change", "asset_id": "123", "market": "0xab", "hash": "h",
              "timestamp": "1724564136087", "changes": [{"price": "0.5", "side": "BUY", "size": "10"}]}
    assert parse(json.dumps(legacy)).events == {"price_change_legacy": 1}


def test_custom_feature_events():
    bba, new, resolved = lines("ws_market_custom_feature_examples_docs.jsonl")
    assert parse(bba).events == {"best_bid_ask": 1}
    out = parse(new)
    assert out.markets[0]["kind"] == "new_market" and out.markets[0]["market_id"] == "1031769"
    assert out.markets[0]["outcomes"] == ["Yes", "No"]
    out = parse(resolved)
    event = out.markets[0]
    assert event["kind"] == "market_resolved" and event["winning_outcome"] == "Yes"
    assert event["winning_token_id"].startswith("7604307375665367822637")
    assert event["condition_id"] == "0x311d0c4b6671ab54af4970c06fcf58662516f5168997bdda209ec3db5aa6b0c1"
    void = dict(json.loads(resolved), winning_asset_id="", winning_outcome="")
    event = parse(json.dumps(void)).markets[0]
    assert event["winning_token_id"] is None and event["winning_outcome"] is None
    wrong = dict(json.loads(resolved), winning_asset_id="123")
    assert parse(json.dumps(wrong)).skipped == {"invalid:market_resolved": 1}


def test_arrays_text_frames_and_garbage():
    trade = json.loads(lines("ws_market_messages.jsonl")[4])
    book = json.loads(lines("ws_market_messages.jsonl")[0])
    out = parse(json.dumps([book, trade, trade]))
    assert len(out.trades) == 2 and out.events == {"book": 1, "last_trade_price": 2}
    assert parse("PONG").pong and parse("PONG\n").pong
    out = parse("NO NEW ASSETS")
    assert not out.pong and out.text == "NO NEW ASSETS" and out.skipped == {"text": 1}
    assert parse("{not json").skipped == {"not_json": 1}
    assert parse(b"\xff\xfe").skipped == {"not_json": 1}
    assert parse("[1, null, \"x\"]").skipped == {"not_object": 3}
    out = parse(json.dumps({"event_type": "mystery", "x": 1}))
    assert out.skipped == {"unknown_type:mystery": 1} and not out.trades


def test_unknown_fields_are_counted_not_fatal():
    trade = json.loads(lines("ws_market_messages.jsonl")[4])
    trade["new_field"] = 1
    out = parse(json.dumps(trade))
    assert len(out.trades) == 1 and out.unknown_fields == {"last_trade_price.new_field": 1}


def test_invalid_trades_yield_no_half_row():
    good = json.loads(lines("ws_market_messages.jsonl")[4])
    bad_values = {"price": ["1.5", "-0.1", "abc", None, True, "NaN"], "size": ["0", "-1", "", None],
                  "side": ["buy", None], "asset_id": ["0x12", 12, "", "1" * 79], "timestamp": ["1786728467", "x", 1.5, "\u0661\u0667\u0668\u0666\u0667\u0662\u0668\u0664\u0666\u0667\u0661\u0660\u0661"],
                  "market": ["abc", None], "transaction_hash": ["nothex", 5]}
    for key, values in bad_values.items():
        for value in values:
            msg = dict(good, **{key: value})
            out = parse(json.dumps([msg, good]))
            assert len(out.trades) == 1 and out.skipped == {"invalid:last_trade_price": 1}, (key, value)
    missing = dict(good)
    del missing["price"]
    assert parse(json.dumps(missing)).trades == []


def test_canonical_decimals():
    assert canon_decimal(".48") == "0.48" and canon_decimal("0.480") == "0.48" and canon_decimal("60.0") == "60"
    assert canon_decimal("1E+2") == "100" and canon_decimal(0.709999959) == "0.709999959"
    assert canon_decimal("0") == "0" and canon_decimal("00.5") == "0.5"


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["event_type", "asset_id", "market", "price", "size", "side", "timestamp",
                         "transaction_hash", "price_changes", "bids", "asks", "id", "assets_ids", "x"]),
        children, max_size=8),
    max_leaves=20))
def test_arbitrary_json_never_raises(value):
    out = parse(json.dumps(value))
    for row in out.trades:  # anything accepted is a complete row
        row = row_dict(row)
        assert set(row) >= {"token_id", "condition_id", "ts", "price", "size", "side", "tx_hash"}
        assert all(type(row[k]) is str for k in ("token_id", "condition_id", "price", "size", "side"))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_real_trades_are_whole_or_skipped(data):
    msg = json.loads(lines("ws_market_messages.jsonl")[4])
    key = data.draw(st.sampled_from(sorted(msg)))
    msg[key] = data.draw(st.none() | st.integers() | st.text(max_size=12) | st.floats())
    out = parse(json.dumps(msg))
    assert len(out.trades) + sum(out.skipped.values()) == 1


def test_rows_are_in_the_trades_tables_column_order():
    from workers.messages import TRADE_COLUMNS
    from workers.storage.tables import TABLES

    assert TRADE_COLUMNS == TABLES["trades"].column_names


def test_fast_and_general_paths_build_identical_rows():
    """A frame of known events takes the typed fast path; one unknown field anywhere sends
    the whole frame through the general validator. Both give the same rows and counts."""
    raw = [json.loads(t) for t in lines("ws_market_messages.jsonl")]
    fast = parse(json.dumps(raw))
    general = parse(json.dumps(raw + [{"event_type": "mystery"}]))
    assert fast.trades and fast.trades == general.trades
    assert fast.events == general.events and fast.newest_ms == general.newest_ms
    assert general.skipped == {"unknown_type:mystery": 1} and not fast.skipped


@settings(max_examples=300, deadline=None)
@given(price=st.sampled_from(["0.5", ".5", "0.50", "0.500", "1", "1.0", "0.05"]),
       size=st.sampled_from(["10", "10.0", "010", "1.25", "1.250", "0.001"]),
       tx=st.sampled_from(["0xAB12", "0xab12", "", None]),
       fee=st.sampled_from(["0", "0.0", "", None, "12"]),
       ts=st.sampled_from(["1786728467101", "1786728467102", "178672846710", "17867284671011"]),
       repeat=st.integers(1, 3))
def test_a_trade_parses_the_same_however_often_its_values_were_seen(price, size, tx, fee, ts, repeat):
    """The fast path remembers values seen valid: a trade's row must not depend on that
    memory (first sight, later sights, non-canonical text, upper-case hash, no hash)."""
    msg = dict(json.loads(lines("ws_market_messages.jsonl")[4]), price=price, size=size, timestamp=ts)
    for key, value in (("transaction_hash", tx), ("fee_rate_bps", fee)):
        if value is None:
            msg.pop(key)
        else:
            msg[key] = value
    rows = [parse(json.dumps([msg] * repeat)).trades for _ in range(3)]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == repeat
    row = row_dict(rows[0][0])
    assert row["price"] == canon_decimal(price) and row["size"] == canon_decimal(size)
    assert row["tx_hash"] == (tx.lower() if tx else None)
    assert row["fee_rate_bps"] == (canon_decimal(fee) if fee else None)
    assert row["ts"] == ms_time(ts)
