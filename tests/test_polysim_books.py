"""polysim's book events agree with its REST books: applying every `book` and
`price_change` a subscriber receives, in order, gives after each advance() exactly
the book /clob/book would serve then (levels, timestamp and hash), for every token."""

from __future__ import annotations

import hashlib
import json

from polysim.exchange import Exchange
from polysim.options import Options


class Sink:
    def __init__(self):
        self.texts = []

    def wants(self, asset):
        return True

    def emit(self, assets, text, custom_only=False):
        self.texts.append(text)

    def emit_global(self, text):
        pass


def _apply(books: dict, msg: dict) -> None:
    kind = msg["event_type"]
    if kind == "book":
        books[msg["asset_id"]] = {"bids": {l["price"]: l["size"] for l in msg["bids"]},
                                  "asks": {l["price"]: l["size"] for l in msg["asks"]},
                                  "timestamp": msg["timestamp"], "hash": msg["hash"]}
    elif kind == "price_change":
        for ch in msg["price_changes"]:
            b = books.get(ch["asset_id"])
            if b is None:
                continue
            side = b["bids"] if ch["side"] == "BUY" else b["asks"]
            if ch["size"] == "0":
                side.pop(ch["price"], None)
            else:
                side[ch["price"]] = ch["size"]
            b["timestamp"], b["hash"] = msg["timestamp"], ch["hash"]


def test_events_rebuild_the_rest_book_after_every_advance():
    sink = Sink()
    x = Exchange(Options(markets=12, seed=5, trade_rate=800.0, multi_fill=0.4, book_rate=300.0,
                         ts_jitter_ms=30), 1786000000000, sink)
    books: dict = {}
    for m in x.markets:
        if m.tradable(x.now_ms):
            for k in (0, 1):
                _apply(books, json.loads(x.book_text(m, k, initial=True)))
    compared = changes = 0
    last_ms: dict = {}
    for step in range(1, 300):
        x.advance(step * 0.01, 1786000000000 + step * 10)
        for text in sink.texts:
            for msg in json.loads("[" + text + "]" if text.startswith("{") else text):
                if msg["event_type"] == "price_change":
                    changes += 1
                    ts = int(msg["timestamp"])
                    assert ts > last_ms.get(msg["market"], 0), "book timestamps go forward per market"
                    last_ms[msg["market"]] = ts
                _apply(books, msg)
        sink.texts.clear()
        for m in x.markets:
            if not m.tradable(x.now_ms):
                continue
            for k in (0, 1):
                rest = x.book_summary(m, k)
                got = books[m.tokens[k]]
                assert got["bids"] == {l["price"]: l["size"] for l in rest["bids"]}
                assert got["asks"] == {l["price"]: l["size"] for l in rest["asks"]}
                assert (got["timestamp"], got["hash"]) == (rest["timestamp"], rest["hash"])
                compared += 1
    assert changes > 500 and compared > 5000


def test_rest_hash_is_the_summary_hash_and_ws_books_carry_it():
    """rest_hash (formatted directly) is §3.1's hash of the REST summary; a WS book's hash
    is that same hash (as the recorded full-depth WS book verifies: tests/test_book_events.py)."""
    x = Exchange(Options(markets=30, seed=2, trade_rate=2000.0, book_rate=100.0), 1786000000000, Sink())
    for step in range(1, 50):
        x.advance(step * 0.01, 1786000000000)
    for m in x.markets[-30:]:
        for k in (0, 1):
            rest = x.book_summary(m, k)
            body = dict(rest, hash="")
            assert rest["hash"] == hashlib.sha1(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
            for initial in (True, False):
                assert json.loads(x.book_text(m, k, initial))["hash"] == rest["hash"]


def test_levels_texts_equal_the_compact_json_of_levels_per_token():
    x = Exchange(Options(markets=20, seed=3, trade_rate=3000.0, book_rate=300.0), 1786000000000, Sink())
    for step in range(1, 40):
        x.advance(step * 0.01, 1786000000000)
    for m in x.markets:
        plain = tuple(json.dumps(dict(zip(("bids", "asks"), m.book.levels(k))), separators=(",", ":"))[1:-1]
                      for k in (0, 1))
        assert m.book.levels_texts() == plain
