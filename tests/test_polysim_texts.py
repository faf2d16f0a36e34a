"""polysim's cached book texts and REST hashes equal a straightforward reference.

Book.levels_texts() keeps each side's text until that side's dict changes, and
Exchange.rest_hash keeps a token's hash until what it hashes changes. Here, after
every engine step of a busy seed (trades, book changes, closes, resolutions, new
markets, tick changes), and after changes made to the dicts directly (as the engine
and tests do), every open book's texts and hashes are compared with json.dumps of
Book.levels() and book_hash of the summary built from them (Book.top() with max/min
of the dicts), and every hash a `price_change` carried with the REST hash of that
moment."""

from __future__ import annotations

import json

from polysim.book import ONE, PRICE_TEXT, Book, book_hash
from polysim.exchange import TICK_TEXT, Exchange
from polysim.options import Options


def reference_levels(book: Book, token: int) -> str:
    bids, asks = book.levels(token)
    return json.dumps({"bids": bids, "asks": asks}, separators=(",", ":"))[1:-1]


def reference_hash(x: Exchange, m, token: int) -> str:
    """book_hash of the REST summary, built field by field from Book.levels()."""
    bids, asks = m.book.levels(token)
    last = m.last_trade[token]
    return book_hash({"market": m.condition_id, "asset_id": m.tokens[token], "timestamp": str(m.book_ms),
                      "hash": "", "bids": bids, "asks": asks, "min_order_size": "5",
                      "tick_size": TICK_TEXT[m.book.tick], "neg_risk": m.event.neg_risk,
                      "last_trade_price": PRICE_TEXT[last[0]] if last else ""})


def check(x: Exchange, m) -> None:
    texts = m.book.levels_texts()
    assert m.book.top() == (max(m.book.bids, default=None), min(m.book.asks, default=None))
    for k in (0, 1):
        assert texts[k] == reference_levels(m.book, k)
        want = reference_hash(x, m, k)
        assert x.rest_hash(m, k, texts[k]) == want
        book = json.loads(x.book_text(m, k, initial=True))
        assert book["hash"] == want
        assert {"bids": book["bids"], "asks": book["asks"]} == dict(zip(("bids", "asks"), m.book.levels(k)))


class Sink:
    def __init__(self, x_ref):
        self.x_ref = x_ref
        self.changes = 0

    def wants(self, asset):
        return True

    def emit(self, assets, text, custom_only=False):
        msg = json.loads(text)
        if msg["event_type"] == "price_change":
            # Sent right after the change: each entry carries its token's REST hash of now.
            x = self.x_ref[0]
            m = x.by_condition[msg["market"]]
            for ch in msg["price_changes"]:
                assert ch["hash"] == reference_hash(x, m, m.tokens.index(ch["asset_id"]))
            self.changes += 1

    def emit_global(self, text):
        pass


def test_cached_texts_and_hashes_equal_the_reference_at_every_step():
    ref = [None]
    sink = Sink(ref)
    x = ref[0] = Exchange(Options(markets=40, seed=11, trade_rate=4000.0, multi_fill=0.5, book_rate=800.0,
                                  resolve_rate=3.0, resolve_delay=0.2, new_market_rate=3.0, clob_delay=0.3,
                                  ts_jitter_ms=20), 1786000000000, sink)
    checked = 0
    for step in range(1, 400):
        x.advance(step * 0.01, 1786000000000 + step * 10)
        for m in x.markets:
            if m.state == "open":
                check(x, m)
                checked += 1
    assert sink.changes > 3000 and checked > 10000
    assert any(m.state == "resolved" for m in x.markets[x.opts.history:])


def test_texts_follow_direct_changes_to_the_dicts():
    """Changes the cache is not told about: a best size changed and changed back, the best
    and another level changed at once, a level moved with the same count, whole dicts
    replaced, a tick changed, a trade price set."""
    x = Exchange(Options(markets=6, seed=2, trade_rate=0.0, book_rate=0.0), 1786000000000)
    m = next(m for m in x.markets if m.state == "open")
    book = m.book
    check(x, m)
    p = max(book.bids)
    size = book.bids[p]
    book.bids[p] = size + 1
    check(x, m)
    book.bids[p] = size
    check(x, m)
    book.bids[p] += 2  # the best level and another one: not only the best changed
    book.bids[min(book.bids)] += 3
    check(x, m)
    book.asks[min(book.asks)] += 4  # the best ask alone
    check(x, m)
    q = min(book.asks)
    book.asks[q + book.tick * 50] = book.asks.pop(q)
    check(x, m)
    book.bids = {300: 10_000, 200: 12_345}
    book.asks = {9000: 5, 9100: 2_000_001}
    check(x, m)
    book.bids.clear()
    check(x, m)
    book.tick = 10 if book.tick == 100 else 100
    check(x, m)
    m.last_trade[1] = (ONE - 9000, 0)
    check(x, m)
    m.book_ms += 1
    check(x, m)


def test_size_text_equals_the_branching_formula():
    from polysim.book import size_text

    def reference(cents):
        whole, frac = divmod(cents, 100)
        if frac == 0:
            return str(whole)
        return f"{whole}.{frac // 10}" if frac % 10 == 0 else f"{whole}.{frac:02d}"

    for cents in [*range(0, 20_000), *range(4_999_000, 5_001_000), 10**12 + 7]:
        assert size_text(cents) == reference(cents)
