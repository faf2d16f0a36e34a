"""Ledger: every trade polysim published, in publish order (ground truth for tests).

Stored column-wise in `array`s (36 bytes a trade) so a 30-minute soak at
thousands of trades per second stays within a few hundred MB; the wire dicts are
built only when someone reads them. The transaction hash is recomputed from the
transaction number (SHA-256 of seed and number), never stored.
"""

from __future__ import annotations

import hashlib
from array import array

from polysim.book import PRICE_TEXT, size_text

SIDES = ("BUY", "SELL")


def tx_hash(seed: int, txno: int) -> str:
    """The 0x-prefixed 64-hex transaction hash of transaction number `txno`."""
    return "0x" + hashlib.sha256(b"polysim:%d:tx:%d" % (seed, txno)).hexdigest()


class TxHash:
    """tx_hash(seed, txno) for one seed, a quarter cheaper: the seed's prefix is hashed once."""

    def __init__(self, seed: int):
        self._prefix = hashlib.sha256(b"polysim:%d:tx:" % seed)

    def __call__(self, txno: int) -> str:
        h = self._prefix.copy()
        h.update(b"%d" % txno)
        return "0x" + h.hexdigest()


ENTRY = ('{"index":%d,"event_type":"last_trade_price","asset_id":"%s","market":"%s","price":"%s",'
         '"size":"%s","side":"%s","timestamp":"%d","transaction_hash":"%s","fee_rate_bps":"%s",'
         '"published_ms":%d}')


class Ledger:
    """Append-only columns; index i is the i-th trade published (0-based)."""

    def __init__(self, seed: int):
        self.seed = seed
        # 36 bytes a trade: prices fit int16 (units of 0.0001), sizes int32 cents. The
        # publish time is a wall-clock ms; timestamps may be simulated (--epoch-ms) and
        # years away from it, so it gets 64 bits of its own.
        self.market = array("i")
        self.token = array("b")
        self.price = array("h")
        self.size = array("i")
        self.side = array("b")
        self.ts = array("q")
        self.tx = array("I")
        self._pub = array("q")
        self.by_market: dict[int, array] = {}

    def __len__(self) -> int:
        # The column appended last: a reader thread (json_range) never sees half an entry.
        return len(self._pub)

    def append(self, market: int, token: int, price: int, size: int, side: int, ts: int,
               tx: int, pub: int) -> int:
        """Record one fill; returns its index."""
        i = len(self.ts)
        self.market.append(market)
        self.token.append(token)
        self.price.append(price)
        self.size.append(size)
        self.side.append(side)
        self.ts.append(ts)
        self.tx.append(tx)
        self._pub.append(pub)
        idx = self.by_market.get(market)
        if idx is None:
            idx = self.by_market[market] = array("i")
        idx.append(i)
        return i

    def pub(self, i: int) -> int:
        """Wall-clock ms at which trade i was handed to the WebSocket writers."""
        return self._pub[i]

    def json_range(self, start: int, end: int, markets: list) -> str:
        """Entries [start, end) as one JSON array text, formatted directly (no dicts).

        Called from a worker thread: it only reads indices below a length taken
        before the call, and appends never change existing entries.
        """
        parts = []
        mk, tk, pr, sz, sd, ts, tx, pub = (self.market, self.token, self.price, self.size, self.side,
                                          self.ts, self.tx, self._pub)
        seed = self.seed
        for i in range(start, end):
            m = markets[mk[i]]
            parts.append(ENTRY % (i, m.tokens[tk[i]], m.condition_id, PRICE_TEXT[pr[i]], size_text(sz[i]),
                                  SIDES[sd[i]], ts[i], tx_hash(seed, tx[i]), m.fee_rate_bps, pub[i]))
        return "[" + ",".join(parts) + "]"

    def tsv_range(self, start: int, end: int, markets: list) -> bytes:
        """Entries [start, end) as tab-separated lines, the accounting columns only:
        index, asset_id, transaction_hash, price, size, side, timestamp (ms), published_ms.

        About 200 bytes a trade (the JSON form is ~350 and must be parsed whole): what a
        long run's accounting streams into PostgreSQL with COPY. Thread-safe as json_range.
        """
        mk, tk, pr, sz, sd, ts, tx, pub = (self.market, self.token, self.price, self.size, self.side,
                                          self.ts, self.tx, self._pub)
        txh = TxHash(self.seed)
        lines = []
        for i in range(start, end):
            m = markets[mk[i]]
            lines.append(f"{i}\t{m.tokens[tk[i]]}\t{txh(tx[i])}\t{PRICE_TEXT[pr[i]]}\t{size_text(sz[i])}"
                         f"\t{SIDES[sd[i]]}\t{ts[i]}\t{pub[i]}\n")
        return "".join(lines).encode()

    def entry(self, i: int, markets: list) -> dict:
        """Trade i with the field names of a WS `last_trade_price` message, plus index/publish time."""
        m = markets[self.market[i]]
        return {
            "index": i,
            "event_type": "last_trade_price",
            "asset_id": m.tokens[self.token[i]],
            "market": m.condition_id,
            "price": PRICE_TEXT[self.price[i]],
            "size": size_text(self.size[i]),
            "side": SIDES[self.side[i]],
            "timestamp": str(self.ts[i]),
            "transaction_hash": tx_hash(self.seed, self.tx[i]),
            "fee_rate_bps": m.fee_rate_bps,
            "published_ms": self.pub(i),
        }
