"""workers.orderbooks.parse against the recorded CLOB books (real ordering: best LAST)."""

from __future__ import annotations

import copy
import json
import random
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from workers import orderbooks

DATA = Path(__file__).resolve().parent / "data"
BOOKS = sorted(DATA.glob("clob_book_*.json"))
UTC = timezone.utc
T = "orderbook_snapshots"


def load(name):
    return json.loads((DATA / name).read_text())


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.name)
def test_each_real_book(path):
    raw = json.loads(path.read_text())
    assert orderbooks.book_hash(raw) == raw["hash"]  # the exchange's hash method, verified
    out = orderbooks.parse(raw, received_at=datetime(2026, 11, 28, tzinfo=UTC))
    assert out.skipped == 0
    (row,) = out.table(T)
    assert row["token_id"] == raw["asset_id"] and row["condition_id"] == raw["market"]
    assert row["hash"] == raw["hash"]
    assert row["ts"] == datetime.fromtimestamp(int(raw["timestamp"]) // 1000, UTC).replace(
        microsecond=int(raw["timestamp"]) % 1000 * 1000)
    bids = [(Decimal(lv["price"]), Decimal(lv["size"])) for lv in raw["bids"]]
    asks = [(Decimal(lv["price"]), Decimal(lv["size"])) for lv in raw["asks"]]
    assert row["bid_levels"] == len(bids) and row["ask_levels"] == len(asks)
    assert row["best_bid"] == (max(p for p, _ in bids) if bids else None)
    assert row["best_ask"] == (min(p for p, _ in asks) if asks else None)
    # the exchange sends the best level last; we store it first
    if bids:
        assert row["best_bid"] == Decimal(raw["bids"][-1]["price"])
    if asks:
        assert row["best_ask"] == Decimal(raw["asks"][-1]["price"])
    prices = [Decimal(p) for p, _ in row["bids"]]
    assert prices == sorted(prices, reverse=True)
    prices = [Decimal(p) for p, _ in row["asks"]]
    assert prices == sorted(prices)
    assert row["bid_depth"] == sum((s for _, s in bids), Decimal(0))
    assert row["ask_depth"] == sum((s for _, s in asks), Decimal(0))
    for side in ("bids", "asks"):
        for level in row[side]:
            assert all(isinstance(x, str) for x in level) and len(level) == 2
        assert sorted(map(tuple, row[side])) == sorted((lv["price"], lv["size"]) for lv in raw[side])
    if bids and asks:
        assert row["spread"] == row["best_ask"] - row["best_bid"]


def test_yes_and_no_books_mirror():
    yes = orderbooks.parse(load("clob_book_559651_yes.json")).table(T)[0]
    no = orderbooks.parse(load("clob_book_559651_no.json")).table(T)[0]
    assert yes["best_bid"] == Decimal("0.045") and yes["best_ask"] == Decimal("0.046")
    assert no["best_ask"] == 1 - yes["best_bid"] and no["best_bid"] == 1 - yes["best_ask"]
    assert yes["bids"][0] == ["0.045", "7429.41"] and no["asks"][0] == ["0.955", "7429.41"]
    assert yes["spread"] == Decimal("0.001")


def test_empty_side_has_null_best_and_zero_depth():
    row = orderbooks.parse(load("clob_book_empty_ask.json")).table(T)[0]
    assert row["asks"] == [] and row["ask_levels"] == 0 and row["ask_depth"] == 0
    assert row["best_ask"] is None and row["spread"] is None
    assert row["best_bid"] == Decimal("0.002") and row["bids"] == [["0.002", "6.99"], ["0.001", "667.12"]]


def test_books_array_any_level_order():
    books = [load(p.name) for p in BOOKS]
    expected = {r["token_id"]: r for r in orderbooks.parse(books).table(T)}
    assert len(expected) == len(books)
    shuffled = copy.deepcopy(books)
    rng = random.Random(5)
    for book in shuffled:
        rng.shuffle(book["bids"])
        rng.shuffle(book["asks"])
    rng.shuffle(shuffled)
    again = {r["token_id"]: r for r in orderbooks.parse(shuffled).table(T)}
    assert again == expected


def test_docs_leading_dot_prices_are_normalised():
    book = {"market": "0xabc", "asset_id": "123", "timestamp": "1786875382652", "hash": "h1",
            "bids": [{"price": ".48", "size": "30"}, {"price": ".49", "size": "20"}],
            "asks": [{"price": ".52", "size": "25"}, {"price": ".51", "size": "0"}]}
    row = orderbooks.parse(book).table(T)[0]
    assert row["bids"] == [["0.49", "20"], ["0.48", "30"]]
    assert row["asks"] == [["0.52", "25"]]  # a zero-size level is no level
    assert row["best_ask"] == Decimal("0.52") and row["ask_levels"] == 1


def test_missing_hash_gets_the_exchange_hash():
    book = load("clob_book_empty_ask.json")
    expected = book["hash"]
    book["hash"] = ""
    assert orderbooks.parse(book).table(T)[0]["hash"] == expected


def test_malformed_books_skipped_whole_others_kept():
    good = load("clob_book_neg_risk.json")
    cases = [
        dict(good, asset_id="not-a-token"),
        dict(good, market=None),
        dict(good, timestamp="soon"),
        dict(good, bids=[{"price": "abc", "size": "1"}]),
        dict(good, asks=[{"price": "1.5", "size": "1"}]),
        dict(good, asks=[{"price": "0.5", "size": "-1"}]),
        dict(good, bids=[{"price": "0.1", "size": "1"}, {"price": "0.1", "size": "2"}]),
        dict(good, bids="nope"),
        "garbage",
    ]
    out = orderbooks.parse([*cases, good])
    assert out.skipped == len(cases)
    assert [r["token_id"] for r in out.table(T)] == [good["asset_id"]]
    assert orderbooks.parse("<html>").skipped == 1


def test_duplicate_snapshot_in_one_answer_is_one_row():
    book = load("clob_book_559651_yes.json")
    assert len(orderbooks.parse([book, book]).table(T)) == 1
