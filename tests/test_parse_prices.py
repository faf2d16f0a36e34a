"""workers.prices.parse: the three CLOB batch answers merged into price_snapshots rows."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from workers import prices

DATA = Path(__file__).resolve().parent / "data"
UTC = timezone.utc
TS = datetime(2026, 11, 28, 15, 0, tzinfo=UTC)
T = "price_snapshots"


def real_tokens():
    yes = json.loads((DATA / "clob_book_559651_yes.json").read_text())["asset_id"]
    no = json.loads((DATA / "clob_book_559651_no.json").read_text())["asset_id"]
    empty = json.loads((DATA / "clob_book_empty_ask.json").read_text())["asset_id"]
    return yes, no, empty


def rows(out):
    return {r["token_id"]: r for r in out.table(T)}


def test_string_answers_merge_per_token():
    yes, no, _ = real_tokens()
    out = prices.parse(
        {yes: {"BUY": "0.045", "SELL": "0.046"}, no: {"BUY": "0.954", "SELL": "0.955"}},
        {yes: "0.0455", no: "0.9545"},
        [{"token_id": yes, "price": "0.045", "side": "BUY"}, {"token_id": no, "price": "0.954", "side": "SELL"}],
        tokens=[yes, no], ts=TS, received_at=TS,
    )
    assert out.skipped == 0
    r = rows(out)
    assert r[yes] == {"token_id": yes, "ts": TS, "best_bid": Decimal("0.045"), "best_ask": Decimal("0.046"),
                      "mid": Decimal("0.0455"), "last_trade_price": Decimal("0.045"), "received_at": TS}
    assert r[no]["best_bid"] == Decimal("0.954") and r[no]["mid"] == Decimal("0.9545")


def test_number_answers_are_exact_decimals():
    yes, _, _ = real_tokens()
    out = prices.parse({yes: {"BUY": 0.982, "SELL": 0.983}}, {yes: {"mid_price": 0.9825}},
                       {yes: {"price": 0.98, "side": "SELL"}}, ts=TS)
    r = rows(out)[yes]
    assert r["best_bid"] == Decimal("0.982") and str(r["best_bid"]) == "0.982"  # not 0.98199999...
    assert r["mid"] == Decimal("0.9825") and r["last_trade_price"] == Decimal("0.98")


def test_empty_book_and_never_traded_become_null():
    _, _, empty = real_tokens()
    out = prices.parse({empty: {"BUY": "0.002", "SELL": "0"}}, {empty: {"mid": "0"}},
                       [{"token_id": empty, "price": "0.5", "side": ""}], ts=TS)
    r = rows(out)[empty]
    assert r["best_bid"] == Decimal("0.002")
    assert r["best_ask"] is None and r["mid"] is None and r["last_trade_price"] is None


def test_only_asked_tokens_and_missing_tokens_get_no_row():
    yes, no, empty = real_tokens()
    out = prices.parse({yes: {"BUY": "0.1"}, "999": {"BUY": "0.2"}}, {}, [], tokens=[yes, no, empty], ts=TS)
    assert list(rows(out)) == [yes]
    assert rows(out)[yes]["best_ask"] is None  # one side missing is NULL, not invented


def test_bad_value_skips_that_token_only():
    yes, no, _ = real_tokens()
    out = prices.parse({yes: {"BUY": "abc"}, no: {"BUY": "0.3", "SELL": "0.4"}}, {yes: "0.5", no: "1.7"},
                       [{"token_id": yes, "price": "0.4", "side": "BUY"}], ts=TS)
    assert out.skipped == 2 and out.table(T) == []
    out = prices.parse({yes: {"BUY": "abc"}, no: {"BUY": "0.3", "SELL": "0.4"}}, {no: "0.35"}, None, ts=TS)
    assert out.skipped == 1 and list(rows(out)) == [no]


def test_whole_bad_answers_are_counted_not_raised():
    assert prices.parse("<html>", None, None, ts=TS).skipped == 1
    assert prices.parse(None, ["x"], None, ts=TS).skipped == 1
    assert prices.parse(None, None, "garbage", ts=TS).skipped == 1
